"""The Python API (vimage.open, VirtualImage, Report) against the command
line on every bundled image, and every example of README's "Python API"."""
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys

import pytest

from conftest import EXPECTED, ROOT, TESTDATA, image_path, run, sha256_file

import vimage

IMAGES = sorted(EXPECTED)


def test_public_names():
    assert "open" in vimage.__all__ and "VirtualImage" in vimage.__all__
    for name in vimage.__all__:
        assert hasattr(vimage, name), name
    for name in ("VimageError", "FormatError", "ContainerError", "ChecksumError",
                 "MissingDependency", "OutputError"):
        assert issubclass(getattr(vimage, name), vimage.VimageError)
    # the module reads its own files with io.open: vimage.open is the API's
    assert vimage.open is vimage.api_open


@pytest.mark.parametrize("name", IMAGES)
def test_api_equals_cli(name, tmp_path):
    path = image_path(name)
    e = EXPECTED[name]
    with vimage.open(path) as v:
        assert v.info() == json.loads(run("info", "--json", path).stdout)
        assert v.size == e["size"] and v.partitions == [] and v.disk is None
        # blocks() into a sparse file equals extract
        out = tmp_path / "blocks.raw"
        with open(out, "wb") as f:
            for offset, data in v.blocks():
                f.seek(offset)
                f.write(data)
            f.truncate(v.size)
        assert sha256_file(out) == e["sha256"]
        want = out.read_bytes()
        # raw() hashed with hashlib equals the restore
        h = hashlib.sha256()
        with v.raw() as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        assert h.hexdigest() == e["sha256"]
        # read() at random offsets, readinto() into a buffer of our own
        rnd = random.Random(name)
        for _ in range(60):
            off, n = rnd.randrange(v.size), rnd.choice([1, 512, 4096, 100000])
            assert v.read(off, n) == want[off:off + n]
        buf = bytearray(8192)
        assert v.readinto(v.size - 100, buf) == 100 and bytes(buf[:100]) == want[-100:]
        # used extents hold all the data; outside them, zeros
        ext = list(v.used_extents())
        covered = bytearray(len(want))
        for off, n in ext:
            covered[off:off + n] = want[off:off + n]
        assert bytes(covered) == want
        assert v.verify().ok


def test_verify_finds_what_the_cli_finds(tmp_path):
    name = "ext4-4k-k7.ptcl-img"
    data = bytearray(open(image_path(name), "rb").read())
    img = vimage.open_image(image_path(name))
    start = img.data_start
    img.stream.close()
    for k in (10, 40000, 100000):
        data[start + k] ^= 0x55
    bad = tmp_path / "bad.ptcl-img"
    bad.write_bytes(bytes(data))
    seen = []
    with vimage.open(str(bad)) as v:
        report = v.verify(progress=lambda done, total: seen.append(done))
    assert not report.ok and seen
    cli = [l[5:] for l in run("verify", "-q", bad).stdout.decode().splitlines()
           if l.startswith("BAD: ")]
    assert [str(p) for p in report.problems] == cli and len(cli) >= 2
    p = report.problems[0]
    assert p.kind == "checksum" and p.byte_range and p.block_range and p.image_offset
    with vimage.open(str(bad)) as v:
        with pytest.raises(vimage.ChecksumError):
            for _ in v.blocks():
                pass
        assert sum(len(d) for _o, d in v.blocks(verify=False)) > 0


def test_backups_with_several_members():
    cz = os.path.join(TESTDATA, "clonezilla", "mbr-zstd-split")
    truth = json.load(open(os.path.join(TESTDATA, "clonezilla", "expected.json")))
    with vimage.open(cz) as v:
        assert v.kind == "disk" and v.disk.name == "loop0"
        assert v.info()["format"] == "clonezilla"
        assert [p.name for p in v.partitions] == ["loop0p1", "loop0p5", "loop0p7", "loop0p8"]
        assert hashlib.sha256(v.disk.read(0, v.disk.size)).hexdigest() == \
            truth["mbr-zstd-split"]["disks"][0]["sha256"]
        p5 = v.partitions[1]
        want = {p["name"]: p["sha256"] for p in truth["mbr-zstd-split"]["partitions"]}
        assert hashlib.sha256(p5.read(0, p5.size)).hexdigest() == want["loop0p5"]
        assert p5.verify().ok
    with vimage.open(os.path.join(TESTDATA, "clonezilla", "saveparts")) as v:
        assert v.disk is None and v.size is None and len(v.partitions) == 2
        with pytest.raises(vimage.VimageError):
            v.read(0, 1)
    wy = json.load(open(os.path.join(TESTDATA, "wyng", "expected.json")))
    key = "ext4-zlib/ext4vol.img/20261203-155447"
    with vimage.open(os.path.join(TESTDATA, "wyng", "ext4-zlib"), session="20261203-155447") as v:
        assert v.kind == "volume" and v.size == wy[key]["size"]
        assert hashlib.sha256(v.read(0, v.size)).hexdigest() == wy[key]["sha256"]


def readme_examples():
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text[text.index("## Python API"):]
    section = section[:section.index("\n## ", 4)]
    return re.findall(r"```python\n(.*?)```", section, re.S)


EXAMPLES = readme_examples()


@pytest.mark.parametrize("k", range(len(EXAMPLES)))
def test_readme_examples_run(k, tmp_path):
    """Every example of README's "Python API" runs as written, from the
    project's folder (the examples name the bundled test data)."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", EXAMPLES[k]], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    assert proc.stdout.strip(), "an example shows nothing"
    for f in ("sda1.raw", "sda1-copy.raw"):
        if os.path.exists(os.path.join(ROOT, f)):
            os.unlink(os.path.join(ROOT, f))
