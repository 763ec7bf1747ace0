#!/usr/bin/env python3
"""make bench: vimage side by side with its peers, on one multi-GB image, in one run.

Builds (once, as root, under $BENCH_DIR, default build/bench) a 4 GiB ext4
file system holding ~3.3 GB of files, saves it with Debian's partclone
(CRC32), and a 2 TiB nearly empty ext4 whose partclone image has a 64 MiB
bitmap.  Peers: imagebackup 0.2.2 (vpartclone) in its own venv, partclone's
chkimg/restore, and a bare zlib.crc32 pass.  Prints a Markdown table of
seconds and ratios.  Timings are taken with the image in the page cache.
"""
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import vimage  # noqa: E402

BENCH = os.path.abspath(os.environ.get("BENCH_DIR", os.path.join(ROOT, "build", "bench")))
PY = sys.executable
VIMAGE = os.path.join(ROOT, "vimage.py")
IMG = os.path.join(BENCH, "bench.ptcl-img")
IMG_XXH = os.path.join(BENCH, "bench-xxh128.ptcl-img")
BIG = os.path.join(BENCH, "big2t.ptcl-img")
IB = os.path.join(BENCH, "ibvenv", "bin")


def sh(cmd, **kw):
    return subprocess.run(cmd, shell=isinstance(cmd, str), check=True, **kw)


def quiet(cmd):
    return subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def warm(path):
    with open(path, "rb") as f:
        while f.read(16 << 20):
            pass


def build():
    os.makedirs(BENCH, exist_ok=True)
    if not os.path.exists(IMG):
        fs = os.path.join(BENCH, "fs.raw")
        mnt = os.path.join(BENCH, "mnt")
        os.makedirs(mnt, exist_ok=True)
        sh(["truncate", "-s", "4G", fs])
        sh(["mkfs.ext4", "-q", "-F", "-b", "4096", fs])
        sh(["mount", "-o", "loop", fs, mnt])
        try:
            text = b"".join(b"%08d the quick brown fox jumps over the lazy dog %d\n" % (i, i * 7)
                            for i in range(20000))[:1 << 20]
            for i in range(48):
                with open(os.path.join(mnt, "f%02d.bin" % i), "wb") as f:
                    for j in range(64):
                        f.write(os.urandom(1 << 20) if (i + j) % 2 else text)
        finally:
            sh(["umount", mnt])
        sh(["partclone.ext4", "-c", "-s", fs, "-O", IMG, "-L", os.path.join(BENCH, "clone.log")],
           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.unlink(fs)
    if not os.path.exists(IMG_XXH):
        to_xxh128(IMG, IMG_XXH)
    if not os.path.exists(BIG):
        raw = os.path.join(BENCH, "big.raw")
        sh(["truncate", "-s", "2T", raw])
        sh(["mkfs.ext4", "-q", "-F", "-b", "4096", "-N", "65536", "-J", "size=16",
            "-E", "lazy_itable_init=1,lazy_journal_init=1", raw])
        sh(["partclone.ext4", "-c", "-s", raw, "-O", BIG, "-L", os.path.join(BENCH, "big.log")],
           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.unlink(raw)
    if not os.path.exists(os.path.join(IB, "vpartclone")):
        sh([sys.executable, "-m", "venv", os.path.join(BENCH, "ibvenv")])
        sh([os.path.join(IB, "pip"), "install", "-q", "imagebackup==0.2.2"])


def to_xxh128(src, dst):
    """The CRC32 bench image re-checksummed with XXH128 (partclone 0.3.47's
    layout; Debian's partclone cannot write it).  Used only for timing."""
    import xxhash
    img = vimage.open_image(src)
    bs, bpc = img.block_size, img.bpc
    with open(src, "rb") as f:
        head = bytearray(f.read(110))
    head[96:106] = (b"\x31\x00\x10\x00" + bpc.to_bytes(4, "little") + b"\x01\x01")
    head[106:110] = vimage.crc32_partclone(bytes(head[:106])).to_bytes(4, "little")
    with open(src, "rb") as f, open(dst, "wb") as out:
        f.seek(110)
        out.write(head)
        out.write(f.read(img.data_start - 110))
        left = img.used_blocks
        while left:
            n = min(bpc, left)
            data = f.read(n * bs)
            f.read(4)
            out.write(data)
            out.write(xxhash.xxh3_128(data).intdigest().to_bytes(16, "little"))
            left -= n
    img.stream.close()


def crc_pass(path):
    fd = os.open(path, os.O_RDONLY)
    c, off = 0, 0
    while True:
        b = os.pread(fd, 8 << 20, off)
        if not b:
            break
        c = zlib.crc32(b, c)
        off += len(b)
    os.close(fd)


def read_seq(path, bs=1 << 20):
    fd = os.open(path, os.O_RDONLY)
    while os.read(fd, bs):
        pass
    os.close(fd)


def drop_cache(path):
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def random_reads(path, n=2000, seed=1):
    size = os.path.getsize(path)
    rnd = random.Random(seed)
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    lat = []
    for _ in range(n):
        off = rnd.randrange(0, size // 4096) * 4096
        t = time.perf_counter()
        os.pread(fd, 4096, off)
        lat.append(time.perf_counter() - t)
    os.close(fd)
    lat.sort()
    return sum(lat), lat[len(lat) // 2], lat[int(len(lat) * 0.99)]


def wait_file(path, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        if os.path.exists(path):
            return
        time.sleep(0.05)
    raise RuntimeError("%s did not appear" % path)


class Mounted:
    """A fresh mount by vimage or by vpartclone."""

    def __init__(self, tool, image, mp):
        self.tool, self.mp = tool, mp
        os.makedirs(mp, exist_ok=True)
        name = os.path.basename(image)
        self.file = os.path.join(mp, name)
        t = time.perf_counter()
        if tool == "vimage":
            sh([PY, VIMAGE, "mount", "-q", image, mp], stdout=subprocess.DEVNULL)
        else:
            self.proc = subprocess.Popen([os.path.join(IB, "vpartclone"), "-q", "-m", mp, image],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_file(self.file)
        self.mount_time = time.perf_counter() - t

    def close(self):
        if self.tool == "vimage":
            sh([PY, VIMAGE, "umount", "-q", self.mp])
        else:
            quiet(["umount", self.mp])
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def peak_rss_of_mount(image, mp):
    """Peak RSS (KiB) of `vimage mount` (it builds the index, then forks)."""
    os.makedirs(mp, exist_ok=True)
    out = subprocess.run(["/usr/bin/time", "-f", "%M %e", PY, VIMAGE, "mount", "-q", image, mp],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=True)
    kib, secs = out.stderr.decode().split()[-2:]
    sh([PY, VIMAGE, "umount", "-q", mp])
    return int(kib), float(secs)


COMPRESSED = [  # (suffix, command that makes it, plain decompressor command, random-read target)
    ("gz", "pigz -c", "gzip -dc", True),
    ("zst", "zstd -q -T0 -c", "zstd -dc", False),
    ("xz", "xz -T2 -c", "xz -dc", True),
    ("bz2", "lbzip2 -n 2 -c", "bzip2 -dc", True),
    ("lz4", "lz4 -q -c", "lz4 -dc", True),
]


def mount_timed(image, mp, *opts):
    """(seconds to a usable file, peak RSS KiB of the mount command)."""
    os.makedirs(mp, exist_ok=True)
    out = subprocess.run(["/usr/bin/time", "-f", "%M %e", PY, VIMAGE, "mount", "-q"] + list(opts)
                         + [image, mp], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         check=True)
    kib, secs = out.stderr.decode().split()[-2:]
    return float(secs), int(kib)


def compressed_bench():
    """Issue: mount compressed images in place (pass, reads, memory, re-mount)."""
    mp = os.path.join(BENCH, "mp")
    cache = os.path.join(BENCH, "cache")
    print()
    print("| codec | plain decompressor to /dev/null | index pass (mount) | pass / decompressor "
          "| sequential read of the mount | random 4 KiB p50 / p99 | peak RSS of mount | "
          "mount again with saved index |")
    print("|---|---|---|---|---|---|---|---|")
    only = sys.argv[2:]                   # e.g. `bench.py compressed xz gz`
    for suffix, make, plain, _rand in COMPRESSED:
        if only and suffix not in only:
            continue
        path = IMG + "." + suffix
        if not os.path.exists(path):
            sh("%s %s > %s" % (make, IMG, path))
        warm(path)
        t_plain = timed(lambda: sh("%s %s > /dev/null" % (plain, path)))
        shutil.rmtree(cache, ignore_errors=True)
        t_pass, rss = mount_timed(path, mp, "--cache-dir", cache)
        vfile = os.path.join(mp, "bench.ptcl-img")
        try:
            t_seq = timed(lambda: read_seq(vfile))
            _total, p50, p99 = random_reads(vfile, n=300)
        finally:
            sh([PY, VIMAGE, "umount", "-q", mp])
        t_again, _ = mount_timed(path, mp, "--cache-dir", cache) if suffix != "zst" else (None, 0)
        if suffix != "zst":
            sh([PY, VIMAGE, "umount", "-q", mp])
        print("| %s (`%s`) | %.1f s | %.1f s | %.2fx | %.1f s | %.1f / %.1f ms | %.0f MiB | %s |" % (
            suffix, make, t_plain, t_pass, t_pass / t_plain, t_seq, p50 * 1e3, p99 * 1e3,
            rss / 1024.0, "%.2f s" % t_again if t_again is not None else
            "n/a (cache file, removed at unmount)"), flush=True)
    shutil.rmtree(cache, ignore_errors=True)


def main():
    if os.geteuid() != 0:
        sys.exit("make bench needs root (loop mounts, FUSE)")
    build()
    if sys.argv[1:2] == ["compressed"]:
        compressed_bench()
        return
    rows = []

    def row(what, ours, peer_name, peer):
        ratio = peer / ours if ours else float("inf")
        rows.append((what, ours, peer_name, peer, ratio))
        print("| %s | %.2f s | %s | %.2f s | %.2fx |" % rows[-1], flush=True)

    size = os.path.getsize(IMG)
    print("image: %s, %.2f GB, %s" % (IMG, size / 1e9, json.dumps({
        k: v for k, v in vimage.open_image(IMG).info().items()
        if k in ("checksum", "blocks_per_checksum", "block_size", "used_blocks")})))
    print("| what | vimage | peer | peer time | peer / vimage |")
    print("|---|---|---|---|---|")
    warm(IMG)
    t_crc = min(timed(lambda: crc_pass(IMG)) for _ in range(2))
    t_verify = min(timed(lambda: sh([PY, VIMAGE, "verify", "-q", IMG], stdout=subprocess.DEVNULL))
                   for _ in range(2))
    row("verify CRC32 (vs bare zlib.crc32 pass; target: vimage <= 1.5x)", t_verify,
        "zlib.crc32 pass", t_crc)
    row("verify CRC32 (target >= 5x)", t_verify, "vpartclone -c",
        timed(lambda: sh([os.path.join(IB, "vpartclone"), "-c", "-q", IMG],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
    row("verify CRC32 (target >= 5x)", t_verify, "partclone.chkimg",
        timed(lambda: sh(["partclone.chkimg", "-s", IMG, "-L", os.path.join(BENCH, "chk.log")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
    warm(IMG_XXH)
    t_xxh = min(timed(lambda: sh([PY, VIMAGE, "verify", "-q", IMG_XXH], stdout=subprocess.DEVNULL))
                for _ in range(2))
    row("verify XXH128 with xxhash (vs vimage CRC32; target <= 2x)", t_xxh,
        "vimage verify CRC32", t_verify)
    out = os.path.join(BENCH, "out.raw")
    ref = os.path.join(BENCH, "ref.raw")
    for p in (out, ref):
        if os.path.exists(p):
            os.unlink(p)
    t_extract = timed(lambda: sh([PY, VIMAGE, "extract", "-q", IMG, out]))
    sh(["truncate", "-s", str(vimage.open_image(IMG).size), ref])
    t_restore = timed(lambda: sh(["partclone.restore", "-C", "-s", IMG, "-O", ref, "-L",
                                  os.path.join(BENCH, "restore.log")],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    row("extract to sparse file (target >= 1x)", t_extract, "partclone.restore", t_restore)
    same = subprocess.run(["cmp", out, ref]).returncode == 0
    print("extract output equals partclone.restore output: %s" % same)

    # --- mount ----------------------------------------------------------
    mp = os.path.join(BENCH, "mp")
    seq = {}
    for tool in ("vimage", "vpartclone"):
        m = Mounted(tool, IMG, mp)
        try:
            seq[tool] = timed(lambda: read_seq(m.file))
        finally:
            m.close()
    row("mount: sequential read, fresh mount (target >= 3x)", seq["vimage"], "vpartclone mount",
        seq["vpartclone"])
    warm(out)
    t_raw_warm = timed(lambda: read_seq(out))
    drop_cache(out)
    t_raw_cold = timed(lambda: read_seq(out))
    row("mount: sequential read (target: vimage <= 2x)", seq["vimage"],
        "restored raw file, page cache", t_raw_warm)
    row("mount: sequential read (target: vimage <= 2x)", seq["vimage"],
        "restored raw file, cold cache", t_raw_cold)
    rand = {}
    for tool in ("vimage", "vpartclone"):
        m = Mounted(tool, IMG, mp)
        try:
            rand[tool] = random_reads(m.file)
        finally:
            m.close()
    row("mount: 2000 random 4 KiB reads (target >= 5x)", rand["vimage"][0], "vpartclone mount",
        rand["vpartclone"][0])
    print("random 4 KiB read latency p50/p99: vimage %.2f/%.2f ms, vpartclone %.2f/%.2f ms" % (
        rand["vimage"][1] * 1e3, rand["vimage"][2] * 1e3,
        rand["vpartclone"][1] * 1e3, rand["vpartclone"][2] * 1e3))
    warm(BIG)
    big = vimage.open_image(BIG)
    kib, secs = peak_rss_of_mount(BIG, mp)
    idx = vimage.RankIndex(big.bitmap, big.total_blocks)
    print("mount of a 2 TiB ext4 image (%d MiB bitmap): %.2f s to a usable file (target < 2 s), "
          "peak RSS of the mount process %.0f MiB, rank index %.2f MiB" % (
              len(big.bitmap) >> 20, secs, kib / 1024.0, idx.nbytes() / 1048576.0))
    m = Mounted("vpartclone", BIG, mp)
    print("vpartclone on the same image: %.2f s to a usable file" % m.mount_time)
    m.close()
    big.stream.close()
    print("max RSS of this bench process: %.0f MiB" % (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0))
    for p in (out, ref):
        os.unlink(p)
    compressed_bench()


if __name__ == "__main__":
    main()
