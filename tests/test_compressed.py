"""Mounting compressed and split images in place: seek points per codec,
the cache file fallback, saved indexes, damaged streams."""
import errno
import os
import random
import shutil
import subprocess

import pytest

from conftest import EXPECTED, image_path, mounted, needs_fuse, run, sha256_file, threaded_random_reads

import vimage

BASE = "ext4-a1-crc32-k7.ptcl-img"       # 16 MiB partition, 2.7 MB image

# codec command, python module it needs, what vimage does with it
COMMANDS = [
    ("gzip", ["gzip", "-c"], None, "points"),
    ("pigz", ["pigz", "-c"], None, "points"),
    ("gzip-rsyncable", ["gzip", "--rsyncable", "-c"], None, "points"),
    ("bzip2", ["bzip2", "-1", "-c"], None, "points"),
    ("lbzip2", ["lbzip2", "-1", "-c"], None, "points"),
    ("xz", ["xz", "-c"], None, "cache"),
    ("xz-T2", ["xz", "-T2", "--block-size=300000", "-c"], None, "points"),
    ("lzma", ["xz", "--format=lzma", "-c"], None, "cache"),
    ("lzip", ["lzip", "-c"], None, "cache"),
    ("zstd", ["zstd", "-q", "-c"], "zstandard", "points"),
    ("zstd-T2", ["zstd", "-q", "-T2", "-c"], "zstandard", "points"),
    ("zstd-frames", ["bash", "-c", "split -b 400000 --filter='zstd -q -c' -"], "zstandard", "points"),
    ("lz4", ["lz4", "-q", "-B4", "-c"], "lz4", "points"),
    ("lz4-dependent", ["lz4", "-q", "-BD", "-c"], "lz4", "cache"),
    ("lz4-legacy", ["lz4", "-l", "-q", "-c"], "lz4", "cache"),
    ("lzop", ["lzop", "-c"], "lzo", "cache"),
]
IDS = [c[0] for c in COMMANDS]


def compress(cmd, src, dst):
    if not shutil.which(cmd[0]):
        pytest.skip("%s is not installed" % cmd[0])
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        subprocess.run(cmd, stdin=fin, stdout=fout, stderr=subprocess.DEVNULL, check=True)


def packed(tmp_path, name, cmd, module, suffix="img"):
    if module:
        pytest.importorskip(module)
    out = tmp_path / ("%s.%s" % (os.path.basename(name), suffix))
    compress(cmd, image_path(name), out)
    return out


@pytest.mark.parametrize("codec,cmd,module,mode", COMMANDS, ids=IDS)
def test_seek_points_give_the_right_bytes(codec, cmd, module, mode, tmp_path):
    """Random reads through the seek index equal the plain decompressed image,
    with seek points packed closely so that many of them are used."""
    f = packed(tmp_path, BASE, cmd, module)
    want = open(image_path(BASE), "rb").read()
    files = vimage.FileSource([str(f)])
    codec_obj = next(c for c in vimage.DETECTED_CODECS if c.matches(files.pread(64, 0)))
    cf = vimage.CompressedFile(files, codec_obj, cache=str(tmp_path / "cache"),
                               index_file=str(tmp_path / "idx"))
    assert cf.mode == mode
    if isinstance(cf.impl, (vimage.GzipAccess, vimage.ZstdAccess)):
        cf.impl.spacing = 150000
    if isinstance(cf.impl, vimage.ZstdAccess):
        cf.impl.windows = 0                  # points closer than a window (2 MiB) apart
    assert b"".join(cf.pass_chunks()) == want
    if mode == "points":
        # a one-frame zstd of 2.7 MB restarts exactly at one block or two
        assert len(cf.index) >= (2 if codec in ("zstd", "zstd-T2") else 3), cf.describe()
    rnd = random.Random(codec)
    for _ in range(300):
        off = rnd.randrange(len(want))
        n = rnd.choice([1, 4096, 70000, 1 << 20])
        assert cf.pread(n, off) == want[off:off + n], (off, n)
    cf.close()
    assert not (tmp_path / "cache").exists() or not os.listdir(tmp_path / "cache")


def test_pigz_points_are_windows_and_saved(tmp_path):
    f = packed(tmp_path, BASE, ["pigz", "-c"], None)
    files = vimage.FileSource([str(f)])
    cf = vimage.CompressedFile(files, vimage.CODECS_BY_NAME["gzip"], index_file=str(tmp_path / "i"))
    cf.impl.spacing = 150000
    for _ in cf.pass_chunks():
        pass
    kinds = [p[0] for p in cf.index.points]
    assert kinds.count("window") >= max(3, len(kinds) // 2)
    assert (tmp_path / "i").exists()
    # a fresh reader reuses it
    again = vimage.CompressedFile(vimage.FileSource([str(f)]), vimage.CODECS_BY_NAME["gzip"],
                                  index_file=str(tmp_path / "i"))
    assert again.loaded and len(again.index) == len(kinds) - kinds.count("zlib")
    want = open(image_path(BASE), "rb").read()
    assert again.pread(100000, 1234567) == want[1234567:1234567 + 100000]


@needs_fuse
@pytest.mark.parametrize("codec,cmd,module,mode", COMMANDS, ids=IDS)
def test_mounted_compressed_image_equals_restore(codec, cmd, module, mode, tmp_path, mnt):
    f = packed(tmp_path, BASE, cmd, module)
    proc = run("mount", "--cache-dir", tmp_path / "cache", f, mnt)
    assert proc.returncode == 0, proc.stderr
    vfile = mnt / vimage.virtual_name(str(f))
    assert sha256_file(vfile) == EXPECTED[BASE]["sha256"]
    if mode == "cache":
        assert b"cache file" in proc.stderr and os.listdir(tmp_path / "cache")
    assert run("umount", mnt).returncode == 0
    leftovers = [n for n in os.listdir(tmp_path / "cache") if n.endswith(".cache")] \
        if (tmp_path / "cache").exists() else []
    assert not leftovers


@needs_fuse
@pytest.mark.parametrize("cmd", [["gzip", "-c"], ["zstd", "-q", "-c"], ["xz", "-T2", "-c"]])
def test_split_after_compressing(cmd, tmp_path, mnt):
    if cmd[0] == "zstd":
        pytest.importorskip("zstandard")
    whole = tmp_path / ("sda1.ext4-ptcl-img." + cmd[0])
    compress(cmd, image_path(BASE), whole)
    subprocess.run(["split", "-a", "2", "-b", "200000", str(whole), str(whole) + "."], check=True)
    os.unlink(whole)
    proc = run("mount", "--cache-dir", tmp_path / "cache", str(whole) + ".aa", mnt)
    assert proc.returncode == 0, proc.stderr
    assert sha256_file(mnt / "sda1.ext4-ptcl-img") == EXPECTED[BASE]["sha256"]


@needs_fuse
@pytest.mark.parametrize("name", ["ext2.partimg.gz.000", "ext2.partimg.bz2.000",
                                  "sda1.ext4-ptcl-img.gz.aa", "sda1.ext4-ptcl-img.zst",
                                  "sdb1.dd-img.gz"])
def test_bundled_compressed_images_mount(name, tmp_path, mnt):
    if name not in EXPECTED:
        pytest.skip("not bundled")
    if name.endswith(".zst"):
        pytest.importorskip("zstandard")
    proc = run("mount", "--cache-dir", tmp_path / "cache", image_path(name), mnt)
    assert proc.returncode == 0, proc.stderr
    assert sha256_file(mnt / vimage.virtual_name(name)) == EXPECTED[name]["sha256"]


@needs_fuse
def test_compressed_ntfsclone_and_threads(tmp_path, mnt):
    name = [n for n in EXPECTED if EXPECTED[n]["format"] == "ntfsclone"][0]
    f = tmp_path / "ntfs.img.bz2"
    compress(["bzip2", "-c"], image_path(name), f)
    ref = tmp_path / "ref.raw"
    assert run("extract", "-q", image_path(name), ref).returncode == 0
    want = ref.read_bytes()
    assert run("mount", f, mnt).returncode == 0
    assert not threaded_random_reads(mnt / "ntfs.img", want, rounds=60, sizes=(1, 4096, 200000))


@needs_fuse
@pytest.mark.parametrize("cmd", [["pigz", "-c"], ["xz", "-T2", "--block-size=300000", "-c"]])
def test_files_on_a_compressed_image(cmd, tmp_path, mnt):
    from test_mount import compare_trees, source_tree
    name = [n for n in EXPECTED if EXPECTED[n]["format"] == "partclone"
            and str(EXPECTED[n].get("filesystem")).startswith("EXT")
            and not EXPECTED[n].get("origin") and not EXPECTED[n].get("compression")][0]
    f = tmp_path / ("sda1.ext4-ptcl-img." + cmd[0])
    compress(cmd, image_path(name), f)
    proc = run("mount", "--files", f, mnt)
    assert proc.returncode == 0, proc.stderr
    compare_trees(source_tree(tmp_path), str(mnt))
    assert run("umount", mnt).returncode == 0
    assert not mounted(mnt)


@needs_fuse
def test_saved_index_is_reused_and_a_changed_image_rebuilds(tmp_path, mnt):
    f = tmp_path / "img.gz"
    compress(["pigz", "-c"], image_path(BASE), f)
    idx = tmp_path / "img.index"
    proc = run("mount", "--index", idx, f, mnt)
    assert proc.returncode == 0 and idx.exists()
    assert b"index reused" not in proc.stdout
    run("umount", mnt)
    proc = run("mount", "--index", idx, f, mnt)
    assert proc.returncode == 0 and b"index reused" in proc.stdout
    assert sha256_file(mnt / "img") == EXPECTED[BASE]["sha256"]
    run("umount", mnt)
    # the same name, other content: the index must not be trusted
    other = [n for n in EXPECTED if EXPECTED[n]["format"] == "partclone" and n != BASE
             and not EXPECTED[n].get("compression")][0]
    compress(["pigz", "-c"], image_path(other), f)
    proc = run("mount", "--index", idx, f, mnt)
    assert proc.returncode == 0 and b"index reused" not in proc.stdout
    assert sha256_file(mnt / "img") == EXPECTED[other]["sha256"]
    run("umount", mnt)
    # a garbled index file is rebuilt too
    idx.write_text("{not json")
    proc = run("mount", "--index", idx, f, mnt)
    assert proc.returncode == 0 and b"index reused" not in proc.stdout
    assert sha256_file(mnt / "img") == EXPECTED[other]["sha256"]


@needs_fuse
def test_keep_cache_is_reused(tmp_path, mnt):
    f = tmp_path / "img.xz"
    compress(["xz", "-c"], image_path(BASE), f)
    cache = tmp_path / "cache"
    assert run("mount", "--keep-cache", "--cache-dir", cache, f, mnt).returncode == 0
    run("umount", mnt)
    kept = [n for n in os.listdir(cache) if n.endswith(".cache")]
    assert kept
    proc = run("mount", "--keep-cache", "--cache-dir", cache, f, mnt)
    assert proc.returncode == 0 and b"index reused" in proc.stdout
    assert b"cache file" not in proc.stderr          # no new pass
    assert sha256_file(mnt / "img") == EXPECTED[BASE]["sha256"]


@needs_fuse
@pytest.mark.parametrize("how", ["truncated-gzip", "corrupt-bzip2", "truncated-xz-T2",
                                 "truncated-zstd"])
def test_damaged_stream_gives_eio_not_a_hang(how, tmp_path, mnt):
    cmd = {"truncated-gzip": ["gzip", "-c"], "corrupt-bzip2": ["bzip2", "-1", "-c"],
           "truncated-xz-T2": ["xz", "-T2", "--block-size=300000", "-c"],
           "truncated-zstd": ["zstd", "-q", "-c"]}[how]
    if how.endswith("zstd"):
        pytest.importorskip("zstandard")
    f = tmp_path / "img.x"
    compress(cmd, image_path(BASE), f)
    data = bytearray(f.read_bytes())
    if how.startswith("truncated"):
        data = data[:len(data) * 2 // 3]
    else:
        data[len(data) * 2 // 3] ^= 0x55
    f.write_bytes(bytes(data))
    proc = run("mount", f, mnt, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert b"DAMAGED" in proc.stdout
    vfile = str(mnt / vimage.virtual_name(str(f)))
    want = open(image_path(BASE), "rb").read()
    ref = tmp_path / "ref.raw"
    assert run("extract", "-q", image_path(BASE), ref).returncode == 0
    partition = ref.read_bytes()
    fd = os.open(vfile, os.O_RDONLY)
    good = bad = 0
    try:
        for off in range(0, len(partition), 1 << 20):
            try:
                got = os.pread(fd, 1 << 20, off)
                assert got == partition[off:off + len(got)]
                good += 1
            except OSError as e:
                assert e.errno == errno.EIO
                bad += 1
    finally:
        os.close(fd)
    assert good and bad
    del want


@needs_fuse
def test_partimage_volume_set_each_volume_compressed(tmp_path, mnt):
    """partimage -z1 -V writes every volume as its own gzip file."""
    name = "ext2-split.partimg.000"
    if name not in EXPECTED:
        pytest.skip("not bundled")
    for i in range(len(EXPECTED[name]["files"])):
        vol = "ext2-split.partimg.%03d" % i
        compress(["gzip", "-c"], image_path(vol), tmp_path / vol)
    first = tmp_path / name
    assert run("verify", "-q", first).returncode == 0
    proc = run("mount", "--cache-dir", tmp_path / "cache", first, mnt)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(b"gzip stream") == 2
    assert sha256_file(mnt / "ext2-split.partimg") == EXPECTED[name]["sha256"]


def test_bzip2_block_found_again_after_a_chance_magic(tmp_path, monkeypatch):
    """The pass decodes blocks side by side; when one fails (as when its end
    was a magic found by chance inside the data) it is found again and the
    pass goes on with the right bytes."""
    if not shutil.which("lbzip2"):
        pytest.skip("lbzip2 is not installed")
    f = tmp_path / "x.bz2"
    with open(image_path(BASE), "rb") as fin, open(f, "wb") as fout:
        subprocess.run(["lbzip2", "-1", "-c"], stdin=fin, stdout=fout, check=True)
    acc = vimage.Bzip2Access(vimage.FileSource([str(f)]))
    real, calls = acc._decode_from, []

    def flaky(*args):
        calls.append(1)
        if len(calls) in (2, 5):
            raise vimage.ContainerError("chance magic")
        return real(*args)
    monkeypatch.setattr(acc, "_decode_from", flaky)
    index = vimage.SeekIndex()
    out = b"".join(acc.run(index))
    assert out == open(image_path(BASE), "rb").read()
    assert len(index) > 5 and len(calls) >= 5
