"""Clonezilla image directories as one thing: info, verify, extract the whole
disk, mount the disk and every partition.  The directories were saved by the
real `ocs-sr` from loop disks and their truth built from `ocs-sr
restoredisk` and `partclone.restore` (testdata/make-clonezilla.sh,
testdata/clonezilla/expected.json)."""
import json
import os
import shutil
import subprocess

import pytest

from conftest import (TESTDATA, assert_clean_error, have, image_path, mounted, needs_fuse, run,
                      sha256_file)

import vimage

CZ = os.path.join(TESTDATA, "clonezilla")
with open(os.path.join(CZ, "expected.json")) as f:
    TRUTH = json.load(f)
DIRS = sorted(TRUTH)
SAVEDISK = [d for d in DIRS if TRUTH[d]["disk_file"]]


def info(path):
    proc = run("info", "--json", path)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def imaged(name):
    return [p for p in TRUTH[name]["partitions"] if p.get("image")]


@pytest.mark.parametrize("name", DIRS)
def test_info_against_the_saved_tables(name):
    t = TRUTH[name]
    d = info(os.path.join(CZ, name))
    assert d["format"] == "clonezilla"
    assert d["saved_by"].startswith("Clonezilla") and d["command"] == t["command"]
    disks = [d["disk"]] if "disk" in d else d["disks"]
    for want in t["disks"]:
        got = next(x for x in disks if x["name"] == want["name"])
        assert (got["size"], got["label"], got["sector_size"]) == \
            (want["size"], want["label"], want["sector_size"])
    parts = {p["name"]: p for p in d["partitions"]}
    for want in t["partitions"]:
        p = parts[want["name"]]
        assert (p["start"], p["size"]) == (want["start"], want["size"]), want["name"]
        if want.get("image"):
            assert p["image"] == want["image"][0] and p["pieces"] == len(want["image"])
            assert p["filesystem"] == want["filesystem"]
            assert p["compression"] in ("gzip", "zstd", "xz")
        else:
            assert p["image"] is None and p["reason"]
    assert d["checksum_files"] == sorted(t["checksum_files"])


@pytest.mark.parametrize("name", DIRS)
def test_verify_passes(name):
    proc = run("verify", "-q", os.path.join(CZ, name))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout.decode()
    assert ": OK: %d of %d partitions verified" % (len(imaged(name)), len(imaged(name))) in out
    for sums in TRUTH[name]["checksum_files"]:
        assert "against %s" % sums in out


@pytest.mark.parametrize("name", SAVEDISK)
def test_extract_equals_the_truth_disk(name, tmp_path):
    out = tmp_path / "disk.img"
    proc = run("extract", "-q", os.path.join(CZ, name), out)
    assert proc.returncode == 0, proc.stderr
    disk = TRUTH[name]["disks"][0]
    assert os.path.getsize(out) == disk["size"] and sha256_file(out) == disk["sha256"]
    assert os.stat(out).st_blocks * 512 < disk["size"]          # sparse
    # stdout too (zeros written out)
    proc = subprocess.run("%s %s extract -q %s - | sha256sum" % (
        os.sys.executable, vimage.__file__, os.path.join(CZ, name)), shell=True,
        stdout=subprocess.PIPE)
    assert proc.stdout.split()[0].decode() == disk["sha256"]


@pytest.mark.parametrize("name", DIRS)
def test_extract_each_partition(name, tmp_path):
    for p in imaged(name):
        out = tmp_path / p["name"]
        proc = run("extract", "-q", "--partition", p["name"], os.path.join(CZ, name), out)
        assert proc.returncode == 0, proc.stderr
        assert sha256_file(out) == p["sha256"], p["name"]


def test_saveparts_has_no_disk(tmp_path):
    proc = run("extract", "-q", os.path.join(CZ, "saveparts"), tmp_path / "x")
    assert_clean_error(proc)
    assert b"saveparts" in proc.stderr and b"sda5" in proc.stderr


def copy(name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(os.path.join(CZ, name), dst)
    return dst


def test_verify_names_each_problem(tmp_path):
    d = copy("mbr-zstd-split", tmp_path)
    # a flipped byte inside one partition image (the zstd frame checksum and partclone catch it)
    victim = d / "loop0p5.ext4-ptcl-img.zst.aa"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x40
    victim.write_bytes(bytes(data))
    # a missing middle piece: loop0p1 has .aa and .ab; make it three and drop the middle one
    p1 = [d / "loop0p1.ext4-ptcl-img.zst.aa", d / "loop0p1.ext4-ptcl-img.zst.ab"]
    joined = b"".join(p.read_bytes() for p in p1)
    (d / "loop0p1.ext4-ptcl-img.zst.ab").write_bytes(joined[1000000:1300000])
    (d / "loop0p1.ext4-ptcl-img.zst.ac").write_bytes(joined[1300000:])
    os.unlink(d / "loop0p1.ext4-ptcl-img.zst.ab")
    # a changed MD5SUMS line
    sums = (d / "MD5SUMS").read_text().splitlines()
    k = next(i for i, l in enumerate(sums) if l.endswith("  disk"))
    sums[k] = "0" * 32 + "  disk"
    (d / "MD5SUMS").write_text("\n".join(sums) + "\n")
    proc = run("verify", "-q", d)
    out = proc.stdout.decode()
    assert proc.returncode == 1, out
    assert "loop0p1" in out and "loop0p1.ext4-ptcl-img.zst.ab" in out and "missing" in out
    assert "BAD: loop0p5:" in out
    assert "MD5SUMS line %d: disk does not match its MD5" % (k + 1) in out
    assert "loop0p5.ext4-ptcl-img.zst.aa does not match its SHA1" in out
    assert "loop0p7: OK" in out and "loop0p8: OK" in out       # it went on past the bad ones
    assert ": FAILED: " in out.splitlines()[-1]


def test_rescuezilla_variants_and_legacy_names(tmp_path):
    """Rescuezilla's layout (two-column dev-fs.list, 'parts' with a trailing
    space, no Info-saved-by-cmd.txt), legacy and uncompressed image names whose
    format and compression come from magic bytes only."""
    d = copy("saveparts", tmp_path)
    for n in os.listdir(d):
        if n.startswith("sda5.") or n.startswith("sda7."):
            os.unlink(d / n)
    os.unlink(d / "Info-saved-by-cmd.txt")
    (d / "parts").write_text("sda5 sda7 sda8 ")
    (d / "dev-fs.list").write_text("# <Device name>   <File system>\n/dev/sda5 ext2\n/dev/sda8 ntfs\n")
    cz = (d / "clonezilla-img").read_text().splitlines()
    cz[0] = "This image was saved by Rescuezilla at 2024-05-01-1200"
    (d / "clonezilla-img").write_text("\n".join(cz) + "\n")
    # an ntfsclone image under its legacy name, gzip'd: known only from magic bytes
    with open(image_path("ntfs.ntfsclone-img"), "rb") as fin, \
            open(d / "sda8.ntfs-img.aa", "wb") as fout:
        subprocess.run(["gzip", "-c"], stdin=fin, stdout=fout, check=True)
    # a partimage image as Clonezilla 1.x named it
    shutil.copy(image_path("ext2.partimg.000"), d / "sda5.aa")
    # an uncompressed partclone image (-z0)
    shutil.copy(image_path("fat16.ptcl-img"), d / "sda7.vfat-ptcl-img.uncomp.aa")
    d_info = info(d)
    assert d_info["saved_by"].startswith("Rescuezilla") and d_info["command"] is None
    parts = {p["name"]: p for p in d_info["partitions"]}
    assert parts["sda8"]["format"] == "ntfsclone" and parts["sda8"]["compression"] == "gzip"
    assert parts["sda5"]["format"] == "partimage"
    assert parts["sda7"]["format"] == "partclone" and parts["sda7"]["compression"] is None
    assert run("verify", "-q", d).returncode == 0
    want = {"sda8": "ntfs.ntfsclone-img", "sda5": "ext2.partimg.000", "sda7": "fat16.ptcl-img"}
    with open(os.path.join(TESTDATA, "expected.json")) as f:
        expected = json.load(f)
    for part, img in want.items():
        out = tmp_path / part
        assert run("extract", "-q", "--partition", part, d, out).returncode == 0
        assert sha256_file(out) == expected[img]["sha256"]


def test_dd_image_and_several_disks(tmp_path):
    """dd-ptcl-img partitions (a raw stream), and a directory of two disks."""
    d = copy("gpt-pigz", tmp_path)
    sp = os.path.join(CZ, "saveparts")
    for n in os.listdir(sp):
        if n.startswith("sda"):
            shutil.copy(os.path.join(sp, n), d / n)
    # sda7 saved as a dd image: the raw partition, gzip'd
    os.unlink(d / "sda7.vfat-ptcl-img.xz")
    raw = tmp_path / "sda7.raw"
    assert run("extract", "-q", "--partition", "sda7", sp, raw).returncode == 0
    with open(raw, "rb") as fin, open(d / "sda7.dd-ptcl-img.gz.aa", "wb") as fout:
        subprocess.run(["gzip", "-c"], stdin=fin, stdout=fout, check=True)
    (d / "disk").write_text("loop0 sda\n")
    (d / "parts").write_text("loop0p1 loop0p2 loop0p3 sda5 sda7\n")
    os.unlink(d / "B2SUMS")
    got = info(d)
    assert [x["name"] for x in got["disks"]] == ["loop0", "sda"]
    parts = {p["name"]: p for p in got["partitions"]}
    assert parts["sda7"]["format"] == "raw" and parts["sda7"]["filesystem"] == "vfat"
    assert run("verify", "-q", d).returncode == 0
    out = tmp_path / "sda7.out"
    assert run("extract", "-q", "--partition", "sda7", d, out).returncode == 0
    assert sha256_file(out) == sha256_file(raw)
    proc = run("extract", "-q", d, tmp_path / "which")
    assert_clean_error(proc)
    assert b"several disks" in proc.stderr
    assert run("extract", "-q", "--partition", "loop0", d, tmp_path / "loop0").returncode == 0
    assert sha256_file(tmp_path / "loop0") == TRUTH["gpt-pigz"]["disks"][0]["sha256"]


def test_encrypted_directory_is_refused(tmp_path):
    d = tmp_path / "enc-img"
    d.mkdir()
    for n in ("parts", "disk", "clonezilla-img", "ecryptfs.info"):
        (d / n).write_text("x\n")
    proc = run("info", d)
    assert_clean_error(proc)
    assert b"encrypted" in proc.stderr


def test_not_a_backup_directory(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    proc = run("verify", tmp_path)
    assert_clean_error(proc)
    assert b"holds no backup" in proc.stderr


@needs_fuse
@pytest.mark.parametrize("name", SAVEDISK)
def test_mount_serves_disk_and_partitions(name, mnt):
    t = TRUTH[name]
    proc = run("mount", os.path.join(CZ, name), mnt)
    assert proc.returncode == 0, proc.stderr
    disk = t["disks"][0]
    assert sorted(os.listdir(mnt)) == sorted([disk["name"]] + [p["name"] for p in imaged(name)])
    assert sha256_file(mnt / disk["name"]) == disk["sha256"]
    for p in imaged(name):
        assert sha256_file(mnt / p["name"]) == p["sha256"]
    dump = subprocess.run(["sfdisk", "-d", str(mnt / disk["name"])], stdout=subprocess.PIPE,
                          universal_newlines=True).stdout
    saved = open(os.path.join(CZ, name, disk["name"] + "-pt.sf")).read()
    assert dump.replace(str(mnt / disk["name"]), "/dev/" + disk["name"]).strip() == saved.strip()
    assert run("umount", mnt).returncode == 0


@needs_fuse
def test_files_of_every_partition(mnt):
    name = "mbr-zstd-split"
    loops = subprocess.run(["losetup", "-a"], stdout=subprocess.PIPE).stdout
    proc = run("mount", "--files", os.path.join(CZ, name), mnt)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.decode()
    for p in imaged(name):
        assert os.listdir(mnt / p["name"]), p["name"]
    assert os.path.exists(mnt / "loop0p1" / "README.txt") or os.listdir(mnt / "loop0p1")
    assert out.count("files: ") == len(imaged(name))
    assert run("umount", mnt).returncode == 0
    assert not mounted(mnt)
    after = subprocess.run(["losetup", "-a"], stdout=subprocess.PIPE).stdout
    assert len(after.splitlines()) <= len(loops.splitlines())


def test_lvm_volumes_are_partitions_and_the_pv_says_why(tmp_path):
    """An LVM logical volume is imaged as <vg>-<lv>.<fs>-ptcl-img; the physical
    volume's partition stays in `parts` without an image (made from
    saveparts: this kernel has no device-mapper, so ocs-sr cannot save LVM)."""
    d = copy("saveparts", tmp_path)
    os.rename(d / "sda5.ext4-ptcl-img.xz", d / "vg0-root.ext4-ptcl-img.xz")
    (d / "lvm_vg_dev.list").write_text("vg0 /dev/sda5 Xq3k9T-Zb1d-4Hn2-Jf8e-Kp0w-Lm7r-Qs5v6W\n")
    (d / "lvm_logv.list").write_text("/dev/vg0/root  Linux rev 1.0 ext4 filesystem data\n")
    got = info(d)
    parts = {p["name"]: p for p in got["partitions"]}
    assert "LVM physical volume" in parts["sda5"]["reason"]
    assert parts["vg0-root"]["format"] == "partclone" and parts["vg0-root"]["start"] is None
    out = tmp_path / "lv.raw"
    assert run("extract", "-q", "--partition", "vg0-root", d, out).returncode == 0
    want = {p["name"]: p["sha256"] for p in TRUTH["saveparts"]["partitions"] if p.get("sha256")}
    assert sha256_file(out) == want["sda5"]
