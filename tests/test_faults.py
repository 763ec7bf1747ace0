"""Faults nobody plans for: full disks, killed processes, images that change or
vanish under a mount, read errors of the disk below, misused mount points,
Ctrl-C.  Each must end in a clear message and a clean state."""
import errno
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import (EXPECTED, ROOT, assert_clean_error, can_mount, have, image_path, mounted,
                      needs_fuse, run, sha256_file)

import vimage

VIMAGE = os.path.join(ROOT, "vimage.py")
BASE = "ext4-4k.ptcl-img"


def root_only():
    if os.geteuid() != 0:
        pytest.skip("needs root (tmpfs, mounts)")


# --- extract ------------------------------------------------------------------

def test_full_disk_is_a_clear_error(tmp_path):
    root_only()
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        out = small / "p.raw"
        proc = run("extract", "-q", image_path(BASE), out)
        assert_clean_error(proc)
        assert b"No space left on device" in proc.stderr and b"partial output is removed" in proc.stderr
        assert os.listdir(small) == []
    finally:
        subprocess.run(["umount", str(small)])


def test_killed_extract_leaves_an_obvious_part_file(tmp_path):
    out = tmp_path / "p.raw"
    data = open(image_path(BASE), "rb").read()
    proc = subprocess.Popen([sys.executable, VIMAGE, "extract", "-q", "-", str(out)],
                            stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdin.write(data[:len(data) // 2])
    proc.stdin.flush()
    for _ in range(100):
        if os.path.exists(str(out) + ".part"):
            break
        time.sleep(0.05)
    time.sleep(0.3)
    proc.kill()
    proc.wait()
    assert not out.exists() and os.path.exists(str(out) + ".part")
    again = run("extract", image_path(BASE), out)
    assert again.returncode == 0
    assert b"left from an earlier extract that did not finish" in again.stderr
    assert sha256_file(out) == EXPECTED[BASE]["sha256"] and not os.path.exists(str(out) + ".part")


def test_ctrl_c_during_extract_removes_the_partial_output(tmp_path):
    out = tmp_path / "p.raw"
    data = open(image_path(BASE), "rb").read()
    proc = subprocess.Popen([sys.executable, VIMAGE, "extract", "-q", "-", str(out)],
                            stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdin.write(data[:len(data) // 2])
    proc.stdin.flush()
    for _ in range(100):
        if os.path.exists(str(out) + ".part"):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(20) == 130
    assert not out.exists() and not os.path.exists(str(out) + ".part")


# --- images that change under a mount --------------------------------------------

@pytest.fixture
def served(tmp_path, mnt):
    """A copy of the image mounted in the foreground, its log captured."""
    img = tmp_path / "sda1.ptcl-img"
    shutil.copy(image_path(BASE), img)
    log = open(tmp_path / "log", "w+")
    proc = subprocess.Popen([sys.executable, VIMAGE, "mount", "-f", str(img), str(mnt)],
                            stdout=subprocess.DEVNULL, stderr=log)
    vfile = mnt / "sda1.ptcl-img"
    for _ in range(200):
        if vfile.exists():
            break
        time.sleep(0.05)
    assert vfile.exists()
    yield img, vfile, log
    proc.send_signal(signal.SIGTERM)
    proc.wait(20)
    assert not mounted(mnt)


def read_at(path, offset, n=4096):
    fd = os.open(str(path), os.O_RDONLY)
    try:
        return os.pread(fd, n, offset)
    finally:
        os.close(fd)


def used_offsets():
    img = vimage.open_image(image_path(BASE))
    runs = list(img.runs())
    img.stream.close()
    bs = img.block_size
    return [s * bs for s, _n in runs]


@needs_fuse
@pytest.mark.parametrize("how", ["rewritten", "grown", "shrunk", "deleted"])
def test_image_that_changes_while_mounted(how, served):
    img, vfile, log = served
    first, last = used_offsets()[0], used_offsets()[-1]
    assert read_at(vfile, first)                  # reads fine before
    if how == "rewritten":
        data = bytearray(img.read_bytes())
        data[-1] ^= 1
        img.write_bytes(bytes(data))
    elif how == "grown":
        with open(img, "ab") as f:
            f.write(b"x")
    elif how == "shrunk":
        os.truncate(img, os.path.getsize(img) // 2)
    else:
        os.unlink(img)
    with pytest.raises(OSError) as exc:
        read_at(vfile, last)                      # not in the page cache yet
    assert exc.value.errno == errno.EIO
    log.seek(0)
    text = log.read()
    assert "sda1.ptcl-img" in text and ("while mounted" in text or "shrank" in text or
                                         "truncated" in text)
    assert mounted(vfile.parent)                   # the mount stays up


@needs_fuse
def test_read_error_of_the_disk_below_is_passed_on(tmp_path, mnt):
    """The image lies on a file system whose reads fail in one range (a small
    FUSE file system of the test's own): EIO there, good bytes elsewhere."""
    fuse = pytest.importorskip("fuse")           # fusepy, for the failing file system
    data = open(image_path(BASE), "rb").read()
    bad_from = len(data) // 2

    class Failing(fuse.Operations):
        use_ns = True

        def getattr(self, path, fh=None):
            if path == "/":
                return {"st_mode": 0o40755, "st_nlink": 2}
            if path == "/img.ptcl-img":
                return {"st_mode": 0o100444, "st_nlink": 1, "st_size": len(data)}
            raise fuse.FuseOSError(errno.ENOENT)

        def readdir(self, path, fh):
            return [".", "..", "img.ptcl-img"]

        def read(self, path, size, offset, fh):
            if offset + size > bad_from and offset < bad_from + 65536:
                raise fuse.FuseOSError(errno.EIO)
            return data[offset:offset + size]
    below = tmp_path / "below"
    below.mkdir()
    t = threading.Thread(target=lambda: fuse.FUSE(Failing(), str(below), foreground=True,
                                                    ro=True, allow_other=True, direct_io=True),
                         daemon=True)
    t.start()
    for _ in range(100):
        if (below / "img.ptcl-img").exists():
            break
        time.sleep(0.05)
    try:
        proc = run("mount", below / "img.ptcl-img", mnt)
        assert proc.returncode == 0, proc.stderr
        vfile = mnt / "img.ptcl-img"
        img = vimage.open_image(image_path(BASE))
        bs, start = img.block_size, img.data_start
        offs = [b * bs for s, n in img.runs() for b in range(s, s + n)]
        img.stream.close()
        # the partition byte whose image byte lies in the failing range
        part = vimage.open_partition(image_path(BASE))[1]
        victim = next(o for o in offs if part.image_pos(part.index.rank(o // bs) * bs) >= bad_from)
        with pytest.raises(OSError) as exc:
            read_at(vfile, victim)
        assert exc.value.errno == errno.EIO
        assert read_at(vfile, offs[0])            # the rest still reads
        assert run("umount", mnt).returncode == 0
    finally:
        subprocess.run(["umount", "-l", str(below)])


# --- mount points ------------------------------------------------------------------

@needs_fuse
def test_mount_point_misuse(tmp_path, mnt):
    img = image_path(BASE)
    assert run("mount", img, mnt).returncode == 0
    proc = run("mount", img, mnt)                     # twice on the same mount point
    assert_clean_error(proc)
    assert b"not empty" in proc.stderr or b"already mounted" in proc.stderr
    inner = tmp_path / "files"
    inner.mkdir()
    assert run("mount", "--files", img, inner).returncode == 0
    nested = inner / "lost+found"
    proc = run("mount", img, nested)                  # inside the image's own mount
    assert_clean_error(proc)
    assert b"inside the vimage mount" in proc.stderr
    assert run("umount", inner).returncode == 0
    other = tmp_path / "tmpfs"
    other.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(other)], check=True)
    try:
        proc = run("umount", other)                   # not ours
        assert_clean_error(proc)
        assert b"not a vimage mount" in proc.stderr and mounted(other)
    finally:
        subprocess.run(["umount", str(other)])
    assert_clean_error(run("umount", tmp_path / "nothing-here"))


@needs_fuse
def test_ctrl_c_during_a_mount_pass_leaves_nothing(tmp_path, mnt):
    """SIGINT while the cache file of a stream without restart points is being
    written: no mount, no cache file, no index."""
    if not have("xz"):
        pytest.skip("xz missing")
    raw = tmp_path / "big.raw"
    with open(raw, "wb") as f:
        # an ext4 so that the raw image is a claim vimage takes, then lots of text
        f.write(open(image_path("ext4-4k.ptcl-img"), "rb").read()[:0])
    subprocess.run(["mkfs.ext4", "-q", "-F", str(raw), "300M"], check=True)
    with open(raw, "r+b") as f:
        f.seek(64 << 20)
        line = b"".join(b"%08d the quick brown fox jumps over the lazy dog\n" % i
                        for i in range(20000))
        for _ in range(200):
            f.write(line)
    packed = tmp_path / "big.raw.lzma"
    with open(raw, "rb") as fin, open(packed, "wb") as fout:
        subprocess.run(["xz", "--format=lzma", "-0", "-c"], stdin=fin, stdout=fout, check=True)
    os.unlink(raw)
    cache = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, VIMAGE, "mount", "--cache-dir", str(cache),
                             str(packed), str(mnt)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    for _ in range(200):
        if cache.exists() and any(n.endswith(".cache") for n in os.listdir(cache)):
            break
        time.sleep(0.02)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 130
    assert not mounted(mnt)
    assert not [n for n in os.listdir(cache) if not n.startswith(".")], os.listdir(cache)
