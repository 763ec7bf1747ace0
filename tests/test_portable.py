"""The promises of a bare copy: Python 3.8 floor, the standard library alone
for info/verify/extract, and the pure-Python XXH fallback giving the same
digests as the C package."""
import glob
import os
import random
import shutil
import subprocess
import sys

import pytest

from conftest import EXPECTED, ROOT, image_path, sha256_file

import vimage


def find_python38():
    """A working Python 3.8 (the floor), if this machine has one."""
    cands = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.8*/bin/python3.8")))
    cands += [shutil.which("python3.8")]
    for cand in cands:
        if cand and subprocess.run([cand, "-c", "import venv"], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL).returncode == 0:
            return cand
    return None


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory):
    """A venv with no packages at all, on Python 3.8 when the machine has it."""
    base = find_python38() or sys.executable
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    probe = subprocess.run([py, "-c", "import xxhash"], stderr=subprocess.PIPE)
    assert probe.returncode != 0, "the bare venv must not see xxhash"
    return py


def bare_copy(tmp_path):
    """vimage.py copied alone into an empty directory, as onto a rescue stick."""
    d = tmp_path / "stick"
    d.mkdir()
    shutil.copy(os.path.join(ROOT, "vimage.py"), d)
    return str(d / "vimage.py")


def test_bare_copy_reads_every_stdlib_format(bare_python, tmp_path):
    script = bare_copy(tmp_path)
    done = 0
    for name in sorted(EXPECTED):
        e = EXPECTED[name]
        if e.get("compression") in ("zstd", "lz4", "lzop"):
            continue
        for cmd in (["info", image_path(name)], ["verify", "-q", image_path(name)]):
            proc = subprocess.run([bare_python, script] + cmd, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
            assert proc.returncode == 0, (name, proc.stderr)
        out = tmp_path / "out.raw"
        proc = subprocess.run([bare_python, script, "extract", "-q", "--force", image_path(name),
                               str(out)], stderr=subprocess.PIPE)
        assert proc.returncode == 0, (name, proc.stderr)
        assert sha256_file(out) == e["sha256"], name
        done += 1
    assert done >= 5


def test_bare_copy_names_the_missing_package(bare_python, tmp_path):
    zst = [n for n in EXPECTED if EXPECTED[n].get("compression") == "zstd"]
    if not zst:
        pytest.skip("no zstd image bundled")
    proc = subprocess.run([bare_python, bare_copy(tmp_path), "verify", image_path(zst[0])],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert err.count("\n") == 1 and "zstandard" in err and "pip install" in err


def test_vermin_floor_is_38():
    vermin = shutil.which("vermin") or os.path.join(os.path.dirname(sys.executable), "vermin")
    if not os.path.exists(vermin):
        pytest.skip("vermin not installed")
    proc = subprocess.run([vermin, "-t=3.8-", "--violations", "--no-tips",
                           os.path.join(ROOT, "vimage.py")], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
    assert proc.returncode == 0, proc.stdout.decode()


def test_pure_python_xxh_matches_c():
    xxhash = pytest.importorskip("xxhash")
    rnd = random.Random(5)
    for n in list(range(0, 300)) + [1023, 1024, 1025, 4096, 65536 + 7, 300000]:
        data = bytes(rnd.getrandbits(8) for _ in range(n)) if n < 5000 else os.urandom(n)
        assert vimage.PyXXH64(data).intdigest() == xxhash.xxh64(data).intdigest()
        assert vimage.PyXXH3_128(data).intdigest() == xxhash.xxh3_128(data).intdigest()
    # streaming: digest in the middle does not end the stream
    a, b = vimage.PyXXH3_128(), xxhash.xxh3_128()
    for k in (1, 100, 239, 2000, 70000):
        chunk = os.urandom(k)
        a.update(chunk)
        b.update(chunk)
        assert a.intdigest() == b.intdigest()


def test_xxh_images_verify_with_the_fallback(monkeypatch, capsys):
    monkeypatch.setattr(vimage, "optional_module",
                        lambda name: None if name == "xxhash" else __import__(name))
    names = [n for n in EXPECTED if EXPECTED[n].get("checksum") in ("xxh64", "xxh128")
             and not EXPECTED[n].get("compression")]
    if not names:
        pytest.skip("no XXH image bundled")
    for name in names:
        assert vimage.main(["verify", "-q", image_path(name)]) == 0, name


def test_bare_copy_runs_the_api_examples(bare_python, tmp_path):
    """README's Python API examples, with a bare copy of vimage.py on the path
    and no optional package (none of them needs one)."""
    from test_api import EXAMPLES
    stick = os.path.dirname(bare_copy(tmp_path))
    env = dict(os.environ, PYTHONPATH=stick)
    ran = 0
    for code in EXAMPLES:
        if "zst" in code:                    # would need zstandard
            continue
        proc = subprocess.run([bare_python, "-c", code], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.returncode == 0, (code, proc.stderr.decode()[-2000:])
        ran += 1
    assert ran >= 5
