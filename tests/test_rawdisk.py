"""Whole-disk raw (dd) images: partition tables, partitions as virtual files,
extract --partition, --files.  The disks were made by sfdisk, sgdisk and mkfs
(testdata/make-rawdisk.sh); the truth of each partition is its bytes cut
from the disk at the offsets sfdisk reports (testdata/rawdisk/expected.json)."""
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import (TESTDATA, assert_clean_error, files_records, have, mounted, needs_fuse, run,
                      sha256_file)

import vimage

RAWDISK = os.path.join(TESTDATA, "rawdisk")
with open(os.path.join(RAWDISK, "expected.json")) as f:
    TRUTH = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
DISKS = sorted(k for k in TRUTH if TRUTH[k]["partitions"])
ALL = sorted(TRUTH)


@pytest.fixture(scope="module")
def disks(tmp_path_factory):
    """The disks, uncompressed, once per test module."""
    d = tmp_path_factory.mktemp("rawdisk")
    for name in ALL:
        with gzip.open(os.path.join(RAWDISK, name + ".gz")) as fin, open(d / name, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
        assert sha256_file(d / name) == TRUTH[name]["sha256"]
    return d


def info_json(*args):
    proc = run("info", "--json", *args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def served(parts):
    """The partitions vimage serves: not the extended container."""
    return [p for p in parts if p.get("kind") != "extended"]


@pytest.mark.parametrize("name", DISKS)
def test_info_matches_sfdisk(name, disks):
    t = TRUTH[name]
    d = info_json(disks / name)
    assert d["format"] == "raw" and d["table"] == t["label"]
    assert d["sector_size"] == t["sector_size"] and d["disk_size"] == t["size"]
    sf = t["sfdisk_json"]["partitiontable"]
    assert d["disk_id"].lower() == sf["id"].lower()
    got = {p["number"]: p for p in d["partitions"]}
    assert sorted(got) == sorted(p["number"] for p in t["partitions"])
    for want in t["partitions"]:
        p = got[want["number"]]
        assert (p["start"], p["size"]) == (want["start"], want["size"]), want["number"]
        if t["label"] == "gpt":
            assert p["type"] == want["type"] and p["name"] == want["name"]
        else:
            assert int(p["type"], 16) == int(want["type"], 16)
            assert p["kind"] == want["kind"] and p["bootable"] == want["bootable"]
        assert p["filesystem"] == want["filesystem"], want["number"]
        if want.get("fs_size") and p["filesystem"] not in ("swap",):
            assert p["filesystem_size"] == want["fs_size"], want["number"]
    # sfdisk's own view, entry by entry (in sectors)
    ss = t["sector_size"]
    for e in sf["partitions"]:
        n = int(e["node"][len(sf["device"]):].lstrip("p"))
        assert got[n]["start"] == e["start"] * ss and got[n]["size"] == e["size"] * ss


def test_hybrid_mbr_is_reported(disks):
    t = TRUTH["hybrid.img"]
    d = info_json(disks / "hybrid.img")
    assert d["table"] == "gpt"
    hybrid = {(h["start"], h["size"]) for h in d["hybrid_mbr"]}
    want = {(p["start"], p["size"]) for p in t["mbr_partitions"] if int(str(p["type"]), 16) != 0xEE} \
        if "mbr_partitions" in t else None
    if want:
        assert hybrid == want
    assert len(hybrid) == 3


@pytest.mark.parametrize("name", ["fsonly.img", "iso.img"])
def test_bare_file_system(name, disks):
    t = TRUTH[name]
    d = info_json(disks / name)
    assert d["format"] == "raw" and "partitions" not in d
    assert d["filesystem"] == t["filesystem"] and d["filesystem_size"] == t["fs_size"]
    # also from a compressed stream, whose size is otherwise unknown
    d = info_json(os.path.join(RAWDISK, name + ".gz"))
    assert d["size"] is None and d["filesystem_size"] == t["fs_size"]


@pytest.mark.parametrize("name", DISKS)
def test_extract_partition_equals_truth(name, disks, tmp_path):
    t = TRUTH[name]
    for want in served(t["partitions"]):
        out = tmp_path / ("p%d" % want["number"])
        proc = run("extract", "-q", "--partition", want["number"], disks / name, out)
        assert proc.returncode == 0, proc.stderr
        assert sha256_file(out) == want["sha256"], want["number"]
    # the whole disk, by default
    assert run("extract", "-q", disks / name, tmp_path / "whole").returncode == 0
    assert sha256_file(tmp_path / "whole") == t["sha256"]


def test_extract_partition_from_compressed_disk(tmp_path):
    t = TRUTH["mbr.img"]
    gz = os.path.join(RAWDISK, "mbr.img.gz")
    for want in served(t["partitions"]):
        out = tmp_path / ("p%d" % want["number"])
        assert run("extract", "-q", "--partition", want["number"], gz, out).returncode == 0
        assert sha256_file(out) == want["sha256"], want["number"]
    proc = run("extract", "-q", "--partition", "4", gz, tmp_path / "none")
    assert_clean_error(proc)
    assert b"no partition 4" in proc.stderr


def test_compressed_and_split_disk_info(tmp_path):
    """The table is read through the decompressor and across split pieces."""
    t = TRUTH["mbr.img"]
    gz = os.path.join(RAWDISK, "mbr.img.gz")
    subprocess.run(["split", "-a", "2", "-b", "300000", gz, str(tmp_path / "mbr.img.gz.")],
                   check=True)
    for path in (gz, tmp_path / "mbr.img.gz.aa"):
        d = info_json(path)
        assert d["compression"] == "gzip" and d["table"] == "dos"
        got = [(p["number"], p["start"], p["size"], p["filesystem"]) for p in d["partitions"]]
        assert got == [(p["number"], p["start"], p["size"], p["filesystem"])
                       for p in sorted(t["partitions"], key=lambda p: (p["kind"] == "logical",
                                                                      p["number"]))]


def test_api_slices_read_like_the_truth(disks):
    """Random reads of every partition slice equal the bytes cut from the disk."""
    import random
    for name in DISKS:
        backup = vimage.open_backup(str(disks / name))
        ctx = vimage.OpenContext(quiet=True)
        try:
            data = open(disks / name, "rb").read()
            rnd = random.Random(name)
            for m in backup.partitions():
                r = m.reader(ctx)
                assert r.size == m.entry.size
                for _ in range(30):
                    off = rnd.randrange(r.size)
                    n = rnd.choice([1, 511, 4096, 70000])
                    assert r.read(off, n) == data[m.start + off:m.start + min(off + n, r.size)]
        finally:
            ctx.close()
            backup.close()


@needs_fuse
@pytest.mark.parametrize("name", ["mbr.img", "gpt.img", "gpt4k.img"])
def test_mount_serves_disk_and_partitions(name, disks, mnt):
    t = TRUTH[name]
    proc = run("mount", disks / name, mnt)
    assert proc.returncode == 0, proc.stderr
    names = sorted(os.listdir(mnt))
    want = sorted([name] + ["%s-part%d" % (name, p["number"]) for p in served(t["partitions"])])
    assert names == want
    assert sha256_file(mnt / name) == t["sha256"]
    for p in served(t["partitions"]):
        assert sha256_file(mnt / ("%s-part%d" % (name, p["number"]))) == p["sha256"]
    assert run("umount", mnt).returncode == 0


@needs_fuse
def test_mount_compressed_disk(mnt):
    t = TRUTH["gpt4k.img"]
    proc = run("mount", os.path.join(RAWDISK, "gpt4k.img.gz"), mnt)
    assert proc.returncode == 0, proc.stderr
    assert sha256_file(mnt / "gpt4k.img") == t["sha256"]
    for p in served(t["partitions"]):
        assert sha256_file(mnt / ("gpt4k.img-part%d" % p["number"])) == p["sha256"]


def mktree(tmp_path, small=False):
    src = tmp_path / ("src-small" if small else "src")
    if not src.exists():
        subprocess.run([sys.executable, os.path.join(TESTDATA, "mktree.py"), str(src)], check=True)
        if small:
            for drop in ("text", "bin", "nested/a/b/sibling.bin"):
                p = src / drop
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    return src


def same_tree(src, dst):
    n = 0
    for dirpath, _dirs, files in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as a, open(os.path.join(dst, rel, f), "rb") as b:
                assert a.read() == b.read(), os.path.join(rel, f)
            n += 1
    assert n >= 3


@needs_fuse
def test_files_mounts_every_partition(disks, tmp_path, mnt):
    t = TRUTH["mbr.img"]
    proc = run("mount", "--files", disks / "mbr.img", mnt)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.decode()
    assert sorted(os.listdir(mnt)) == ["part1", "part3", "part5", "part6", "part7"]
    for p in t["partitions"]:
        if p["filesystem"] in ("ext4", "ext2"):
            same_tree(mktree(tmp_path, p["tree"] == "small"), mnt / ("part%d" % p["number"]))
            assert "mnt/part%d (mounted with: mount -t ext" % p["number"] in out
    assert os.listdir(mnt / "part5")                       # FAT, through fusefat
    assert "skipped: " in out and "mbr.img-part6 (swap" in out
    assert not os.listdir(mnt / "part6")
    with pytest.raises(OSError):
        os.mkdir(mnt / "new")
    loops = subprocess.run(["losetup", "-a"], stdout=subprocess.PIPE).stdout
    assert run("umount", mnt).returncode == 0
    assert not mounted(mnt) and not os.listdir(mnt)
    after = subprocess.run(["losetup", "-a"], stdout=subprocess.PIPE).stdout
    assert len(after.splitlines()) <= len(loops.splitlines()) - 3
    assert not files_records(mnt)


@pytest.mark.parametrize("damage", ["outside", "overlap", "ebr-loop"])
def test_bad_tables_are_reported_not_trusted(damage, disks, tmp_path):
    data = bytearray(open(disks / "mbr.img", "rb").read())
    import struct
    if damage == "outside":         # partition 1 made to end past the disk
        struct.pack_into("<I", data, 446 + 12, 10 ** 6)
    elif damage == "overlap":       # partition 3 moved onto partition 1
        struct.pack_into("<I", data, 446 + 2 * 16 + 8, 4096)
    else:                           # the second EBR links back to the first
        ebr2 = TRUTH["mbr.img"]["partitions"][4]["start"] - 2048 * 512
        struct.pack_into("<I", data, ebr2 + 446 + 16 + 8, 0)
    bad = tmp_path / "bad.img"
    bad.write_bytes(bytes(data))
    d = info_json(bad)
    assert d["problems"], d
    text = " ".join(d["problems"])
    assert {"outside": "past the disk", "overlap": "overlaps", "ebr-loop": "loops"}[damage] in text
    # what is wrong is not served
    names = [m.name for m in vimage.open_backup(str(bad)).members]
    if damage == "outside":
        assert "bad.img-part1" not in names
    if damage == "overlap":
        assert "bad.img-part3" not in names


# --- what people keep beside a dd image: sidecars, sums lists, par2 ------------

def keep_like_a_user(disks, tmp_path, name="mbr.img"):
    """dd image + `sha224sum > .sha224` + a BSD-tag SHA256SUMS + `par2 c -r15`."""
    if not (have("par2") and have("sha224sum")):
        pytest.skip("needs par2 and coreutils")
    d = tmp_path / "backup"
    d.mkdir()
    shutil.copy(disks / name, d / "disk.img")
    subprocess.run("sha224sum disk.img > disk.img.sha224 && sha256sum --tag disk.img > SHA256SUMS"
                   " && par2 c -q -q -r15 disk.img", shell=True, cwd=str(d), check=True,
                   stdout=subprocess.DEVNULL)
    return d


def test_verify_checks_sidecars_and_par2(disks, tmp_path):
    d = keep_like_a_user(disks, tmp_path)
    proc = run("verify", "-q", d / "disk.img")
    out = proc.stdout.decode()
    assert proc.returncode == 0, out
    assert ": OK: " in out and "SHA224 of disk.img matches disk.img.sha224" in out
    assert "SHA256 of disk.img matches SHA256SUMS" in out and "par2: all " in out


def test_flipped_byte_is_named_and_par2_repairs_it(disks, tmp_path):
    d = keep_like_a_user(disks, tmp_path)
    img = d / "disk.img"
    where = 9 * 1024 * 1024 + 12345
    data = bytearray(img.read_bytes())
    data[where] ^= 0xFF
    img.write_bytes(bytes(data))
    proc = run("verify", "-q", img)
    out = proc.stdout.decode()
    assert proc.returncode == 1, out
    assert "disk.img does not match its SHA224 in disk.img.sha224" in out
    assert "disk.img does not match its SHA256 in SHA256SUMS" in out
    import re
    m = re.search(r"par2: slice (\d+) of disk.img is damaged, file bytes (\d+)-(\d+)", out)
    assert m and int(m.group(2)) <= where <= int(m.group(3)), out
    assert "repairable with 'par2 r " in out
    # and par2 really repairs it; then all is well again
    subprocess.run(["par2", "r", "-q", "-q", str(d / "disk.img.par2")], cwd=str(d), check=True,
                   stdout=subprocess.DEVNULL)
    assert sha256_file(img) == TRUTH["mbr.img"]["sha256"]
    assert run("verify", "-q", img).returncode == 0


def test_par2_without_recovery_slices_cannot_repair(disks, tmp_path):
    d = keep_like_a_user(disks, tmp_path)
    for n in os.listdir(d):
        if ".vol" in n:
            os.unlink(d / n)
    img = d / "disk.img"
    data = bytearray(img.read_bytes())
    data[100000] ^= 1
    img.write_bytes(bytes(data))
    proc = run("verify", "-q", img)
    assert proc.returncode == 1 and b"par2 cannot repair it" in proc.stdout


def test_nothing_to_check_says_so(disks):
    proc = run("verify", "-q", disks / "gpt4k.img")
    assert proc.returncode == 0
    assert b": no checksums: nothing verified;" in proc.stdout and b"OK" not in proc.stdout


def test_sums_of_a_split_compressed_image(tmp_path):
    """disk.img.gz split into pieces; SHA256SUMS names each piece as stored."""
    d = tmp_path / "b"
    d.mkdir()
    shutil.copy(os.path.join(RAWDISK, "mbr.img.gz"), d / "disk.img.gz")
    subprocess.run("split -a 2 -b 300000 disk.img.gz disk.img.gz. && rm disk.img.gz && "
                   "sha256sum disk.img.gz.* > SHA256SUMS && md5sum disk.img.gz.aa > "
                   "disk.img.gz.aa.md5", shell=True, cwd=str(d), check=True)
    proc = run("verify", "-q", d / "disk.img.gz.aa")
    out = proc.stdout.decode()
    assert proc.returncode == 0, out
    assert out.count("SHA256 of disk.img.gz.a") == 3 and "MD5 of disk.img.gz.aa" in out
    piece = d / "disk.img.gz.ab"
    data = bytearray(piece.read_bytes())
    data[-10] ^= 1
    piece.write_bytes(bytes(data))
    proc = run("verify", "-q", d / "disk.img.gz.aa")
    assert proc.returncode == 1 and b"disk.img.gz.ab does not match its SHA256" in proc.stdout
