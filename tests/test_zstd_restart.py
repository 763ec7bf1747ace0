"""One-frame zstd (what `zstd -T0` writes) mounted through restart points
inside the frame: made by the real zstd command, read at random (also from
threads), mounted, with a corrupted saved window, several frames, the
pyzstd backend, and the fallbacks (checksum kind, cache file)."""
import hashlib
import json
import os
import random
import shutil
import subprocess
import threading

import pytest

from conftest import EXPECTED, image_path, needs_fuse, run, sha256_file, threaded_random_reads

import vimage

pytestmark = pytest.mark.skipif(not shutil.which("zstd"), reason="the zstd command is not installed")
MiB = 1 << 20


def make_data(size, seed=1, far=True):
    """Pseudo-random bytes, word text, zeros, and repeats of recent output
    (up to 8 MiB back, or 2 MiB with far=False): many blocks of each kind."""
    rnd = random.Random(seed)
    words = [bytes(rnd.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randrange(2, 10)))
             for _ in range(3000)]
    out, total = [], 0
    while total < size:
        n = rnd.choice([64, 256, 512, 1024, 2048]) << 10
        k = rnd.random()
        if k < 0.3:
            d = rnd.getrandbits(8 * n).to_bytes(n, "little")
        elif k < 0.75:
            d = b" ".join(rnd.choices(words, k=n // 5 + 1))[:n]
        elif k < 0.85:
            d = bytes(n)
        else:
            back = rnd.randrange(1, 8 if far else 2) * MiB
            flat = b"".join(out[-64:])
            d = flat[max(0, len(flat) - back):][:n] or bytes(n)
        out.append(d)
        total += len(d)
    return b"".join(out)[:size]


def bundled_images():
    """The bundled images end to end (~29 MB of real file-system images)."""
    names = sorted(n for n in os.listdir(image_path("")) if n.endswith((".ptcl-img", "-img"))
                   or n.endswith(".partimg.000") and "gz" not in n and "bz2" not in n)
    return b"".join(open(image_path(n), "rb").read() for n in names)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """~41 MB: pseudo-random data, text and zeros, then the bundled images
    (a raw image to vimage: it starts with no image magic)."""
    d = tmp_path_factory.mktemp("zstd")
    real = bundled_images()
    data = make_data(41 * MiB - len(real)) + real
    (d / "data.img").write_bytes(data)
    return d, data


def zstd(src, dst, *opts):
    with open(str(src), "rb") as fin, open(str(dst), "wb") as fout:
        subprocess.run(["zstd", "-q", "-c"] + list(opts), stdin=fin, stdout=fout, check=True)
    return dst


def frames(path):
    out = subprocess.run(["zstd", "-lv", str(path)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT).stdout.decode()
    return int([l for l in out.splitlines() if "Frames" in l][0].split(":")[1])


def open_cf(path, tmp, **kw):
    files = vimage.FileSource([str(path)])
    return vimage.CompressedFile(files, vimage.CODECS_BY_NAME["zstd"], cache=str(tmp / "cache"),
                                 index_file=str(tmp / ("%s.index" % os.path.basename(str(path)))),
                                 **kw)


def index_pass(cf, spacing=None):
    if spacing:
        cf.impl.spacing, cf.impl.windows = spacing, 0
    return b"".join(cf.pass_chunks())


def random_reads(cf, want, seed, rounds=200):
    rnd = random.Random(seed)
    for _ in range(rounds):
        off = rnd.randrange(len(want))
        n = rnd.choice([1, 4096, 70000, MiB, 3 * MiB])
        assert cf.pread(n, off) == want[off:off + n], (off, n)


def threaded_reads(cf, want, threads=8, rounds=40):
    """Random reads of a CompressedFile from several threads at once."""
    errors = []

    def worker(seed):
        rnd = random.Random(seed)
        for _ in range(rounds):
            off, n = rnd.randrange(len(want)), rnd.choice([1, 4096, 65536, 300000, 2 * MiB])
            if cf.pread(n, off) != want[off:off + n]:
                errors.append((off, n))
    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return errors


def every_chunk_exact(cf, want):
    """Each restart point decodes its whole chunk to the pass's bytes."""
    offs = list(cf.index.offsets) + [cf.size]
    for i, p in enumerate(cf.index.points):
        if p[0] == "block":
            n = offs[i + 1] - offs[i]
            assert cf.impl.decode(p, n)[:n] == want[offs[i]:offs[i] + n], (i, offs[i])


def blocks(cf):
    return sum(1 for p in cf.index.points if p[0] == "block")


# zstd options, the data (all, the bundled images, or new data without far
# repeats), spacing for the pass (None: the default), block points at least
STREAMS = [
    ("T0", ["-T0", "-3"], "all", 2 * MiB, 8),
    ("T2", ["-T2", "-3"], "all", 2 * MiB, 8),
    ("T1-single", ["-T1", "--single-thread", "-3"], "all", 2 * MiB, 4),
    ("level19", ["-T2", "-19"], "bundled", 2 * MiB, 4),
    ("long27", ["-T2", "--long=27", "-3"], "near", 4 * MiB, 2),
]


@pytest.mark.parametrize("name,opts,which,spacing,least", STREAMS, ids=[s[0] for s in STREAMS])
def test_restart_points_give_the_right_bytes(name, opts, which, spacing, least, work, tmp_path):
    d, data = work
    want = {"all": data, "bundled": bundled_images(),
            "near": make_data(40 * MiB, seed=2, far=False)}[which]
    src = tmp_path / "src.img"
    src.write_bytes(want)
    f = zstd(src, tmp_path / "img.zst", *opts)
    assert frames(f) == 1
    cf = open_cf(f, tmp_path)
    assert cf.mode == "points"
    assert index_pass(cf, spacing) == want
    assert cf.size == len(want)
    assert blocks(cf) >= least, cf.describe()
    if name != "long27":
        # a --long point keeps 8 MiB of a 128 MiB window and is checked for a
        # spacing: past that a far match may need more (the read then starts
        # from the point before); elsewhere every chunk restarts exactly
        every_chunk_exact(cf, want)
    random_reads(cf, want, name)
    assert not threaded_reads(cf, want)
    if name != "long27":
        assert not cf.impl.bad
    assert not (tmp_path / "cache").exists() or \
        not [n for n in os.listdir(tmp_path / "cache") if n.endswith(".cache")]
    # the saved index gives the same points and bytes
    again = open_cf(f, tmp_path)
    assert again.loaded and list(again.index.offsets) == list(cf.index.offsets)
    random_reads(again, want, name + "-again", rounds=60)
    again.close()
    cf.close()


def test_multithreaded_jobs_restart_at_the_default_spacing(work, tmp_path):
    """zstd -T2 jobs start with fresh tables and repeat offsets: at the
    default spacing (16 MiB) a point comes every 16-24 MiB or so."""
    d, data = work
    f = zstd(d / "data.img", tmp_path / "img.zst", "-T2", "-3")
    cf = open_cf(f, tmp_path)
    assert index_pass(cf) == data
    offs = list(cf.index.offsets) + [cf.size]
    assert blocks(cf) >= 1 and max(b - a for a, b in zip(offs, offs[1:])) <= 25 * MiB, offs
    random_reads(cf, data, "default")


@needs_fuse
@pytest.mark.parametrize("opts", [["-T0", "-3"], ["-T2", "-3"]], ids=["T0", "T2"])
def test_mounted_one_frame_zstd_reads_from_threads(opts, work, tmp_path, mnt):
    d, data = work
    f = zstd(d / "data.img", tmp_path / "data.img.zst", *opts)
    cache = tmp_path / "cache"
    proc = run("mount", "--format", "raw", "--cache-dir", cache, f, mnt)
    assert proc.returncode == 0, proc.stderr
    assert b"cache file" not in proc.stderr
    assert b"seek points" in proc.stdout and b" block" in proc.stdout, proc.stdout
    vfile = mnt / "data.img"
    assert not threaded_random_reads(vfile, data, rounds=60, sizes=(1, 4096, 65536, 300000))
    assert sha256_file(vfile) == hashlib.sha256(data).hexdigest()
    assert not [n for n in os.listdir(cache) if n.endswith(".cache")]
    assert run("umount", mnt).returncode == 0


@needs_fuse
def test_bundled_one_frame_zst_mounts_without_a_cache_file(tmp_path, mnt):
    pytest.importorskip("zstandard")
    name = "sda1.ext4-ptcl-img.zst"
    assert frames(image_path(name)) == 1
    cache = tmp_path / "cache"
    proc = run("mount", "--cache-dir", cache, image_path(name), mnt)
    assert proc.returncode == 0, proc.stderr
    assert b"cache file" not in proc.stderr
    assert sha256_file(mnt / vimage.virtual_name(name)) == EXPECTED[name]["sha256"]
    assert not [n for n in os.listdir(cache) if n.endswith(".cache")]


def saved_windows(index_file):
    """(first line's JSON, offset of the blobs, [(point offset, blob offset, length)])."""
    raw = open(str(index_file), "rb").read()
    line = raw.split(b"\n", 1)[0]
    doc = json.loads(line.decode())
    found = [(item[0], item[4]["b"][0], item[4]["b"][1]) for item in doc["points"]
             if item[1] == "block"]
    return doc, len(line) + 1, found


def corrupt_window(index_file, which, how):
    doc, base, found = saved_windows(index_file)
    off, at, n = found[which]
    raw = bytearray(open(str(index_file), "rb").read())
    if how == "garbage":
        raw[base + at:base + at + n] = bytes(random.Random(3).getrandbits(8) for _ in range(n))
    else:                               # a well-formed window of other bytes, same length
        z = vimage._zstd_module()
        window = vimage._zstd_unpack(bytes(raw[base + at:base + at + n]))
        other = bytes(b ^ 0x5A for b in window)
        packed = vimage._zstd_pack([other], len(other), vimage._zstd_packer())
        blobs = raw[base:] + packed
        for item in doc["points"]:
            if item[0] == off:
                item[4]["b"] = [len(raw) - base, len(packed)]
        raw = bytearray(json.dumps(doc).encode() + b"\n") + blobs
        del z
    open(str(index_file), "wb").write(bytes(raw))
    return off


@pytest.mark.parametrize("how", ["other-bytes", "garbage"])
def test_corrupt_saved_window_is_caught(how, work, tmp_path):
    d, data = work
    f = zstd(d / "data.img", tmp_path / "img.zst", "-T2", "-3")
    cf = open_cf(f, tmp_path)
    assert index_pass(cf, 2 * MiB) == data
    cf.close()
    idx = tmp_path / "img.zst.index"
    doc, _base, found = saved_windows(idx)
    assert len(found) >= 3
    bad_off = corrupt_window(idx, len(found) // 2, how)
    again = open_cf(f, tmp_path)
    assert again.loaded
    got = b"".join(again.pread(MiB, off) for off in range(0, len(data), MiB))
    assert got == data
    dropped = [again.index.offsets[j] for j in again.impl.bad]
    assert dropped == [bad_off]
    again.close()


@needs_fuse
def test_corrupt_saved_window_mounted(work, tmp_path, mnt):
    d, data = work
    f = zstd(d / "data.img", tmp_path / "data.img.zst", "-T2", "-3")
    idx = tmp_path / "data.index"
    proc = run("mount", "--format", "raw", "--index", idx, f, mnt)
    assert proc.returncode == 0, proc.stderr
    assert run("umount", mnt).returncode == 0
    _doc, _base, found = saved_windows(idx)
    assert found
    corrupt_window(idx, 0, "other-bytes")
    proc = run("mount", "--format", "raw", "--index", idx, f, mnt)
    assert proc.returncode == 0 and b"index reused" in proc.stdout, proc.stdout
    assert sha256_file(mnt / "data.img") == hashlib.sha256(data).hexdigest()


def test_several_frames_some_large(work, tmp_path):
    """Frames of 17, 0.3 and 22 MiB: points inside the large ones, and at
    every frame start."""
    d, data = work
    cuts = [0, 17 * MiB, 17 * MiB + 300000, len(data)]
    f = tmp_path / "img.zst"
    with open(str(f), "wb") as out:
        for a, b in zip(cuts, cuts[1:]):
            part = tmp_path / "part"
            part.write_bytes(data[a:b])
            out.write(zstd(part, tmp_path / "part.zst", "-T2", "-3").read_bytes())
    assert frames(f) == 3
    cf = open_cf(f, tmp_path)
    assert index_pass(cf, 2 * MiB) == data
    kinds = [(off, p[0]) for off, p in zip(cf.index.offsets, cf.index.points)]
    assert [off for off, k in kinds if k == "frame"] == cuts[:-1]
    assert len([1 for off, k in kinds if k == "block" and off < cuts[1]]) >= 2
    assert len([1 for off, k in kinds if k == "block" and off > cuts[2]]) >= 2
    every_chunk_exact(cf, data)
    random_reads(cf, data, "frames")


def test_pyzstd_backend_and_its_index(work, tmp_path, monkeypatch):
    """Without zstandard, pyzstd decodes, keeps the windows and reads them;
    an index saved by one package is read by the other."""
    pyzstd = pytest.importorskip("pyzstd")
    d, data = work
    want = data[:16 * MiB]
    src = tmp_path / "src.img"
    src.write_bytes(want)
    f = zstd(src, tmp_path / "img.zst", "-T2", "-3")
    monkeypatch.setattr(vimage, "_zstd_module", lambda: pyzstd)
    cf = open_cf(f, tmp_path)
    assert index_pass(cf, MiB) == want
    assert blocks(cf) >= 3
    random_reads(cf, want, "pyzstd", rounds=80)
    cf.close()
    monkeypatch.undo()
    if vimage.optional_module("zstandard") is not None:
        again = open_cf(f, tmp_path)
        assert again.loaded
        random_reads(again, want, "zstandard", rounds=80)
        assert not again.impl.bad


def test_crc32_when_xxhash_is_missing(work, tmp_path, monkeypatch):
    d, data = work
    want = data[:16 * MiB]
    src = tmp_path / "src.img"
    src.write_bytes(want)
    f = zstd(src, tmp_path / "img.zst", "-T2", "-3")
    monkeypatch.setattr(vimage, "_check_kind", lambda: "crc32")
    cf = open_cf(f, tmp_path)
    assert cf.impl.check == "crc32"
    assert index_pass(cf, MiB) == want
    random_reads(cf, want, "crc32", rounds=80)
    cf.close()
    monkeypatch.undo()
    again = open_cf(f, tmp_path)        # saved with the other check: built again
    assert again.loaded == (again.impl.check == "crc32")


def test_thinned_to_the_index_memory(work, tmp_path):
    d, data = work
    f = zstd(d / "data.img", tmp_path / "img.zst", "-T2", "-3")
    cf = open_cf(f, tmp_path, index_memory=3 * MiB)
    assert index_pass(cf, MiB) == data
    assert 1 <= blocks(cf) and cf.impl.memory(cf.index) <= 3 * MiB
    assert cf.impl.spacing > MiB                     # thinned
    random_reads(cf, data, "thin", rounds=60)


def test_no_restart_point_falls_back_to_the_cache_file(work, tmp_path, monkeypatch):
    d, data = work
    f = zstd(d / "data.img", tmp_path / "img.zst", "-T2", "-3")
    monkeypatch.setattr(vimage, "_zstd_candidate", lambda btype, block: False)
    monkeypatch.setattr(vimage, "ZSTD_NO_POINTS", 8 * MiB)
    cf = open_cf(f, tmp_path, keep_cache=False)
    assert cf.mode == "points"
    assert index_pass(cf, MiB) == data
    assert cf.mode == "cache" and cf.cache_fd is not None
    random_reads(cf, data, "cache", rounds=60)
    cf.close()
    assert not [n for n in os.listdir(tmp_path / "cache") if n.endswith(".cache")]


def test_long_window_with_far_repeats_uses_the_cache_file(tmp_path):
    """A --long=27 window keeps its last 8 MiB: when far matches (repeats 8-60
    MiB back) defeat every candidate in the first 64 MiB, the cache file."""
    rnd = random.Random(5)
    base = make_data(12 * MiB, seed=4)
    parts, total = [], 0
    while total < 80 * MiB:
        a = rnd.randrange(0, len(base) - MiB)
        n = rnd.choice([256, 512, 1024]) << 10
        parts.append(base[a:a + n])
        parts.append(rnd.getrandbits(8 * 4096).to_bytes(4096, "little"))
        total += n + 4096
    want = b"".join(parts)
    src = tmp_path / "src.img"
    src.write_bytes(want)
    f = zstd(src, tmp_path / "img.zst", "-T2", "--long=27", "-3")
    cf = open_cf(f, tmp_path)
    if cf.mode == "points":             # some candidate held: it must then be exact
        assert index_pass(cf) == want
        every_chunk_exact(cf, want)
    else:
        assert b"".join(cf.pass_chunks()) == want
    random_reads(cf, want, "long", rounds=40)
    cf.close()
