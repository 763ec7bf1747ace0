"""info / verify / extract on real images made by the real tools.

The expected bytes of every image are the sha256 of what partclone.restore,
ntfsclone --restore-image or partimage restore wrote (testdata/expected.json,
made by testdata/make-testdata.sh)."""
import json
import os
import random
import shutil
import subprocess

import pytest

from conftest import EXPECTED, assert_clean_error, have, image_path, run, sha256_file

IMAGES = sorted(EXPECTED)


def first_of(fmt, **want):
    """A bundled single-file, uncompressed image of a format."""
    for name in IMAGES:
        e = EXPECTED[name]
        if e["format"] == fmt and not e.get("compression") and len(e.get("files", [1])) == 1 \
                and all(e.get(k) == v for k, v in want.items()):
            return name
    pytest.skip("no bundled %s image" % fmt)


@pytest.mark.parametrize("name", IMAGES)
def test_extract_equals_real_restore(name, tmp):
    e = EXPECTED[name]
    out = tmp / "out.raw"
    proc = run("extract", "-q", image_path(name), out)
    assert proc.returncode == 0, proc.stderr
    assert os.path.getsize(out) == e["size"]
    assert sha256_file(out) == e["sha256"]


@pytest.mark.parametrize("name", IMAGES)
def test_verify_passes_on_good_image(name):
    proc = run("verify", "-q", image_path(name))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    e = EXPECTED[name]
    # the verdict says honestly what the image's checks cover
    if e["format"] == "partimage":
        assert b": OK: checksums verified (CRC-32 every 64 KiB" in proc.stdout
    elif e["format"] == "ntfsclone" or (e["format"] == "partclone" and e.get("checksum") == "none"):
        assert b"the data is not verified" in proc.stdout and b"OK" not in proc.stdout
    elif e["format"] == "raw":
        assert b"partly verified: no checksums of its own; the gzip stream's own checks passed" \
            in proc.stdout
    elif e.get("checksum") == "crc32-0001":
        assert b"partly verified: " in proc.stdout
        assert b"cover the first byte of each block only" in proc.stdout
    else:
        assert b": OK: checksums verified" in proc.stdout


@pytest.mark.parametrize("name", IMAGES)
def test_info_json(name):
    e = EXPECTED[name]
    proc = run("info", "--json", image_path(name))
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    for key in ("format", "filesystem", "size", "block_size", "used_blocks", "total_blocks",
                "checksum", "compression", "pieces"):
        assert key in d
    assert d["format"] == e["format"]
    if e["format"] != "raw" or not d["compression"]:
        assert d["size"] == e["size"]
    keys = ("block_size", "used_blocks", "total_blocks", "filesystem") if e["format"] != "raw" else ()
    for key in keys:
        if e.get(key) is not None:
            # partclone goes by its bitmap where the header's count differs (btrfs)
            assert d[key] == e[key] or (key == "used_blocks" and d["header_used_blocks"] == e[key]), key
    # the manifest names partclone 0001's quirky CRC, and calls partimage's
    # CHK records no checksum mode; vimage reports the algorithm it checks
    want = {"crc32-0001": "crc32"}.get(e.get("checksum"), e.get("checksum"))
    if e["format"] == "partimage":
        want = "crc32"
    if want:
        assert d["checksum"] == want


def test_info_text_lists_fields():
    proc = run("info", image_path(first_of("partclone")))
    assert proc.returncode == 0
    text = proc.stdout.decode()
    for word in ("format", "partclone", "size", "block_size", "checksum", "blocks_per_checksum"):
        assert word in text


def test_stdin_to_stdout():
    name = first_of("partclone")
    with open(image_path(name), "rb") as f:
        proc = subprocess.run(["bash", "-c", "python3 '%s' extract -q - - | sha256sum"
                               % os.path.join(os.path.dirname(__file__), "..", "vimage.py")],
                              stdin=f, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0].decode() == EXPECTED[name]["sha256"]


def test_extract_to_block_device_writes_only_used_blocks(tmp):
    if os.geteuid() != 0 or not have("losetup"):
        pytest.skip("needs root and losetup")
    name = first_of("partclone")
    e = EXPECTED[name]
    backing = tmp / "dev.img"
    backing.write_bytes(b"\xaa" * e["size"])
    dev = subprocess.run(["losetup", "-f", "--show", str(backing)], stdout=subprocess.PIPE,
                         check=True).stdout.decode().strip()
    try:
        proc = run("extract", "-q", image_path(name), dev)
        assert proc.returncode == 0, proc.stderr
    finally:
        subprocess.run(["losetup", "-d", dev])
    ref = tmp / "ref.raw"
    assert run("extract", "-q", image_path(name), ref).returncode == 0
    got, want = backing.read_bytes(), ref.read_bytes()
    bs = e["block_size"]
    import vimage
    img = vimage.open_image(image_path(name))
    used = set()
    for start, count in img.runs():
        used.update(range(start, start + count))
    img.stream.close()
    for block in range(0, e["size"] // bs):
        a, b = got[block * bs:(block + 1) * bs], want[block * bs:(block + 1) * bs]
        if block in used:
            assert a == b, block
        else:
            assert a == b"\xaa" * bs, block


def test_extract_refuses_existing_file_without_force(tmp):
    name = first_of("partclone")
    out = tmp / "exists.raw"
    out.write_bytes(b"keep me")
    assert_clean_error(run("extract", "-q", image_path(name), out))
    assert out.read_bytes() == b"keep me"
    proc = run("extract", "-q", "--force", image_path(name), out)
    assert proc.returncode == 0
    assert sha256_file(out) == EXPECTED[name]["sha256"]


def test_extract_refuses_to_overwrite_its_input(tmp):
    src = tmp / "img"
    shutil.copy(image_path(first_of("partclone")), src)
    before = src.read_bytes()
    assert_clean_error(run("extract", "-q", "--force", src, src))
    assert src.read_bytes() == before


def test_output_is_sparse(tmp):
    name = first_of("partclone")
    out = tmp / "sparse.raw"
    assert run("extract", "-q", image_path(name), out).returncode == 0
    st = os.stat(out)
    e = EXPECTED[name]
    assert st.st_blocks * 512 < e["size"], "unused blocks should stay holes"


# --- containers: every codec by the real command, and splits ---------------

CODEC_COMMANDS = [
    ("gzip", ["gzip", "-c"], None),
    ("pigz", ["pigz", "-c"], None),
    ("gzip-rsyncable", ["gzip", "--rsyncable", "-c"], None),
    ("bzip2", ["bzip2", "-c"], None),
    ("lbzip2", ["lbzip2", "-c"], None),
    ("xz", ["xz", "-c"], None),
    ("xz-T2", ["xz", "-T2", "--block-size=200000", "-c"], None),
    ("lzma", ["xz", "--format=lzma", "-c"], None),
    ("lzip", ["lzip", "-c"], None),
    ("zstd", ["zstd", "-q", "-c"], "zstandard"),
    ("zstd-T2", ["zstd", "-q", "-T2", "-B131072", "-c"], "zstandard"),
    ("lz4", ["lz4", "-q", "-c"], "lz4"),
    ("lz4-legacy", ["lz4", "-l", "-q", "-c"], "lz4"),
    ("lzop", ["lzop", "-c"], "lzo"),
]


def compress(cmd, src, dst):
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        subprocess.run(cmd, stdin=fin, stdout=fout, check=True)


def base_images():
    names = []
    for fmt in ("partclone", "ntfsclone", "partimage"):
        try:
            names.append(first_of(fmt))
        except pytest.skip.Exception:
            pass
    return names


@pytest.mark.parametrize("codec,cmd,module", CODEC_COMMANDS, ids=[c[0] for c in CODEC_COMMANDS])
@pytest.mark.parametrize("name", base_images())
def test_compressed_by_real_command(codec, cmd, module, name, tmp):
    if not have(cmd[0]):
        pytest.skip("%s is not installed" % cmd[0])
    if module:
        pytest.importorskip(module)
    packed = tmp / ("img." + codec)
    compress(cmd, image_path(name), packed)
    proc = run("verify", "-q", packed)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp / "out.raw"
    proc = run("extract", "-q", packed, out)
    assert proc.returncode == 0, proc.stderr
    assert sha256_file(out) == EXPECTED[name]["sha256"]
    info = json.loads(run("info", "--json", packed).stdout)
    assert info["compression"] == codec.split("-")[0] if codec not in ("pigz", "gzip-rsyncable",
                                                                          "lbzip2", "lz4-legacy") \
        else info["compression"] in ("gzip", "bzip2", "lz4-legacy")


@pytest.mark.parametrize("width,cmd", [(2, ["gzip", "-c"]), (3, ["xz", "-T2", "-c"]),
                                       (2, None)])
def test_split_sets(width, cmd, tmp):
    name = first_of("partclone")
    src = image_path(name)
    whole = tmp / "sda1.ext4-ptcl-img"
    if cmd:
        whole = tmp / ("sda1.ext4-ptcl-img." + cmd[0])
        compress(cmd, src, whole)
    else:
        shutil.copy(src, whole)
    subprocess.run(["split", "-a", str(width), "-b", "100000", str(whole), str(whole) + "."],
                   check=True)
    os.unlink(whole)
    first = str(whole) + "." + "a" * width
    pieces = sorted(p for p in os.listdir(tmp) if p.startswith(whole.name + "."))
    assert len(pieces) >= 3
    info = json.loads(run("info", "--json", first).stdout)
    assert info["pieces"] == len(pieces)
    out = tmp / "out.raw"
    assert run("extract", "-q", first, out).returncode == 0
    assert sha256_file(out) == EXPECTED[name]["sha256"]
    # a later piece is not the start of the set
    assert_clean_error(run("verify", "-q", tmp / pieces[1]))
    # a missing middle piece is named
    os.unlink(tmp / pieces[1])
    proc = run("verify", "-q", first)
    assert_clean_error(proc)
    assert pieces[1].encode() in proc.stderr


def test_bundled_split_set_from_newer_partclone():
    name = "sda1.ext4-ptcl-img.gz.aa"
    if name not in EXPECTED:
        pytest.skip("not bundled")
    d = json.loads(run("info", "--json", image_path(name)).stdout)
    assert d["pieces"] == 3 and d["compression"] == "gzip"


# --- bad input ---------------------------------------------------------------

def flip(data, offset, mask=0x01):
    b = bytearray(data)
    b[offset] ^= mask
    return bytes(b)


def test_flipped_data_byte_is_named(tmp):
    import vimage
    name = first_of("partclone", checksum="crc32")
    data = open(image_path(name), "rb").read()
    img = vimage.open_image(image_path(name))
    start = img.data_start
    img.stream.close()
    pos = start + 10
    bad = tmp / "bad.img"
    bad.write_bytes(flip(data, pos))
    proc = run("verify", "-q", bad)
    assert proc.returncode == 1
    out = proc.stdout.decode()
    assert "checksum mismatch" in out and "image offset %d" % start in out
    assert "blocks " in out and "partition bytes" in out
    assert "FAILED" in out
    # extract stops, removes its output, and says why
    out_file = tmp / "o.raw"
    proc = run("extract", "-q", bad, out_file)
    assert proc.returncode == 1 and not out_file.exists()
    assert b"checksum mismatch" in proc.stderr
    proc = run("extract", "-q", "--ignore-checksums", bad, out_file)
    assert proc.returncode == 0 and out_file.exists()


def test_verify_lists_every_bad_group(tmp):
    import vimage
    name = first_of("partclone", checksum="crc32", blocks_per_checksum=7)
    data = open(image_path(name), "rb").read()
    img = vimage.open_image(image_path(name))
    start, bs, bpc = img.data_start, img.block_size, img.bpc
    img.stream.close()
    stride = bs * bpc + 4
    bad = data
    for g in (0, 3, 5):
        bad = flip(bad, start + g * stride + 7)
    (tmp / "bad.img").write_bytes(bad)
    proc = run("verify", "-q", tmp / "bad.img")
    assert proc.returncode == 1
    lines = [l for l in proc.stdout.decode().splitlines() if l.startswith("BAD:")]
    assert len(lines) == 3
    for g, line in zip((0, 3, 5), lines):
        assert "image offset %d" % (start + g * stride) in line


def test_flipped_bitmap_and_header(tmp):
    import vimage
    name = first_of("partclone", checksum="crc32")
    data = open(image_path(name), "rb").read()
    (tmp / "h.img").write_bytes(flip(data, 40))           # in the file system name field
    proc = run("verify", "-q", tmp / "h.img")
    assert proc.returncode == 1 and b"header CRC mismatch" in proc.stdout
    (tmp / "b.img").write_bytes(flip(data, 110 + 200, 0x80))
    proc = run("verify", "-q", tmp / "b.img")
    assert proc.returncode == 1 and b"bitmap CRC mismatch" in proc.stdout
    del vimage


def test_partimage_flipped_data_and_header(tmp):
    import vimage
    name = first_of("partimage")
    data = open(image_path(name), "rb").read()
    img = vimage.open_image(image_path(name))
    start = img.data_start + 512          # logical offset + the volume header
    img.stream.close()
    (tmp / "d.000").write_bytes(flip(data, start + 100))
    proc = run("verify", "-q", tmp / "d.000")
    assert proc.returncode == 1 and b"CHK record mismatch" in proc.stdout
    (tmp / "h.000").write_bytes(flip(data, 512 + 300))
    proc = run("verify", "-q", tmp / "h.000")
    assert proc.returncode == 1 and b"main header sum mismatch" in proc.stdout


def test_ntfsclone_broken_structure(tmp):
    name = first_of("ntfsclone")
    data = open(image_path(name), "rb").read()
    (tmp / "n.img").write_bytes(flip(data, 56, 0x10))       # first command byte
    proc = run("verify", "-q", tmp / "n.img")
    assert proc.returncode == 1 and b"invalid command byte" in proc.stdout
    (tmp / "t.img").write_bytes(data[:len(data) // 2])
    proc = run("verify", "-q", tmp / "t.img")
    assert proc.returncode == 1 and b"truncated" in proc.stdout


@pytest.mark.parametrize("kind", ["empty", "random", "wrong-magic", "truncated-header",
                                  "truncated-data", "header-only", "absurd-blocks"])
@pytest.mark.parametrize("cmd", ["info", "verify", "extract"])
def test_bad_files_give_clean_errors(kind, cmd, tmp):
    name = first_of("partclone", checksum="crc32")
    data = open(image_path(name), "rb").read()
    rnd = random.Random(kind)
    content = {
        "empty": b"",
        "random": bytes(rnd.getrandbits(8) for _ in range(5000)),
        "wrong-magic": b"partclone-imagX" + data[15:4000],
        "truncated-header": data[:60],
        "truncated-data": data[:len(data) // 3],
        "header-only": data[:110],
        "absurd-blocks": data[:60] + b"\xff" * 8 + data[68:],
    }[kind]
    f = tmp / "bad.img"
    f.write_bytes(content)
    args = [cmd, "-q", f] + ([tmp / "out.raw"] if cmd == "extract" else [])
    proc = run(*args)
    if kind in ("random", "wrong-magic", "empty"):
        # raw is a claim, not a fallback: no header, no table, no file system
        assert_clean_error(proc)
        assert b"not a recognized image" in proc.stderr
        if kind == "wrong-magic":
            assert b"damaged header" in proc.stderr and b"partclone" in proc.stderr
        if kind != "empty":                # --format raw still takes it
            proc = run(*(args[:1] + ["--format", "raw"] + args[1:]))
            assert proc.returncode == 0, proc.stderr
            if cmd == "info":
                assert b"raw" in proc.stdout
            if cmd == "extract":
                assert (tmp / "out.raw").read_bytes() == content
        return
    if cmd == "info" and kind == "truncated-data":
        assert proc.returncode == 0        # the headers are all there
        return
    if cmd == "verify" and kind == "truncated-data":
        assert proc.returncode == 1 and b"truncated" in proc.stdout
        assert b"Traceback" not in proc.stderr
        return
    assert_clean_error(proc)


def test_missing_file_and_usage():
    assert_clean_error(run("info", "/nonexistent/image"))
    proc = run("frobnicate")
    assert proc.returncode == 2
    proc = run("--version")
    assert proc.returncode == 0 and b"vimage" in proc.stdout
    proc = run("-h")
    assert proc.returncode == 0 and b"examples" in proc.stdout


def test_corrupt_compressed_stream(tmp):
    name = first_of("partclone")
    packed = tmp / "x.gz"
    compress(["gzip", "-c"], image_path(name), packed)
    data = packed.read_bytes()
    (tmp / "t.gz").write_bytes(data[:len(data) // 2])
    for bad, why in (("t.gz", b"gzip stream is truncated"), ("c.gz", b"gzip stream is corrupt")):
        if bad == "c.gz":
            (tmp / "c.gz").write_bytes(flip(data, len(data) // 2, 0xFF))
        proc = run("verify", "-q", tmp / bad)       # named as a problem, then the summary
        assert proc.returncode == 1 and b"Traceback" not in proc.stderr
        assert why in proc.stdout and b": FAILED: " in proc.stdout
        assert_clean_error(run("extract", "-q", tmp / bad, tmp / "out.raw"))


def test_ntfsclone_10_0_against_the_real_restore(tmp):
    """ntfsclone writes only 10.1; a 10.0 image is the same stream without the
    final backup-boot-sector record.  ntfsclone itself restores it."""
    if not have("ntfsclone"):
        pytest.skip("ntfsclone missing")
    import struct
    name = first_of("ntfsclone")
    data = open(image_path(name), "rb").read()
    assert data[16:18] == b"\x0a\x01"
    cs, dev, nr = struct.unpack_from("<IQq", data, 18)
    last = min(cs, dev - nr * cs)
    old = bytearray(data[:len(data) - 1 - last])
    assert old[-1 - cs] == 1 or old[-9] == 0     # ends after a cluster record or a gap
    old[17] = 0
    src = tmp / "v10.0.img"
    src.write_bytes(bytes(old))
    ref = tmp / "ref.raw"
    subprocess.run(["ntfsclone", "--restore-image", "--overwrite", str(ref), str(src)],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    out = tmp / "out.raw"
    proc = run("extract", "-q", src, out)
    assert proc.returncode == 0, proc.stderr
    got, want = out.read_bytes(), ref.read_bytes()
    assert len(got) == dev
    assert got[:len(want)] == want and not got[len(want):].strip(b"\0")
    info = json.loads(run("info", "--json", src).stdout)
    assert info["image_version"] == "10.0"
    assert run("verify", "-q", src).returncode == 0
