"""A mount never gives anyone more access than the image file itself: the
virtual files carry the image's owner and mode, --files mounts are nosuid,
nodev (and noexec unless --exec), caches are private.  Root only: the tests
create an unprivileged user and act as that user."""
import json
import os
import pwd
import shutil
import stat
import subprocess
import tempfile

import pytest

from conftest import assert_clean_error, can_mount, have, image_path, mounted, run

import vimage

USER = "vimage-test"

pytestmark = pytest.mark.skipif(not can_mount() or not have("useradd"),
                                reason="needs root, /dev/fuse, fusepy and useradd")


@pytest.fixture(scope="module")
def other_user():
    subprocess.run(["userdel", USER], stderr=subprocess.DEVNULL)
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/bin/sh", USER],
                   check=True)
    try:
        yield pwd.getpwnam(USER)
    finally:
        subprocess.run(["userdel", USER], stderr=subprocess.DEVNULL)


def as_user(user, cmd):
    """Run cmd as the unprivileged user; CompletedProcess with text output."""
    return subprocess.run(["setpriv", "--reuid=%d" % user.pw_uid, "--regid=%d" % user.pw_gid,
                           "--clear-groups", "--"] + cmd, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, errors="replace",
                          timeout=60)


@pytest.fixture
def public_dir():
    """A directory every user can enter (pytest's tmp_path is root-only, which
    would make every 'the other user cannot read' check pass for the wrong reason)."""
    d = tempfile.mkdtemp(prefix="vimage-sec-", dir="/tmp")
    os.chmod(d, 0o755)
    os.mkdir(os.path.join(d, "mnt"))
    os.chmod(os.path.join(d, "mnt"), 0o755)
    try:
        yield d
    finally:
        mp = os.path.join(d, "mnt")
        for _ in range(3):
            if mounted(mp):
                run("umount", "-q", mp)
                subprocess.run(["umount", "-l", mp], stderr=subprocess.DEVNULL)
        assert not mounted(mp)
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("mode,readable", [(0o600, False), (0o640, False), (0o644, True)])
def test_virtual_file_has_the_image_files_access(mode, readable, other_user, public_dir):
    img = os.path.join(public_dir, "ext4.ptcl-img")
    shutil.copy(image_path("ext4-4k.ptcl-img"), img)
    os.chmod(img, mode)
    mp = os.path.join(public_dir, "mnt")
    assert run("mount", img, mp).returncode == 0
    vfile = os.path.join(mp, "ext4.ptcl-img")
    st = os.stat(vfile)
    assert stat.S_IMODE(st.st_mode) == mode & 0o555       # write bits dropped
    assert (st.st_uid, st.st_gid) == (os.stat(img).st_uid, os.stat(img).st_gid)
    proc = as_user(other_user, ["head", "-c", "4096", vfile])
    assert (proc.returncode == 0) == readable, proc.stderr
    if not readable:
        assert "Permission denied" in proc.stderr


def test_split_set_takes_the_most_restrictive_piece(other_user, public_dir):
    whole = os.path.join(public_dir, "sda1.ext4-ptcl-img")
    shutil.copy(image_path("ext4-4k.ptcl-img"), whole)
    subprocess.run(["split", "-a", "2", "-b", "500000", whole, whole + "."], check=True)
    os.unlink(whole)
    os.chmod(whole + ".aa", 0o644)
    os.chmod(whole + ".ab", 0o640)
    os.chmod(whole + ".ac", 0o444)
    mp = os.path.join(public_dir, "mnt")
    assert run("mount", whole + ".aa", mp).returncode == 0
    assert stat.S_IMODE(os.stat(os.path.join(mp, "sda1.ext4-ptcl-img")).st_mode) == 0o440
    assert stat.S_IMODE(os.stat(mp).st_mode) == 0o550
    proc = as_user(other_user, ["ls", mp])
    assert proc.returncode != 0


@pytest.fixture(scope="module")
def setuid_image(tmp_path_factory):
    """A real ext4 holding a setuid-root copy of `id` and a device node, saved
    by partclone.ext4."""
    if not (have("mkfs.ext4") and have("partclone.ext4")):
        pytest.skip("needs mkfs.ext4 and partclone.ext4")
    d = tmp_path_factory.mktemp("suid")
    src = d / "src"
    src.mkdir()
    shutil.copy(shutil.which("id"), src / "id")
    os.chown(src / "id", 0, 0)
    os.chmod(src / "id", 0o4755)
    os.mknod(str(src / "null"), 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.chmod(src / "null", 0o666)
    fs = d / "fs.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(src), str(fs), "8M"], check=True)
    img = d / "suid.ptcl-img"
    subprocess.run(["partclone.ext4", "-c", "-q", "-s", str(fs), "-O", str(img)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.chmod(img, 0o644)
    return str(img)


def test_files_mount_is_nosuid_nodev_noexec(setuid_image, other_user, public_dir):
    mp = os.path.join(public_dir, "mnt")
    proc = run("mount", "--files", setuid_image, mp)
    assert proc.returncode == 0, proc.stderr
    assert b"nosuid,nodev,noexec" in proc.stdout           # the mount line says so
    prog = os.path.join(mp, "id")
    assert os.stat(prog).st_mode & stat.S_ISUID               # the bit is there ...
    ran = as_user(other_user, [prog])
    assert ran.returncode != 0 and "Permission denied" in ran.stderr    # ... but noexec
    opened = as_user(other_user, ["head", "-c", "1", os.path.join(mp, "null")])
    assert opened.returncode != 0 and "Permission denied" in opened.stderr
    assert run("umount", mp).returncode == 0


def test_exec_still_never_setuid(setuid_image, other_user, public_dir):
    mp = os.path.join(public_dir, "mnt")
    proc = run("mount", "--files", "--exec", setuid_image, mp)
    assert proc.returncode == 0, proc.stderr
    assert b"nosuid,nodev" in proc.stdout and b"noexec" not in proc.stdout
    ran = as_user(other_user, [os.path.join(mp, "id")])
    assert ran.returncode == 0, ran.stderr
    assert "euid=0" not in ran.stdout and "uid=%d" % other_user.pw_uid in ran.stdout
    assert run("umount", mp).returncode == 0


def gzip_image(tmp_path):
    out = tmp_path / "ext4.ptcl-img.gz"
    with open(image_path("ext4-4k.ptcl-img"), "rb") as fin, open(out, "wb") as fout:
        subprocess.run(["pigz", "-c"] if have("pigz") else ["gzip", "-c"], stdin=fin,
                       stdout=fout, check=True)
    return out


def test_cache_is_private(tmp_path, mnt):
    cache = tmp_path / "cache"
    img = gzip_image(tmp_path)
    assert run("mount", "--cache-dir", cache, img, mnt).returncode == 0
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700
    files = os.listdir(cache)
    assert any(f.endswith(".index") for f in files)
    for f in files:
        assert stat.S_IMODE(os.stat(cache / f).st_mode) == 0o600, f
    assert run("umount", mnt).returncode == 0
    # a one-frame zstd goes through a cache file: 0600 too
    zimg = tmp_path / "ext4.ptcl-img.zst"
    if have("zstd") and vimage.optional_module("zstandard"):
        subprocess.run(["zstd", "-q", "-o", str(zimg), image_path("ext4-4k.ptcl-img")], check=True)
        assert run("mount", "--cache-dir", cache, "--keep-cache", zimg, mnt).returncode == 0
        for f in os.listdir(cache):
            assert stat.S_IMODE(os.stat(cache / f).st_mode) == 0o600, f
        assert run("umount", mnt).returncode == 0


def test_writable_cache_dir_is_refused(tmp_path, mnt):
    cache = tmp_path / "cache"
    cache.mkdir()
    os.chmod(cache, 0o777)
    proc = run("mount", "--cache-dir", cache, gzip_image(tmp_path), mnt)
    assert_clean_error(proc)
    assert b"writable by others" in proc.stderr


@pytest.mark.parametrize("how", ["other-owner", "group-writable"])
def test_planted_index_is_ignored_and_rebuilt(how, tmp_path, mnt, other_user):
    cache = tmp_path / "cache"
    img = gzip_image(tmp_path)
    assert run("mount", "--cache-dir", cache, img, mnt).returncode == 0
    assert run("umount", mnt).returncode == 0
    index = cache / [f for f in os.listdir(cache) if f.endswith(".index")][0]
    doc = json.loads(index.read_text())
    doc["points"][0][0] = 12345          # a planted index would serve other bytes
    index.write_text(json.dumps(doc))
    if how == "other-owner":
        os.chown(index, other_user.pw_uid, other_user.pw_gid)
    else:
        os.chmod(index, 0o660)
    proc = run("mount", "--cache-dir", cache, img, mnt)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.decode()
    assert "not used" in out and "rebuilt" in out
    assert ("belongs to uid %d" % other_user.pw_uid if how == "other-owner"
            else "writable by its group") in out
    with open(image_path("ext4-4k.ptcl-img"), "rb"):
        pass
    ref = tmp_path / "ref.raw"
    assert run("extract", "-q", image_path("ext4-4k.ptcl-img"), ref).returncode == 0
    assert (mnt / "ext4.ptcl-img").read_bytes() == ref.read_bytes()
    assert run("umount", mnt).returncode == 0
    # rebuilt by us: ours and private now, and reused next time
    st = os.stat(index)
    assert st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == 0o600
    proc = run("mount", "--cache-dir", cache, img, mnt)
    assert b"index reused" in proc.stdout
