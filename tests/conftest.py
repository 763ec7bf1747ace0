"""Shared fixtures: the bundled images, their expected restores, and helpers."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTDATA = os.path.join(ROOT, "testdata")
VIMAGE = os.path.join(ROOT, "vimage.py")
sys.path.insert(0, ROOT)
import vimage  # noqa: E402

with open(os.path.join(TESTDATA, "expected.json")) as f:
    EXPECTED = json.load(f)
for _e in EXPECTED.values():            # the manifest writes "none" for uncompressed
    if _e.get("compression") == "none":
        _e["compression"] = None


def image_path(name):
    return os.path.join(TESTDATA, name)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run(*args, stdin=None, python=None, env=None, timeout=600):
    """Run vimage.py as a user would; returns CompletedProcess (bytes)."""
    cmd = [python or sys.executable, VIMAGE] + [str(a) for a in args]
    return subprocess.run(cmd, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=env, timeout=timeout)


def have(tool):
    return shutil.which(tool) is not None


def assert_clean_error(proc, code=1):
    """Exit status `code` and one line on stderr, never a traceback."""
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == code, (proc.returncode, err)
    assert "Traceback" not in err
    assert "internal error" not in err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("vimage: error: "), err


@pytest.fixture
def tmp(tmp_path):
    return tmp_path


def can_mount():
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        return False
    try:
        vimage.load_fuse()
    except vimage.VimageError:
        return False
    return True


needs_fuse = pytest.mark.skipif(not can_mount(), reason="needs root, /dev/fuse and fusepy")


def mounted(path):
    path = os.path.realpath(str(path))
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


@pytest.fixture
def mnt(tmp_path):
    d = tmp_path / "mnt"
    d.mkdir()
    yield d
    for _ in range(3):
        if mounted(d):
            run("umount", "-q", d)
            subprocess.run(["umount", "-l", str(d)], stderr=subprocess.DEVNULL)
    assert not mounted(d)
    for record in files_records(d):      # a --files mount that left its FUSE layer behind
        subprocess.run(["umount", "-l", record["fuse"]], stderr=subprocess.DEVNULL)
    assert not files_records(d)


def files_records(mountpoint):
    """The --files state records that name `mountpoint`."""
    out = []
    try:
        names = os.listdir(vimage.RUN_DIR)
    except OSError:
        return out
    for name in names:
        if name.endswith(".json"):
            try:
                with open(os.path.join(vimage.RUN_DIR, name)) as f:
                    record = json.load(f)
            except (OSError, ValueError):
                continue
            if record.get("mountpoint") == str(mountpoint):
                out.append(record)
    return out


def threaded_random_reads(path, want, threads=8, rounds=100, sizes=(1, 511, 4096, 65536, 300000)):
    """Read random ranges of `path` from several threads at once; returns the
    (offset, size) of every read that did not give `want`'s bytes."""
    import random
    import threading
    errors = []

    def worker(seed):
        rnd = random.Random(seed)
        fd = os.open(str(path), os.O_RDONLY)
        try:
            for _ in range(rounds):
                off, n = rnd.randrange(len(want)), rnd.choice(sizes)
                if os.pread(fd, n, off) != want[off:off + n]:
                    errors.append((off, n))
        finally:
            os.close(fd)
    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return errors
