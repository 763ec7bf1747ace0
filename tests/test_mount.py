"""mount / umount end to end (root, /dev/fuse, fusepy), and the rank index."""
import errno
import os
import random
import signal
import shutil
import subprocess
import sys
import time

import pytest

from conftest import (EXPECTED, ROOT, TESTDATA, assert_clean_error, can_mount, have, image_path,
                      mounted, needs_fuse, run, sha256_file, threaded_random_reads)

import vimage


def mount(image, mp, *opts):
    proc = run("mount", *(list(opts) + [image, mp]), timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc


def uncompressed_images():
    return [n for n in sorted(EXPECTED) if not EXPECTED[n].get("compression")]


def first_image(fmt, fs=None):
    for n in uncompressed_images():
        e = EXPECTED[n]
        if e["format"] == fmt and (fs is None or fs.lower() in str(e.get("filesystem")).lower()):
            return n
    pytest.skip("no bundled %s image" % fmt)


# --- the virtual file is the real restore ----------------------------------

@needs_fuse
@pytest.mark.parametrize("name", uncompressed_images())
def test_virtual_file_equals_real_restore(name, mnt):
    proc = mount(image_path(name), mnt)
    vfile = mnt / vimage.virtual_name(name)
    assert str(vfile).encode() in proc.stdout
    assert os.path.getsize(vfile) == EXPECTED[name]["size"]
    assert sha256_file(vfile) == EXPECTED[name]["sha256"]
    assert run("umount", mnt).returncode == 0
    assert not mounted(mnt)


@needs_fuse
def test_split_set_mounts(tmp_path, mnt):
    name = first_image("partclone", "EXT")
    whole = tmp_path / "sda1.ext4-ptcl-img"
    shutil.copy(image_path(name), whole)
    subprocess.run(["split", "-a", "2", "-b", "250000", str(whole), str(whole) + "."], check=True)
    os.unlink(whole)
    mount(str(whole) + ".aa", mnt)
    assert sha256_file(mnt / "sda1.ext4-ptcl-img") == EXPECTED[name]["sha256"]


@needs_fuse
def test_mount_returns_at_once_and_detaches(mnt):
    """out=$(vimage.py mount ...) must not wait for the daemon."""
    name = first_image("partclone", "EXT")
    cmd = "out=$(%s %s mount %s %s); echo \"$out\"" % (sys.executable, os.path.join(ROOT, "vimage.py"),
                                                       image_path(name), mnt)
    t = time.time()
    proc = subprocess.run(["bash", "-c", cmd], stdout=subprocess.PIPE, timeout=60)
    assert time.time() - t < 30
    assert b"virtual partition" in proc.stdout and b"umount" in proc.stdout
    assert b"e2fsck -fn" in proc.stdout
    assert mounted(mnt)


@needs_fuse
def test_writes_are_refused(mnt):
    name = first_image("partclone", "EXT")
    mount(image_path(name), mnt)
    vfile = mnt / vimage.virtual_name(name)
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
        with pytest.raises(OSError) as exc:
            os.open(str(vfile), flags)
        assert exc.value.errno in (errno.EROFS, errno.EACCES)
    with pytest.raises(OSError) as exc:
        open(mnt / "new", "wb")
    assert exc.value.errno == errno.EROFS


@needs_fuse
@pytest.mark.parametrize("threads", [False, True])
def test_eight_threads_random_reads(tmp_path, mnt, threads):
    name = first_image("partclone", "EXT")
    ref = tmp_path / "ref.raw"
    assert run("extract", "-q", image_path(name), ref).returncode == 0
    want = ref.read_bytes()
    mount(image_path(name), mnt, *(["--threads"] if threads else []))
    assert not threaded_random_reads(mnt / vimage.virtual_name(name), want, rounds=150)


@needs_fuse
@pytest.mark.parametrize("fmt,fs", [("partclone", "EXT"), ("partclone", "FAT"),
                                    ("ntfsclone", None), ("partimage", "ext")])
def test_fsck_passes_on_virtual_file(fmt, fs, mnt):
    name = first_image(fmt, fs)
    mount(image_path(name), mnt)
    vfile = str(mnt / vimage.virtual_name(name))
    fstype = vimage.detect_filesystem(vimage.open_partition(image_path(name))[1])
    cmd = vimage.FILESYSTEMS[fstype][0] % vfile
    if not have(cmd.split()[0]):
        pytest.skip("%s missing" % cmd.split()[0])
    proc = subprocess.run(cmd.split(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.returncode == 0, proc.stdout.decode()


def source_tree(tmp_path):
    src = tmp_path / "src"
    subprocess.run([sys.executable, os.path.join(TESTDATA, "mktree.py"), str(src)], check=True)
    return src


def compare_trees(src, dst):
    """Every file and directory of src is in dst with the same bytes."""
    checked = 0
    for dirpath, dirnames, filenames in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        for d in dirnames:
            assert os.path.isdir(os.path.join(dst, rel, d)), os.path.join(rel, d)
        for f in filenames:
            with open(os.path.join(dirpath, f), "rb") as a, open(os.path.join(dst, rel, f), "rb") as b:
                assert a.read() == b.read(), os.path.join(rel, f)
            checked += 1
    assert checked >= 5


@needs_fuse
@pytest.mark.parametrize("fmt,fs", [("partclone", "EXT"), ("ntfsclone", None),
                                    ("partimage", "ext"), ("partclone", "NTFS")])
def test_files_shows_the_source_tree(fmt, fs, tmp_path, mnt):
    name = first_image(fmt, fs)
    proc = mount(image_path(name), mnt, "--files")
    assert b"files: " in proc.stdout
    compare_trees(source_tree(tmp_path), str(mnt))
    with pytest.raises(OSError) as exc:
        open(mnt / "new-file", "wb")
    assert exc.value.errno == errno.EROFS
    loops_before = subprocess.run(["losetup", "-a"], stdout=subprocess.PIPE).stdout
    assert run("umount", mnt).returncode == 0
    assert not mounted(mnt)
    loops_after = subprocess.run(["losetup", "-a"], stdout=subprocess.PIPE).stdout
    assert len(loops_after.splitlines()) <= len(loops_before.splitlines())
    assert not any(f.endswith(".json") for f in os.listdir(vimage.RUN_DIR))


@needs_fuse
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_killing_the_mount_leaves_no_stale_mount(sig, mnt):
    name = first_image("partclone", "EXT")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "vimage.py"), "mount", "-f",
                             image_path(name), str(mnt)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    for _ in range(200):
        if (mnt / vimage.virtual_name(name)).exists():
            break
        time.sleep(0.05)
    assert mounted(mnt)
    proc.send_signal(sig)
    proc.wait(20)
    for _ in range(100):
        if not mounted(mnt):
            break
        time.sleep(0.05)
    assert not mounted(mnt)


@needs_fuse
def test_verify_reads_gives_eio_on_bad_data(tmp_path, mnt):
    name = first_image("partclone", "EXT")
    img = vimage.open_image(image_path(name))
    if img.checksum == "none" or not img.reseed:
        pytest.skip("needs a reseeded checksum image")
    start, bs = img.data_start, img.block_size
    first_used = next(iter(img.runs()))[0]
    img.stream.close()
    bad = tmp_path / "bad.ptcl-img"
    data = bytearray(open(image_path(name), "rb").read())
    data[start + 5] ^= 0xFF                  # inside the first used block
    bad.write_bytes(bytes(data))
    mount(bad, mnt, "--verify-reads")
    vfile = str(mnt / "bad.ptcl-img")
    fd = os.open(vfile, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as exc:
            os.pread(fd, 4096, first_used * bs)
        assert exc.value.errno == errno.EIO
        # the last block lies in another checksum group and still reads
        size = os.path.getsize(vfile)
        assert len(os.pread(fd, 512, size - 512)) == 512
    finally:
        os.close(fd)


def test_mount_point_errors(tmp_path):
    if not can_mount():
        pytest.skip("needs fusepy")
    name = first_image("partclone", "EXT")
    assert_clean_error(run("mount", image_path(name), tmp_path / "missing"))
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_bytes(b"x")
    proc = run("mount", image_path(name), full)
    assert_clean_error(proc)
    assert b"not empty" in proc.stderr
    assert_clean_error(run("umount", tmp_path))


# --- the index, without FUSE -------------------------------------------------

def brute_rank(bits, b):
    return sum(bits[:b])


@pytest.mark.parametrize("nbits", [1, 7, 8, 9, 63, 64, 65, 4095, 4096, 4097, 10000, 70001])
@pytest.mark.parametrize("step", [64, 128, 4096])
def test_rank_index_matches_brute_force(nbits, step):
    rnd = random.Random(nbits * 31 + step)
    density = rnd.choice([0.0, 0.05, 0.5, 0.95, 1.0])
    bits = [1 if rnd.random() < density else 0 for _ in range(nbits)]
    bm = bytearray((nbits + 7) // 8)
    for i, v in enumerate(bits):
        if v:
            bm[i // 8] |= 1 << (i % 8)
    if nbits % 8:                       # junk past the last block must not count
        bm[-1] |= 0xFF << (nbits % 8) & 0xFF
    idx = vimage.RankIndex(bytes(bm), nbits, step)
    assert idx.total == sum(bits)
    probes = set(range(0, nbits + 1, max(1, nbits // 200))) | {0, nbits, nbits - 1, step, step - 1}
    for b in sorted(p for p in probes if 0 <= p <= nbits):
        assert idx.rank(b) == brute_rank(bits, b), b
    for first in (0, 1, nbits // 3):
        end = min(nbits, first + 777)
        got = [i for s, c in idx.used_runs(first, end) for i in range(s, s + c)]
        assert got == [i for i in range(first, end) if bits[i]]
    # a byte map (partclone 0001) gives the same ranks
    bytemap = bytes(bits)
    bidx = vimage.RankIndex(bytemap, nbits, step, bytemap=True)
    for b in sorted(p for p in probes if 0 <= p <= nbits):
        assert bidx.rank(b) == brute_rank(bits, b)


@pytest.mark.parametrize("name", uncompressed_images())
def test_random_reads_match_extract(name, tmp_path):
    """BlockPartition/NtfsPartition reads of odd ranges (group and block
    boundaries included) equal the extracted bytes."""
    ref = tmp_path / "ref.raw"
    assert run("extract", "-q", image_path(name), ref).returncode == 0
    want = ref.read_bytes()
    image, part, close = vimage.open_partition(image_path(name), index_bits=64, quiet=True)
    try:
        rnd = random.Random(name)
        bs = image.block_size
        offsets = [0, len(want) - 1, bs - 1, bs, 7 * bs - 3, 1024 * bs - 1] + \
            [rnd.randrange(len(want)) for _ in range(150)]
        for off in offsets:
            n = rnd.choice([1, 100, bs, 3 * bs + 5, 131072, 1 << 20])
            assert part.read(off, n) == want[off:off + n], (off, n)
        assert part.read(len(want), 10) == b""
    finally:
        close()
