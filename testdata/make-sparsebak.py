#!/usr/bin/env python3
"""Write sparsebak / Wyng (0.2, 0.3) backup archives for vimage's tests.

Usage:
    python3 testdata/make-sparsebak.py OUTDIR
        the good variants A, B, C1, C2, C3, D1, D2, D3, E1, E2, E3 (one volume,
        three sessions each), the negative cases under OUTDIR/broken/, and
        OUTDIR/expected.json.  OUTDIR must not exist or must be empty.
    python3 testdata/make-sparsebak.py --broken KIND[,KIND...] [--from GOOD] OUTDIR
        only the named negative cases (KIND "all" = every one), written to
        OUTDIR/broken/KIND/ with OUTDIR/broken/KIND/expected.json each.  With
        --from GOOD (an existing output of the first form, e.g.
        testdata/sparsebak) the base variant is copied from there, so neither
        mkfs.ext4 nor debugfs is needed; without it the variants are rebuilt
        in a temporary directory first.
    python3 testdata/make-sparsebak.py --list-broken
        the negative cases and what they break.

The layouts follow /work/shared/formats/sparsebak-wyng.md (called "the notes"
below); nothing here is copied from sparsebak or Wyng (GPLv3).  Python 3.8+,
standard library only; `zstandard` is used for the Wyng 0.3 (E3) chunks when it
can be imported (else: the `zstd` command, else zlib, which is then recorded in
expected.json and archive.ini).  The volume is an ext4 image made with
mkfs.ext4 -d and changed with debugfs (e2fsprogs), so the first form needs
those two programs (no root, no loop devices).

Determinism: the source images are byte-for-byte reproducible with the same
e2fsprogs (1.47.0 here): fixed UUID and hash seed, E2FSPROGS_FAKE_TIME, and
every inode's times/owner set with debugfs.  Chunk files are reproducible for
a given Python/zlib/liblzma/libbz2/libzstd; their *decompressed* content, and
so every sha256 in expected.json, does not depend on those versions.
"""
import argparse
import bz2
import calendar
import configparser
import gzip
import hashlib
import json
import lzma
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import zlib

try:
    import zstandard
except ImportError:             # pragma: no cover - depends on the machine
    zstandard = None

KiB = 1024
MiB = 1024 * KiB

VOLNAME = "vm-test-private"
FS_UUID = "5b1c2e3d-4f50-4617-8829-3a4b5c6d7e8f"
FS_HASH_SEED = "0b7f6a52-3c1e-4d8a-a5b6-9e0f1d2c3b4a"
FS_LABEL = "sbaktest"

# Volume sizes (bytes) of the three source images.
SIZE1 = 4 * MiB                         # 0x400000: session 1, the ext4 file system
SIZE2 = 0x4C5000                        # session 2: grown by 788 KiB (4 MiB + 768 KiB + 20 KiB)
SIZE3 = 0x4C2C00                        # session 3: shrunk to 4 MiB + 768 KiB + 11 KiB
TAIL_MARK = (0x4C1000, 0x4C5000)        # written in session 2, zeroed in session 3
ZEROED = (256 * KiB, 512 * KiB)         # cache.log's space, zeroed in session 3
EDIT_WINDOW = (128 * KiB, 192 * KiB)    # the big.txt edit must fall in here (64 KiB aligned)
BIG_EDIT_LEN = 1024

# ---------------------------------------------------------------------------
# source tree and images


def _lines(tag, nbytes, seed):
    """Compressible, deterministic text of exactly nbytes bytes."""
    words = ("volume chunk session backup restore archive manifest sparse thin pool "
             "snapshot delta bitmap address zero merge overlay verify digest").split()
    rng = random.Random(seed)
    out = []
    size = 0
    i = 0
    while size < nbytes:
        n = 5 + (i % 9)
        k = rng.randrange(len(words))
        line = "%s %06d %s.\n" % (tag, i, " ".join(words[(k + j * 3) % len(words)]
                                                   for j in range(n)))
        out.append(line)
        size += len(line)
        i += 1
    return "".join(out).encode("ascii")[:nbytes]


def _rbytes(seed, n):
    return random.Random(seed).getrandbits(8 * n).to_bytes(n, "little")


def tree_entries():
    """(path, bytes) of the source tree, in the order mkfs -d allocates them
    (sorted names; upper case sorts first)."""
    return [
        ("README.txt", b"sparsebak/Wyng test volume for vimage\n"
                       b"made by testdata/make-sparsebak.py\n"),
        ("app.conf", b"# app.conf\nmode = normal\nlevel = 1\nowner = nobody\n"),
        ("big.txt", _lines("B", 150 * KiB, 11)),
        ("cache.log", _lines("C", 320000, 12)),
        ("docs/manual.txt", _lines("M", 40000, 13)),
        ("docs/empty.dat", b""),
        ("random.bin", _rbytes(14, 8192)),
        ("zz-last.txt", b"the end\n"),
    ]


APP_CONF_2 = b"# app.conf\nmode = custom\nlevel = 2\nowner = nobody\n"
APP_CONF_3 = b"# app.conf\nmode = final!\nlevel = 3\nowner = nobody\n"


def epoch_of(session_name):
    """S_YYYYmmdd-HHMMSS -> seconds (taken as UTC)."""
    return calendar.timegm(time.strptime(session_name[2:17], "%Y%m%d-%H%M%S"))


class ImageBuilder:
    """Builds the three source images with mkfs.ext4 -d and debugfs."""

    def __init__(self, work):
        self.work = work
        self.tree = os.path.join(work, "tree")
        self.img = os.path.join(work, "vol.img")
        for tool in ("mkfs.ext4", "debugfs"):
            if not shutil.which(tool):
                sys.exit("make-sparsebak.py: %s not found (install e2fsprogs)" % tool)

    def _env(self, epoch):
        env = dict(os.environ)
        env["E2FSPROGS_FAKE_TIME"] = str(epoch)
        env["LC_ALL"] = "C"
        env["TZ"] = "UTC"
        return env

    def debugfs(self, cmds, epoch, write=True):
        script = os.path.join(self.work, "debugfs.cmds")
        with open(script, "w") as f:
            f.write("\n".join(cmds) + "\n")
        args = ["debugfs"] + (["-w"] if write else []) + ["-f", script, self.img]
        p = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           env=self._env(epoch))
        out = p.stdout.decode("utf-8", "replace")
        bad = [l for l in out.splitlines()
               if l.strip() and not l.startswith("debugfs")]
        if p.returncode != 0 or (write and bad):
            sys.exit("make-sparsebak.py: debugfs failed:\n" + out)
        return out

    def inodes_fixup(self, paths, epoch):
        """Fixed times, owner and no nanoseconds for every listed inode."""
        cmds = []
        for p in ["/", "/lost+found"] + ["/" + q for q in paths]:
            for field in ("atime", "ctime", "mtime", "crtime"):
                cmds.append('sif "%s" %s @%d' % (p, field, epoch))
                cmds.append('sif "%s" %s_extra 0' % (p, field))
            cmds.append('sif "%s" uid 0' % p)
            cmds.append('sif "%s" gid 0' % p)
        self.debugfs(cmds, epoch)

    def bmap(self, path, lblk, epoch):
        out = self.debugfs(['bmap "/%s" %d' % (path, lblk)], epoch, write=False)
        nums = [l.strip() for l in out.splitlines() if l.strip().isdigit()]
        if len(nums) != 1:
            sys.exit("make-sparsebak.py: bmap failed: " + out)
        return int(nums[0])

    def blocks(self, path, epoch):
        out = self.debugfs(['blocks "/%s"' % path], epoch, write=False)
        return [int(x) for l in out.splitlines() if not l.startswith("debugfs")
                for x in l.split()]

    def used_blocks(self, first, count, epoch):
        out = self.debugfs(["testb %d %d" % (first, count)], epoch, write=False)
        return [int(l.split()[1]) for l in out.splitlines()
                if l.startswith("Block ") and "marked in use" in l]

    def read(self):
        """The image now; checked with e2fsck -fn when e2fsck is there."""
        if shutil.which("e2fsck"):
            p = subprocess.run(["e2fsck", "-fn", self.img], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
            if p.returncode != 0:
                sys.exit("make-sparsebak.py: e2fsck found errors:\n" + p.stdout.decode())
        with open(self.img, "rb") as f:
            return f.read()

    def patch(self, offset, data):
        with open(self.img, "r+b") as f:
            f.seek(offset)
            f.write(data)

    def file_offset(self, path, foff, epoch):
        blk = self.bmap(path, foff // KiB, epoch)
        return blk * KiB + foff % KiB

    def build(self, epochs):
        """Returns dict with img1, img2, img3full (bytes) and facts."""
        e1, e2, e3 = epochs
        os.makedirs(self.tree)
        entries = tree_entries()
        paths = []
        for rel, data in entries:
            full = os.path.join(self.tree, *rel.split("/"))
            d = os.path.dirname(full)
            if not os.path.isdir(d):
                os.makedirs(d)
                paths.append(os.path.relpath(d, self.tree).replace(os.sep, "/"))
            with open(full, "wb") as f:
                f.write(data)
            os.chmod(full, 0o644)
            paths.append(rel)
        for dirpath, dirnames, filenames in os.walk(self.tree):
            os.chmod(dirpath, 0o755)
            for n in filenames + dirnames:
                os.utime(os.path.join(dirpath, n), (e1, e1))
            os.utime(dirpath, (e1, e1))
        with open(self.img, "wb") as f:
            f.truncate(SIZE1)
        p = subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-b", "1024", "-N", "64", "-m", "0",
             "-O", "^has_journal", "-L", FS_LABEL, "-U", FS_UUID,
             "-E", "hash_seed=%s,root_owner=0:0" % FS_HASH_SEED,
             "-d", self.tree, self.img],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self._env(e1))
        if p.returncode != 0:
            sys.exit("make-sparsebak.py: mkfs.ext4 failed:\n" + p.stdout.decode())
        self.inodes_fixup(paths, e1)

        # Layout checks: the test relies on where things are.
        big = dict(entries)["big.txt"]
        edit_foff = None
        for foff in range(0, len(big) - BIG_EDIT_LEN, KiB):
            a = self.file_offset("big.txt", foff, e1)
            if EDIT_WINDOW[0] + 8 * KiB <= a and a + BIG_EDIT_LEN <= EDIT_WINDOW[1] - 8 * KiB:
                edit_foff = foff + 100
                break
        if edit_foff is None:
            sys.exit("make-sparsebak.py: big.txt is not where expected")
        # Every block from the edit window's start to the end of the range
        # zeroed in session 3 must belong to big.txt or cache.log, and
        # cache.log must cover the zeroed range: then the chunks there change
        # only by the edit (reverted in session 3) and by the zeroing.
        big_blocks = set(self.blocks("big.txt", e1))
        cache_blocks = set(self.blocks("cache.log", e1))
        want = set(range(EDIT_WINDOW[0] // KiB, ZEROED[1] // KiB))
        if not (want <= big_blocks | cache_blocks
                and set(range(ZEROED[0] // KiB, ZEROED[1] // KiB)) <= cache_blocks):
            sys.exit("make-sparsebak.py: unexpected layout: big.txt %d-%d, cache.log %d-%d"
                     % (min(big_blocks), max(big_blocks), min(cache_blocks), max(cache_blocks)))
        img1 = self.read()
        edit_addr = self.file_offset("big.txt", edit_foff, e1)
        orig = big[edit_foff:edit_foff + BIG_EDIT_LEN]
        assert img1[edit_addr:edit_addr + BIG_EDIT_LEN] == orig

        # ---- session 2: edit files in place, grow, write a tail marker
        edit = (b"EDITED IN SESSION 2 " * 60)[:BIG_EDIT_LEN]
        self.patch(edit_addr, edit)
        conf_addr = self.file_offset("app.conf", 0, e1)
        self.patch(conf_addr, APP_CONF_2)
        self.debugfs(['sif "/app.conf" size %d' % len(APP_CONF_2)], e2)
        self.inodes_fixup(paths, e2)
        with open(self.img, "r+b") as f:
            f.truncate(SIZE2)
            f.seek(TAIL_MARK[0])
            mark = b"".join(b"grown tail written in session 2, offset %#09x\n" % (TAIL_MARK[0] + i)
                            for i in range(0, TAIL_MARK[1] - TAIL_MARK[0], 48))
            f.write(mark[:TAIL_MARK[1] - TAIL_MARK[0]])
        img2 = self.read()

        # ---- session 3: revert the big.txt edit, change app.conf again,
        # delete cache.log and zero its 256 KiB, zero the tail marker; shrink.
        self.patch(edit_addr, orig)
        self.patch(conf_addr, APP_CONF_3)
        self.debugfs(['sif "/app.conf" size %d' % len(APP_CONF_3), 'rm "/cache.log"'], e3)
        paths3 = [p for p in paths if p != "cache.log"]
        self.inodes_fixup(paths3, e3)
        used = self.used_blocks(ZEROED[0] // KiB, (ZEROED[1] - ZEROED[0]) // KiB, e3)
        if used:
            sys.exit("make-sparsebak.py: blocks %s in the zeroed range are in use" % used[:5])
        self.patch(ZEROED[0], bytes(ZEROED[1] - ZEROED[0]))
        self.patch(TAIL_MARK[0], bytes(TAIL_MARK[1] - TAIL_MARK[0]))
        img3full = self.read()
        assert len(img3full) == SIZE2
        return {"img1": img1, "img2": img2, "img3full": img3full,
                "edit_addr": edit_addr, "conf_addr": conf_addr}


# ---------------------------------------------------------------------------
# codecs and hashes

ZSTD_NOTE = None


def zstd_compress(data, level=3):
    global ZSTD_NOTE
    if zstandard is not None:
        ZSTD_NOTE = "zstandard %s" % zstandard.__version__
        return zstandard.ZstdCompressor(level=level).compress(data)
    if shutil.which("zstd"):
        ZSTD_NOTE = "zstd command"
        p = subprocess.run(["zstd", "-q", "-c", "-%d" % level, "--no-check"], input=data,
                           stdout=subprocess.PIPE, check=True)
        return p.stdout
    return None


def have_zstd():
    return zstandard is not None or shutil.which("zstd") is not None


def compress(codec, data, mtime):
    if codec == "raw":
        return data
    if codec == "xz":               # lzma.open(..., "wb", preset=0): xz, CRC64
        return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=0)
    if codec == "gzip":             # gzip.compress(buf, compresslevel=4)
        return gzip.compress(data, compresslevel=4, mtime=mtime)
    if codec == "zlib":
        return zlib.compress(data, 4)
    if codec == "bz2":
        return bz2.compress(data, 9)
    if codec == "zstd":
        out = zstd_compress(data, 3)
        if out is None:
            raise RuntimeError("no zstd")
        return out
    raise ValueError(codec)


def decompress_any(blob, expect=None):
    """For self-checks only."""
    if blob[:2] == b"\x1f\x8b":
        return gzip.decompress(blob)
    if blob[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(blob)
    if blob[:3] == b"BZh":
        return bz2.decompress(blob)
    if blob[:4] == b"\x28\xb5\x2f\xfd":
        if zstandard is not None:
            return zstandard.ZstdDecompressor().decompress(blob, max_output_size=expect or 16 * MiB)
        return subprocess.run(["zstd", "-d", "-q", "-c"], input=blob, stdout=subprocess.PIPE,
                              check=True).stdout
    if blob[:1] == b"\x78":
        return zlib.decompress(blob)
    return blob


def digest(kind, blob):
    if kind == "sha256":
        return hashlib.sha256(blob).hexdigest()
    if kind == "blake2b":
        return hashlib.blake2b(blob, digest_size=32).hexdigest()
    raise ValueError(kind)


def det_uuid(seed):
    rng = random.Random(seed)
    h = "%032x" % rng.getrandbits(128)
    h = h[:12] + "4" + h[13:16] + "89ab"[rng.randrange(4)] + h[17:]
    return "%s-%s-%s-%s-%s" % (h[:8], h[8:12], h[12:16], h[16:20], h[20:])


def det_lvm_uuid(seed):
    """An LVM-style LV uuid (6-4-4-4-4-4-6 of [A-Za-z0-9]), as Wyng 0.2/0.3
    store in info:uuid."""
    rng = random.Random(seed)
    al = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    parts = []
    for n in (6, 4, 4, 4, 4, 4, 6):
        parts.append("".join(rng.choice(al) for _ in range(n)))
    return "-".join(parts)


# ---------------------------------------------------------------------------
# variants

VARIANTS = [
    {
        "name": "A", "era": "A flat raw",
        "commits": "f448bd0 (2018-08-25)",
        "voldir": "baktest/set01/qubes_dom0%pool00/" + VOLNAME,
        "sessions": ["S_20180825-101500", "S_20180825-173000", "S_20180826-090000"],
        "chunksize": 256 * KiB, "codecs": ["raw"] * 3, "hash": None,
        "layout": "flat", "zero": "file", "manifest": None, "info": None,
        "lastrule": "zeros", "growth": "holes", "shrink": False, "dedup": False,
        "extras": "A",
    },
    {
        "name": "B", "era": "B flat xz",
        "commits": "088a67d, 1b5fa97 (2018-08-30/31)",
        "voldir": "baktest/set04/qubes_dom0%pool00/" + VOLNAME,
        "sessions": ["S_20180830-211500", "S_20180831-073000", "S_20180831-190000"],
        "chunksize": 256 * KiB, "codecs": ["xz"] * 3, "hash": None,
        "layout": "flat", "zero": "file", "manifest": None, "info": None,
        "lastrule": "zeros", "growth": "holes", "shrink": False, "dedup": False,
        "extras": "B",
    },
    {
        "name": "C1", "era": "C buckets + gzip, c490aeb info (size, previous)",
        "commits": "c490aeb (2018-09-09)",
        "voldir": "sparsebak/set01/qubes_dom0%pool00/" + VOLNAME,
        "sessions": ["S_20180909-120000", "S_20180909-183000", "S_20180910-081500"],
        "chunksize": 256 * KiB, "codecs": ["gzip"] * 3, "hash": None,
        "layout": "bucket", "zero": "file", "manifest": None, "info": "c490aeb",
        "lastrule": "zeros", "growth": "holes", "shrink": True, "dedup": False,
    },
    {
        "name": "C2", "era": "C buckets + gzip, 837e075 info (volsize, sent, zeros, previous)",
        "commits": "837e075 (2018-09-10) .. 700f991",
        "voldir": "sparsebak/set01/qubes_dom0%pool00/" + VOLNAME,
        "sessions": ["S_20180910-201500", "S_20180911-201500", "S_20180912-201500"],
        "chunksize": 256 * KiB, "codecs": ["gzip"] * 3, "hash": None,
        "layout": "bucket", "zero": "file", "manifest": None, "info": "837e075",
        "lastrule": "zeros", "growth": "holes", "shrink": True, "dedup": False,
    },
    {
        "name": "C3", "era": "C buckets + gzip, 700f991 info (volsize, chunksize, sent, zeros, previous)",
        "commits": "700f991 (2018-09-13); path of 1f828fb (2018-09-23) .. before 616dd91 (2018-09-28)",
        "voldir": "sparsebak/qubes_dom0%pool00/" + VOLNAME,
        "sessions": ["S_20180924-093000", "S_20180925-093000", "S_20180926-093000"],
        "chunksize": 128 * KiB, "codecs": ["gzip"] * 3, "hash": None,
        "layout": "bucket", "zero": "file", "manifest": None, "info": "700f991",
        "lastrule": "zeros", "growth": "holes", "shrink": True, "dedup": False,
    },
    {
        "name": "D1", "era": "D manifest, 884da86 order '<16hex> <sha256>' / '<16hex> 0'",
        "commits": "884da86/ff81c70 (2018-10-14) .. a53ee63 (2018-10-24)",
        "voldir": "sparsebak/qubes_dom0%pool00/" + VOLNAME,
        "sessions": ["S_20181015-200000", "S_20181018-200000", "S_20181022-200000"],
        "chunksize": 128 * KiB, "codecs": ["gzip"] * 3, "hash": "sha256",
        "layout": "bucket", "zero": "file+line", "manifest": "D1", "info": "884da86",
        "lastrule": "always", "growth": "fill", "shrink": True, "dedup": False,
    },
    {
        "name": "D2", "era": "D manifest, a5239e9 order '<sha256> x<16hex>' / 'x<16hex> 0'",
        "commits": "a5239e9 (2018-10-29) .. 13e6e30 (2018-11-14)",
        "voldir": "sparsebak/qubes_dom0%pool00/" + VOLNAME,
        "sessions": ["S_20181030-200000", "S_20181105-200000", "S_20181112-200000"],
        "chunksize": 128 * KiB, "codecs": ["gzip"] * 3, "hash": "sha256",
        "layout": "bucket", "zero": "file+line", "manifest": "D2", "info": "884da86",
        "lastrule": "always", "growth": "fill", "shrink": True, "dedup": False,
    },
    {
        "name": "D3", "era": "D manifest, 13e6e30 order '<sha256> x<16hex>' / '0 x<16hex>', volinfo",
        "commits": "22b9bb2 (2019-01-08) .. a0bd331 (2019-04-03)",
        "voldir": "sparsebak/qubes_dom0%pool00/" + VOLNAME,
        "sessions": ["S_20190120-110000", "S_20190210-110000", "S_20190315-110000"],
        "chunksize": 128 * KiB, "codecs": ["gzip"] * 3, "hash": "sha256",
        "layout": "bucket", "zero": "file+line", "manifest": "D3", "info": "22b9bb2",
        "volinfo": 1, "lastrule": "always", "growth": "fill", "shrink": True, "dedup": False,
    },
    {
        "name": "E1", "era": "E1 sparsebak 0.2 (v0.2alpha5): zlib, archive.ini, '0' lines without files",
        "commits": "f556b04 (2019-06-02) .. 8ef9468 v0.2alpha5 (2019-06-13)",
        "archive": "sparsebak/default",
        "voldir": "sparsebak/default/" + VOLNAME,
        "sessions": ["S_20190613-150000", "S_20190614-090000", "S_20190614-210000"],
        "chunksize": 64 * KiB, "codecs": ["zlib"] * 3, "hash": "sha256",
        "layout": "bucket", "zero": "line", "manifest": "D3", "info": "v0.2alpha5",
        "volinfo": 1, "lastrule": "always", "growth": "fill", "shrink": True, "dedup": True,
        "ini": {"chunksize": 64 * KiB, "compression": "zlib", "compr_level": "4",
                "hashtype": "sha256", "destsys": "qubes://backupvm"},
    },
    {
        "name": "E2", "era": "E2 Wyng 0.2 (v0.2rc10): default/ layout, format_ver = 1, bz2 and zlib",
        "commits": "82322ec (2019-06-15) .. abfd555 v0.2rc10 (2021-05-21)",
        "archive": "wyng.backup/default",
        "voldir": "wyng.backup/default/" + VOLNAME,
        "sessions": ["S_20200312-190000", "S_20200915-190000", "S_20210218-190000"],
        "chunksize": 64 * KiB, "codecs": ["bz2", "zlib", "bz2"], "hash": "sha256",
        "layout": "bucket", "zero": "line", "manifest": "D3", "info": "v0.2rc10",
        "volinfo": 1, "lastrule": "zeros", "growth": "fill", "shrink": True, "dedup": True,
        "ini": {"chunksize": 64 * KiB, "compression": "bz2", "compr_level": "9",
                "hashtype": "sha256", "destsys": "qubes://backupvm"},
        "extras": "wyng",
    },
    {
        "name": "E3", "era": "E3 Wyng 0.3 (v0.3.8+): format_ver = 2, zstd, blake2b, 128 KiB",
        "commits": "v0.3.8 .. b5d236d v0.3.15 (2023-07)",
        "archive": "wyng.backup/default",
        "voldir": "wyng.backup/default/" + VOLNAME,
        "sessions": ["S_20221104-201500", "S_20230112-201500", "S_20230620-201500"],
        "chunksize": 128 * KiB, "codecs": ["zstd"] * 3, "hash": "blake2b",
        "layout": "bucket", "zero": "line", "manifest": "D3", "info": "v0.3",
        "volinfo": 2, "lastrule": "zeros", "growth": "fill", "shrink": True, "dedup": True,
        "ini": {"chunksize": 128 * KiB, "compression": "zstd", "compr_level": "3",
                "hashtype": "blake2b", "destsys": "qubes://backupvm"},
        "tags": {1: [("keep", "before the upgrade")]},
        "extras": "wyng",
    },
]

MANIFEST_ORDER = {
    None: None,
    "D1": "'<16hex> <sha256>' data, '<16hex> 0' zero",
    "D2": "'<sha256> x<16hex>' data, 'x<16hex> 0' zero",
    "D3": "'<digest> x<16hex>' data, '0 x<16hex>' zero",
}


def chunk_name(addr, layout):
    h = "%016x" % addr
    if layout == "flat":
        return h
    return h[:9] + "/x" + h


def last_chunk_addr(size, c):
    return (size - 1) - ((size - 1) % c)


def chunk_of(img, size, addr, c):
    return img[addr:min(addr + c, size)]


def write_kv(path, pairs, final_newline=True):
    text = "\n".join("%s = %s" % (k, v) for k, v in pairs)
    with open(path, "w") as f:
        f.write(text + ("\n" if final_newline else ""))


def make_variant(spec, images, outroot):
    """Writes one variant below outroot/<name>/ and returns its expected entry."""
    c = spec["chunksize"]
    name = spec["name"]
    vroot = os.path.join(outroot, name)
    voldir = os.path.join(vroot, spec["voldir"])
    os.makedirs(voldir)
    sources = [(images["img1"], SIZE1), (images["img2"], SIZE2)]
    if spec["shrink"]:
        sources.append((images["img3full"], SIZE3))
    else:
        sources.append((images["img3full"], SIZE2))
    seed = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)
    vol_uuid = det_uuid(seed * 7 + 1)
    stored = {}            # digest of stored bytes -> path (dedup)
    overlay = {}           # addr -> (session index, raw chunk) for self-check
    sessions_out = []
    prev_img, prev_size = None, None
    for si, sname in enumerate(spec["sessions"]):
        img, size = sources[si]
        codec = spec["codecs"][si]
        if codec == "zstd" and not have_zstd():
            codec = "zlib"
        mtime = epoch_of(sname)
        sdir = os.path.join(voldir, sname)
        os.makedirs(sdir)
        lchunk = last_chunk_addr(size, c)
        if si == 0:
            sendall = 0
        elif spec["growth"] == "fill" and size > prev_size:
            sendall = last_chunk_addr(prev_size, c) + c
        else:
            sendall = size + 1
        lines = []
        nfiles = nzero = nlinks = 0
        raw_bytes = stored_bytes = 0
        for addr in range(0, size, c):
            buf = chunk_of(img, size, addr, c)
            if addr < sendall:
                old = prev_img[addr:min(addr + c, prev_size)] if addr < prev_size else b""
                old = old + bytes(len(buf) - len(old)) if len(old) < len(buf) else old[:len(buf)]
                if buf == old:
                    continue                       # unchanged: not in this session
            is_zero = buf == bytes(c)
            if spec["lastrule"] == "always" and addr >= lchunk:
                is_zero = False                    # 57a6d02 .. v0.2alpha5: last chunk as data
            rel = chunk_name(addr, spec["layout"])
            path = os.path.join(sdir, rel)
            overlay[addr] = (si, buf)
            if is_zero:
                nzero += 1
                if spec["zero"] in ("file", "file+line"):
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    open(path, "wb").close()
                if spec["manifest"] == "D1":
                    lines.append("%016x 0" % addr)
                elif spec["manifest"] == "D2":
                    lines.append("x%016x 0" % addr)
                elif spec["manifest"] == "D3":
                    lines.append("0 x%016x" % addr)
                continue
            blob = compress(codec, buf, mtime)
            assert decompress_any(blob, len(buf)) == buf
            raw_bytes += len(buf)
            stored_bytes += len(blob)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            dg = digest(spec["hash"], blob) if spec["hash"] else hashlib.sha256(blob).hexdigest()
            if spec["dedup"] and dg in stored:
                os.link(stored[dg], path)
                nlinks += 1
            else:
                with open(path, "wb") as f:
                    f.write(blob)
                stored.setdefault(dg, path)
            nfiles += 1
            if spec["manifest"] == "D1":
                lines.append("%016x %s" % (addr, dg))
            elif spec["manifest"] in ("D2", "D3"):
                lines.append("%s x%016x" % (dg, addr))
        if spec["manifest"]:
            with open(os.path.join(sdir, "manifest"), "w") as f:
                f.write("".join(l + "\n" for l in lines))
        # info
        prev = spec["sessions"][si - 1] if si else None
        nchunks = nfiles + nzero
        localtime = sname[2:]
        kind = spec["info"]
        ipath = os.path.join(sdir, "info")
        if kind == "c490aeb":
            write_kv(ipath, [("size", size), ("previous", prev or "none")], final_newline=False)
        elif kind == "837e075":
            write_kv(ipath, [("volsize", size), ("sent", raw_bytes), ("zeros", nzero),
                             ("previous", prev or "none")])
        elif kind == "700f991":
            write_kv(ipath, [("volsize", size), ("chunksize", c), ("sent", raw_bytes),
                             ("zeros", nzero), ("previous", prev or "none")])
        elif kind == "884da86":
            write_kv(ipath, [("volsize", size), ("chunksize", c), ("chunks", nchunks),
                             ("bytes", stored_bytes), ("zeros", nzero), ("format", "folders"),
                             ("previous", prev or "none")])
        elif kind == "22b9bb2":
            write_kv(ipath, [("localtime", localtime), ("volsize", size), ("chunksize", c),
                             ("chunks", nchunks), ("bytes", stored_bytes), ("zeros", nzero),
                             ("format", "folders"), ("sequence", si),
                             ("previous", prev or "none")])
        elif kind == "v0.2alpha5":
            write_kv(ipath, [("localtime", localtime), ("volsize", size), ("format", "folders"),
                             ("sequence", si), ("previous", prev or "none")])
        elif kind == "v0.2rc10":
            write_kv(ipath, [("uuid", det_lvm_uuid(seed * 100 + si)), ("localtime", localtime),
                             ("volsize", size), ("format", "folders"), ("sequence", si),
                             ("previous", prev or "none")])
        elif kind == "v0.3":
            pairs = [("uuid", det_lvm_uuid(seed * 100 + si)), ("localtime", localtime),
                     ("volsize", size), ("format", "folders"), ("sequence", si),
                     ("previous", prev or "None")]
            for tid, tdesc in spec.get("tags", {}).get(si, []):
                pairs.append(("tag", "%s %s" % (tid, tdesc)))
            write_kv(ipath, pairs)
        elif kind is not None:
            raise ValueError(kind)

        # expected result of this session: the overlay, checked against the source
        exp_size = size if spec["info"] else max(overlay) + len(overlay[max(overlay)][1])
        vol = bytearray(exp_size)
        for a, (_, b) in overlay.items():
            if a < exp_size:
                vol[a:a + len(b)] = b[:max(0, exp_size - a)]
        vol = bytes(vol[:exp_size])
        if vol != img[:size] or exp_size != size:
            sys.exit("make-sparsebak.py: %s %s does not rebuild to its source image" % (name, sname))
        holes = [a for a in range(0, size, c) if a not in overlay]
        sessions_out.append({
            "name": sname, "id": sname[2:],
            "size": size, "sha256": hashlib.sha256(vol).hexdigest(),
            "codec": codec, "data_files": nfiles, "hard_links": nlinks, "zero_chunks": nzero,
            "manifest_lines": len(lines) if spec["manifest"] else None,
            "holes": ["%016x" % a for a in holes],
        })
        prev_img, prev_size = img, size

    # volinfo / archive.ini / extras
    first, last = spec["sessions"][0], spec["sessions"][-1]
    if spec.get("volinfo") == 1:
        write_kv(os.path.join(voldir, "volinfo"),
                 [("format_ver", 1), ("uuid", vol_uuid), ("first", first), ("last", last),
                  ("que_meta_update", "false")])
    elif spec.get("volinfo") == 2:
        write_kv(os.path.join(voldir, "volinfo"),
                 [("format_ver", 2), ("uuid", vol_uuid), ("first", first), ("last", last),
                  ("desc", ""), ("que_meta_update", "false")])
    if spec.get("archive"):
        ini = dict(spec["ini"])
        if ini["compression"] == "zstd" and not have_zstd():
            ini["compression"], ini["compr_level"] = "zlib", "4"
        cp = configparser.ConfigParser()
        cp.optionxform = str
        cp["var"] = {
            "chunksize": str(ini["chunksize"]), "compression": ini["compression"],
            "compr_level": ini["compr_level"], "hashtype": ini["hashtype"],
            "vgname": "qubes_dom0", "poolname": "pool00", "destsys": ini["destsys"],
            "destdir": ".", "destmountpoint": "/mnt/backup", "uuid": det_uuid(seed * 7 + 2),
        }
        cp["volumes"] = {VOLNAME: "enable"}
        with open(os.path.join(vroot, spec["archive"], "archive.ini"), "w") as f:
            cp.write(f)
    if spec.get("extras") in ("A", "B"):
        # local files of the 2018 tool that sit beside the volume directories:
        # the volume list and the (reset, all-zero) change map; to be ignored
        setdir = os.path.dirname(os.path.dirname(voldir))
        with open(os.path.join(setdir, "sparsebak.conf"), "w") as f:
            f.write(VOLNAME + "\n")
        mapname = VOLNAME + ("_deltamap.dat" if spec["extras"] == "A" else ".deltamap")
        with open(os.path.join(os.path.dirname(voldir), mapname), "wb") as f:
            f.write(bytes(SIZE2 // c // 8 + 1))
    if spec.get("extras") == "wyng":
        top = os.path.join(vroot, os.path.dirname(spec["archive"]))
        open(os.path.join(top, "archive.dat"), "wb").close()
        os.link(os.path.join(top, "archive.dat"), os.path.join(top, ".hardlink"))

    entry = {
        "era": spec["era"], "commits": spec["commits"],
        "path": os.path.join(name, spec["voldir"]),
        "archive": os.path.join(name, spec["archive"]) if spec.get("archive") else None,
        "volume": VOLNAME,
        "layout": "flat %016x" if spec["layout"] == "flat" else "<9hex>/x%016x",
        "chunksize": c,
        "codec": sorted(set(s["codec"] for s in sessions_out)),
        "hash": spec["hash"],
        "manifest": MANIFEST_ORDER[spec["manifest"]],
        "zero_chunk": {"file": "zero-length file", "file+line": "zero-length file and a '0' line",
                       "line": "'0' line, no file"}[spec["zero"]],
        "info": spec["info"], "volinfo_format_ver": spec.get("volinfo"),
        "latest": last,
        "sessions": sessions_out,
    }
    if not spec["shrink"]:
        entry["note"] = ("no recorded size: the session-3 volume keeps the session-2 size "
                         "(%d); a shrink could not be seen in this era" % SIZE2)
    return entry


# ---------------------------------------------------------------------------
# negative cases

BROKEN = {
    "tmp": ("C2", "an unfinished newest session S_20180913-201500-tmp (different data, no "
                  "info) beside the three good ones; must be skipped: results as C2"),
    "tmp-wyng": ("E3", "an unfinished S_20230701-201500-tmp session (manifest, chunks, info, "
                       "not in volinfo); must be skipped: results as E3"),
    "c490aeb-tmp": ("C1", "every session still named S_...-tmp, as c490aeb left them at the "
                          "destination; no finished session"),
    "missing": ("E2", "the newest session's manifest has a data line whose chunk file is "
                      "missing"),
    "digest": ("E3", "a chunk file of the newest session holds other (valid zstd, right "
                     "length) data than its manifest digest says"),
    "length": ("D1", "a non-last chunk of the newest session decompresses to chunksize - "
                     "4096 bytes; its manifest digest matches the file"),
    "gzip-crc": ("C3", "a gzip chunk of the newest session has a wrong CRC-32 in its trailer "
                       "(no manifest in this era: only the codec check can see it)"),
    "encrypted": (None, "a Wyng V3 archive.ini '[WYNG03]\\nci = 35\\n' + random bytes: "
                        "encrypted, must be refused"),
    "unknown-version": (None, "archive.ini '[WYNG09]\\nci = 00\\n' + a gzip body: "
                              "unknown format version, must be refused"),
}


def _copytree(src, dst):
    """Copy a tree keeping hard links (dedup chunks) as hard links."""
    seen = {}
    for root, dirs, files in os.walk(src):
        rel = os.path.relpath(root, src)
        os.makedirs(os.path.join(dst, rel), exist_ok=True)
        for fn in sorted(files):
            s = os.path.join(root, fn)
            d = os.path.join(dst, rel, fn)
            st = os.lstat(s)
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in seen:
                os.link(seen[key], d)
            else:
                shutil.copy2(s, d)
                seen[key] = d


def _newest_data_chunk(voldir, session, manifest_kind, nonlast=True, size=None, c=None):
    """(addr, relpath, digest) of a data chunk of `session` (by manifest or files)."""
    sdir = os.path.join(voldir, session)
    cands = []
    if os.path.exists(os.path.join(sdir, "manifest")):
        for line in open(os.path.join(sdir, "manifest")):
            a, b = line.split()
            if manifest_kind == "D1":
                addr, dg = int(a, 16), b
            else:
                dg, addr = a, int(b.lstrip("x"), 16)
            if dg != "0":
                cands.append((addr, dg))
    else:
        for root, _, files in os.walk(sdir):
            for fn in files:
                if fn.startswith("x") and os.path.getsize(os.path.join(root, fn)):
                    cands.append((int(fn[1:], 16), None))
    cands.sort()
    if nonlast:
        lca = last_chunk_addr(size, c)
        cands = [x for x in cands if x[0] < lca]
    addr, dg = cands[0]
    return addr, chunk_name(addr, "bucket"), dg


def make_broken(kind, good_root, good_expected, out):
    base, what = BROKEN[kind]
    bdir = os.path.join(out, "broken", kind)
    if os.path.exists(bdir):
        shutil.rmtree(bdir)
    os.makedirs(bdir)
    exp = {"kind": kind, "what": what, "base": base,
           "paths": "relative to the output folder that holds broken/"}
    spec = {v["name"]: v for v in VARIANTS}.get(base)
    if base:
        _copytree(os.path.join(good_root, base), os.path.join(bdir, base))
        bexp = good_expected[base]
        exp["path"] = os.path.join("broken", kind, bexp["path"])
        exp["archive"] = os.path.join("broken", kind, bexp["archive"]) if bexp["archive"] else None
        exp["volume"] = bexp["volume"]
        voldir = os.path.join(bdir, base, spec["voldir"])
        newest = spec["sessions"][-1]
        c = spec["chunksize"]
        size = bexp["sessions"][-1]["size"]
        mt = epoch_of(newest)
    if kind in ("tmp", "tmp-wyng"):
        tname = "S_20180913-201500-tmp" if kind == "tmp" else "S_20230701-201500-tmp"
        tdir = os.path.join(voldir, tname)
        codec = spec["codecs"][-1]
        if codec == "zstd" and not have_zstd():
            codec = "zlib"
        junk = b"unfinished session: must not be read\n" * (c // 38 + 1)
        lines = []
        for addr in (0, c, 2 * c):
            blob = compress(codec, junk[:c], mt)
            p = os.path.join(tdir, chunk_name(addr, "bucket"))
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "wb") as f:
                f.write(blob)
            if spec["hash"]:
                lines.append("%s x%016x" % (digest(spec["hash"], blob), addr))
        if kind == "tmp-wyng":
            with open(os.path.join(tdir, "manifest"), "w") as f:
                f.write("".join(l + "\n" for l in lines))
            write_kv(os.path.join(tdir, "info"),
                     [("uuid", det_lvm_uuid(999)), ("localtime", tname[2:17]),
                      ("volsize", size), ("format", "folders"), ("sequence", 3),
                      ("previous", newest)])
        exp["expect"] = "ok"
        exp["sessions"] = bexp["sessions"]
        exp["latest"] = bexp["latest"]
    elif kind == "c490aeb-tmp":
        for s in spec["sessions"]:
            os.rename(os.path.join(voldir, s), os.path.join(voldir, s + "-tmp"))
        exp["expect"] = "error"
        exp["error"] = "no finished session (only S_...-tmp directories)"
        exp["sessions_if_tmp_allowed"] = bexp["sessions"]
    elif kind == "missing":
        addr, rel, dg = _newest_data_chunk(voldir, newest, "D3", True, size, c)
        os.unlink(os.path.join(voldir, newest, rel))
        exp["expect"] = "error"
        exp["error"] = "%s: manifest line for x%016x has no chunk file" % (newest, addr)
        exp["bad_sessions"] = [newest]
        exp["good_sessions"] = bexp["sessions"][:-1]
    elif kind == "digest":
        addr, rel, dg = _newest_data_chunk(voldir, newest, "D3", True, size, c)
        p = os.path.join(voldir, newest, rel)
        raw = bytearray(decompress_any(open(p, "rb").read(), c))
        raw[100] ^= 0x20
        os.unlink(p)                       # may be a hard link: do not touch the other name
        with open(p, "wb") as f:
            f.write(compress(spec["codecs"][-1] if have_zstd() else "zlib", bytes(raw), mt))
        exp["expect"] = "error"
        exp["error"] = "%s: x%016x: digest mismatch (%s)" % (newest, addr, spec["hash"])
        exp["bad_sessions"] = [newest]
        exp["good_sessions"] = bexp["sessions"][:-1]
    elif kind == "length":
        addr, rel, dg = _newest_data_chunk(voldir, newest, "D1", True, size, c)
        p = os.path.join(voldir, newest, rel)
        raw = decompress_any(open(p, "rb").read(), c)[:c - 4096]
        blob = compress("gzip", raw, mt)
        os.unlink(p)
        with open(p, "wb") as f:
            f.write(blob)
        mpath = os.path.join(voldir, newest, "manifest")
        lines = open(mpath).read().splitlines()
        lines = ["%016x %s" % (addr, hashlib.sha256(blob).hexdigest())
                 if l.startswith("%016x " % addr) else l for l in lines]
        with open(mpath, "w") as f:
            f.write("".join(l + "\n" for l in lines))
        exp["expect"] = "error"
        exp["error"] = "%s: x%016x decompresses to %d bytes, not %d" % (newest, addr, c - 4096, c)
        exp["bad_sessions"] = [newest]
        exp["good_sessions"] = bexp["sessions"][:-1]
    elif kind == "gzip-crc":
        addr, rel, dg = _newest_data_chunk(voldir, newest, None, True, size, c)
        p = os.path.join(voldir, newest, rel)
        blob = bytearray(open(p, "rb").read())
        blob[-8] ^= 0xff                    # CRC-32 in the gzip trailer
        os.unlink(p)
        with open(p, "wb") as f:
            f.write(bytes(blob))
        exp["expect"] = "error"
        exp["error"] = "%s: x%016x: gzip CRC error" % (newest, addr)
        exp["bad_sessions"] = [newest]
        exp["good_sessions"] = bexp["sessions"][:-1]
    elif kind == "encrypted":
        arch = os.path.join(bdir, "wyng-encrypted")
        os.makedirs(arch)
        rnd = _rbytes(35, 240)
        with open(os.path.join(arch, "archive.ini"), "wb") as f:
            f.write(b"[WYNG03]\nci = 35\n" + rnd)
        open(os.path.join(arch, "archive.dat"), "wb").close()
        exp["archive"] = os.path.join("broken", kind, "wyng-encrypted")
        exp["path"] = exp["archive"]
        exp["volume"] = None
        exp["expect"] = "error"
        exp["error"] = "encrypted Wyng archive (ci = 35, xchacha20-dgr): refuse"
    elif kind == "unknown-version":
        arch = os.path.join(bdir, "wyng-v9")
        os.makedirs(arch)
        body = gzip.compress(b"[var]\nformat_ver = 9\n\n[volumes]\n\n", mtime=0)
        with open(os.path.join(arch, "archive.ini"), "wb") as f:
            f.write(b"[WYNG09]\nci = 00\n" + body)
        exp["archive"] = os.path.join("broken", kind, "wyng-v9")
        exp["path"] = exp["archive"]
        exp["volume"] = None
        exp["expect"] = "error"
        exp["error"] = "unknown Wyng archive format [WYNG09]: refuse"
    with open(os.path.join(bdir, "expected.json"), "w") as f:
        json.dump(exp, f, indent=1, sort_keys=True)
        f.write("\n")
    return exp


# ---------------------------------------------------------------------------


def build_good(out, work):
    epochs = [epoch_of(s) for s in ("S_20240102-030405", "S_20240103-030405",
                                    "S_20240104-030405")]
    images = ImageBuilder(work).build(epochs)
    expected = {}
    for spec in VARIANTS:
        expected[spec["name"]] = make_variant(spec, images, out)
    meta = {
        "generator": "testdata/make-sparsebak.py",
        "notes": "/work/shared/formats/sparsebak-wyng.md",
        "zstd": ZSTD_NOTE if have_zstd() else "not available: E3 written with zlib",
        "source_images": {
            "session1": {"size": SIZE1, "sha256": hashlib.sha256(images["img1"]).hexdigest()},
            "session2": {"size": SIZE2, "sha256": hashlib.sha256(images["img2"]).hexdigest()},
            "session3": {"size": SIZE3,
                         "sha256": hashlib.sha256(images["img3full"][:SIZE3]).hexdigest()},
            "session3_unshrunk": {"size": SIZE2,
                                  "sha256": hashlib.sha256(images["img3full"]).hexdigest()},
        },
        "paths": "relative to the folder of this file",
    }
    return expected, meta


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir", nargs="?")
    ap.add_argument("--broken", help="comma-separated negative cases, or 'all'")
    ap.add_argument("--from", dest="from_dir", help="existing good output to copy bases from")
    ap.add_argument("--list-broken", action="store_true")
    args = ap.parse_args(argv)
    if args.list_broken:
        for k, (base, what) in BROKEN.items():
            print("%-16s base %-4s %s" % (k, base or "-", what))
        return 0
    if not args.outdir:
        ap.error("OUTDIR is required")
    out = os.path.abspath(args.outdir)
    kinds = None
    if args.broken:
        kinds = list(BROKEN) if args.broken == "all" else args.broken.split(",")
        for k in kinds:
            if k not in BROKEN:
                ap.error("unknown negative case %r (see --list-broken)" % k)
    os.umask(0o022)
    with tempfile.TemporaryDirectory(prefix="make-sparsebak.") as work:
        if kinds is None:
            if os.path.exists(out) and os.listdir(out):
                sys.exit("make-sparsebak.py: %s is not empty" % out)
            os.makedirs(out, exist_ok=True)
            expected, meta = build_good(out, os.path.join(work, "img"))
            broken = {}
            for k in BROKEN:
                broken[k] = make_broken(k, out, expected, out)
            doc = {"_about": meta, "variants": expected, "broken": broken}
            with open(os.path.join(out, "expected.json"), "w") as f:
                json.dump(doc, f, indent=1, sort_keys=True)
                f.write("\n")
        else:
            if args.from_dir:
                good = os.path.abspath(args.from_dir)
                with open(os.path.join(good, "expected.json")) as f:
                    expected = json.load(f)["variants"]
            else:
                good = os.path.join(work, "good")
                os.makedirs(good)
                expected, _ = build_good(good, os.path.join(work, "img"))
            os.makedirs(out, exist_ok=True)
            for k in kinds:
                make_broken(k, good, expected, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
