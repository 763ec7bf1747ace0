"""sparsebak and Wyng backups: any session of a volume, as a virtual disk image.

Real Wyng 0.8 archives (testdata/wyng, with what `wyng receive` wrote for
every session) and generated archives of every earlier era
(testdata/sparsebak, made by testdata/make-sparsebak.py from the format
notes, with the source images' sha256)."""
import hashlib
import json
import os
import shutil
import subprocess
import zlib

import pytest

from conftest import (ROOT, TESTDATA, assert_clean_error, files_records, mounted, needs_fuse, run,
                      sha256_file)

import vimage

SB = os.path.join(TESTDATA, "sparsebak")
WY = os.path.join(TESTDATA, "wyng")
with open(os.path.join(SB, "expected.json")) as f:
    SBX = json.load(f)
with open(os.path.join(WY, "expected.json")) as f:
    WYX = json.load(f)
VARIANTS = sorted(SBX["variants"])

# every (input folder, session id, expected sha256, size)
CASES = [(os.path.join(SB, v["path"]), s["id"], s["sha256"], s["size"])
         for name, v in sorted(SBX["variants"].items()) for s in v["sessions"]]
CASES += [(os.path.join(WY, key.split("/")[0]), key.split("/")[2], v["sha256"], v["size"])
          for key, v in sorted(WYX.items())]
IDS = ["%s@%s" % (os.path.relpath(p, TESTDATA).split("/")[1], s) for p, s, _h, _n in CASES]


@pytest.mark.parametrize("path,session,sha,size", CASES, ids=IDS)
def test_extract_every_session(path, session, sha, size, tmp_path):
    out = tmp_path / "vol.img"
    proc = run("extract", "-q", "--session", session, path, out)
    assert proc.returncode == 0, proc.stderr
    assert os.path.getsize(out) == size and sha256_file(out) == sha
    # zero chunks stay holes
    assert os.stat(out).st_blocks * 512 < size


@pytest.mark.parametrize("variant", VARIANTS)
def test_newest_session_is_the_default_and_verifies(variant):
    v = SBX["variants"][variant]
    path = os.path.join(SB, v["path"])
    proc = run("verify", "-q", "--all-sessions", path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if v["hash"]:
        assert b"OK: 3 of 3 sessions verified" in proc.stdout
    d = json.loads(run("info", "--json", path).stdout)
    assert d["session"] == v["latest"] and d["chunk_size"] == v["chunksize"]
    assert d["format"] in ("sparsebak", "wyng")
    assert [s["name"] for s in d["volumes"][0]["sessions"]] == [s["name"] for s in v["sessions"]]
    assert [s["size"] for s in d["volumes"][0]["sessions"]][-1] in (v["sessions"][-1]["size"], None)


def test_archive_folder_and_session_folder_inputs(tmp_path):
    v = SBX["variants"]["E2"]
    archive = os.path.join(SB, v["archive"])
    for s in v["sessions"]:
        for path, extra in ((archive, ["--volume", v["volume"], "--session", s["name"]]),
                            (os.path.join(SB, v["path"], s["name"]), [])):
            out = tmp_path / "o.img"
            proc = run("extract", "-q", "--force", *(extra + [path, out]))
            assert proc.returncode == 0, proc.stderr
            assert sha256_file(out) == s["sha256"]
    proc = run("info", "--session", "19990101-000000", archive)
    assert_clean_error(proc)
    assert b"no session" in proc.stderr


def test_real_wyng_info_and_chain():
    d = json.loads(run("info", "--json", os.path.join(WY, "ext4-zlib")).stdout)
    assert d["format"] == "wyng" and d["volume"] == "ext4vol.img"
    assert d["chunk_size"] == 262144 and d["hash"] == "blake2b" and d["compression"] == "zlib"
    assert len(d["volumes"][0]["sessions"]) == 3
    proc = run("verify", "-q", "--all-sessions", os.path.join(WY, "ext4-zlib"))
    assert proc.returncode == 0, proc.stdout
    assert b"the format-3 metadata hash chain" in proc.stdout


def copy(src, tmp_path):
    dst = tmp_path / os.path.basename(src)
    shutil.copytree(src, dst)
    return dst


def some_chunk(archive):
    for dirpath, _d, files in sorted(os.walk(archive)):
        for f in sorted(files):
            if f.startswith("x") and os.path.getsize(os.path.join(dirpath, f)) > 100:
                return os.path.join(dirpath, f)


def test_verify_catches_damage_in_a_real_archive(tmp_path):
    arch = copy(os.path.join(WY, "ext4-zlib"), tmp_path)
    chunk = some_chunk(arch)
    data = bytearray(open(chunk, "rb").read())
    data[len(data) // 2] ^= 1
    open(chunk, "wb").write(bytes(data))
    proc = run("verify", "-q", "--all-sessions", arch)
    assert proc.returncode == 1 and b"digest mismatch" in proc.stdout
    addr = os.path.basename(chunk)[1:]
    assert addr.encode() in proc.stdout
    # a deleted chunk file
    arch2 = copy(os.path.join(WY, "ext4-zstd-64k"), tmp_path / "b")
    os.unlink(some_chunk(arch2))
    proc = run("verify", "-q", "--all-sessions", arch2)
    assert proc.returncode == 1 and b"No such file" in proc.stdout


def test_changed_manifest_line_breaks_the_chain(tmp_path):
    arch = copy(os.path.join(WY, "ext4-zlib"), tmp_path)
    vol = [d for d in os.listdir(arch) if d.startswith("Vol_")][0]
    sess = sorted(d for d in os.listdir(arch / vol) if d.startswith("S_"))[-1]
    mf = arch / vol / sess / "manifest.z"
    lines = zlib.decompress(mf.read_bytes()).decode().splitlines(True)
    i = next(k for k, l in enumerate(lines) if not l.startswith("0 "))
    digest, addr = lines[i].split()
    lines[i] = digest[:-2] + ("A=" if digest[-2] != "A" else "B=") + " " + addr + "\n"
    mf.write_bytes(zlib.compress("".join(lines).encode(), 4))
    proc = run("verify", "-q", arch)
    assert proc.returncode == 1
    out = proc.stdout.decode()
    assert "manifest.z does not match its hash in info" in out
    assert "digest mismatch" in out


def broken(kind, tmp_path):
    out = tmp_path / "broken"
    subprocess.run([os.sys.executable, os.path.join(TESTDATA, "make-sparsebak.py"), "--broken",
                    kind, "--from", SB, str(out)], check=True, stdout=subprocess.DEVNULL)
    return out, SBX["broken"][kind]


@pytest.mark.parametrize("kind", ["digest", "gzip-crc", "length", "missing"])
def test_broken_archives_are_named(kind, tmp_path):
    out, b = broken(kind, tmp_path)
    path = out / b["path"]
    proc = run("verify", "-q", "--all-sessions", path)
    assert proc.returncode == 1, proc.stdout
    text = proc.stdout.decode()
    assert "BAD: " in text and ": FAILED: " in text
    assert "x" + b["error"].split("x", 2)[1][:16] in text or b["error"].split(":")[1].strip() in text
    for s in b.get("good_sessions", []):          # the sessions the damage is not in still extract
        o = tmp_path / ("%s.img" % s["id"])
        assert run("extract", "-q", "--session", s["id"], path, o).returncode == 0
        assert sha256_file(o) == s["sha256"]


@pytest.mark.parametrize("kind", ["encrypted", "unknown-version", "c490aeb-tmp"])
def test_refused_archives(kind, tmp_path):
    out, b = broken(kind, tmp_path)
    proc = run("info", out / b["path"])
    assert_clean_error(proc)
    assert {"encrypted": b"is encrypted (ci = 35", "unknown-version": b"[WYNG09]",
            "c490aeb-tmp": b"no finished session"}[kind] in proc.stderr


@pytest.mark.parametrize("kind", ["tmp", "tmp-wyng"])
def test_unfinished_sessions_are_skipped_and_named(kind, tmp_path):
    out, b = broken(kind, tmp_path)
    d = json.loads(run("info", "--json", out / b["path"]).stdout)
    assert d["volumes"][0]["unfinished_sessions"]
    assert run("verify", "-q", out / b["path"]).returncode == 0


@pytest.mark.parametrize("variant", ["C1", "C2", "C3", "D1", "D2", "D3"])
def test_against_the_seeds_manual_restore(variant, tmp_path):
    """The README's seven steps (corrected) give the same image as vimage."""
    v = SBX["variants"][variant]
    path = os.path.join(SB, v["path"])
    for s in v["sessions"]:
        manual, ours = tmp_path / "manual.img", tmp_path / "ours.img"
        subprocess.run(["bash", os.path.join(ROOT, "tests", "manual_restore.sh"), path, s["name"],
                        str(manual), str(v["chunksize"])], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        assert run("extract", "-q", "--force", "--session", s["name"], path, ours).returncode == 0
        assert sha256_file(manual) == sha256_file(ours) == s["sha256"]


def test_random_reads_through_the_reader():
    import random
    for name in ("C3", "E2", "E3"):
        v = SBX["variants"][name]
        backup = vimage.open_backup(os.path.join(SB, v["path"]), session=v["sessions"][1]["name"])
        m = backup.members[0]
        r = m.reader(vimage.OpenContext(quiet=True))
        want = bytearray(m.size)

        class Sink:
            wants_data = True

            def write(self, off, data):
                want[off:off + len(data)] = data
        m.scan(Sink(), lambda p: pytest.fail(str(p)))
        assert hashlib.sha256(want).hexdigest() == v["sessions"][1]["sha256"]
        rnd = random.Random(name)
        for _ in range(200):
            off, n = rnd.randrange(m.size), rnd.choice([1, 4096, 65536, 300000])
            assert r.read(off, n) == bytes(want[off:off + n])


@needs_fuse
def test_mount_a_session(mnt):
    key = "ext4-zlib/ext4vol.img/20261203-155447"
    proc = run("mount", "--session", "20261203-155447", os.path.join(WY, "ext4-zlib"), mnt)
    assert proc.returncode == 0, proc.stderr
    assert os.listdir(mnt) == ["ext4vol.img"]
    assert sha256_file(mnt / "ext4vol.img") == WYX[key]["sha256"]
    assert run("umount", mnt).returncode == 0


@needs_fuse
def test_mount_files_of_a_volume(mnt, tmp_path):
    v = SBX["variants"]["E3"]
    proc = run("mount", "--files", os.path.join(SB, v["path"]), mnt)
    assert proc.returncode == 0, proc.stderr
    assert "app.conf" in os.listdir(mnt)
    assert b"mode = final!" in (mnt / "app.conf").read_bytes()
    assert run("umount", mnt).returncode == 0
    assert not mounted(mnt)


@needs_fuse
def test_mount_files_of_an_unreadable_volume_fails_and_leaves_nothing(mnt, tmp_path):
    """The chunk holding the file system's superblock is damaged in every
    session: --files says why it cannot mount, exits 1, and leaves no FUSE
    layer or state record behind."""
    vol = copy(os.path.join(SB, SBX["variants"]["E3"]["path"]), tmp_path)
    for dirpath, _d, files in os.walk(vol):
        for f in files:
            if f == "x0000000000000000":
                with open(os.path.join(dirpath, f), "r+b") as chunk:
                    chunk.seek(8)
                    chunk.write(b"\xff" * 16)
    proc = run("mount", "--files", vol, mnt)
    assert proc.returncode == 1
    assert b"cannot mount the files of vm-test-private: reading its first" in proc.stderr
    assert b"x0000000000000000" in proc.stderr
    assert not mounted(mnt) and not files_records(mnt)


@needs_fuse
def test_mount_from_a_relative_path(mnt):
    """The chunks are opened as they are read, after the mount process has
    left the working directory: a relative archive path must still work."""
    key = "ext4-zlib/ext4vol.img/20261203-155455"
    proc = subprocess.run([os.sys.executable, os.path.join(ROOT, "vimage.py"), "mount",
                           "wyng/ext4-zlib", str(mnt)], cwd=TESTDATA, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
    assert proc.returncode == 0, proc.stderr
    assert sha256_file(mnt / "ext4vol.img") == WYX[key]["sha256"]
    assert run("umount", mnt).returncode == 0


def test_tar_sessions(tmp_path):
    """sparsebak --tarfile (2018-10): each session is S_x/S_x.tar whose members
    carry the absolute .../S_x-tmp/... path.  Made here from variant D1."""
    import tarfile
    v = SBX["variants"]["D1"]
    vol = tmp_path / "vol"
    shutil.copytree(os.path.join(SB, v["path"]), vol)
    for s in v["sessions"]:
        sdir = vol / s["name"]
        tar = sdir / (s["name"] + ".tar")
        with tarfile.open(tar, "w") as tf:
            for bucket in sorted(os.listdir(sdir)):
                if len(bucket) == 9 and (sdir / bucket).is_dir():
                    for chunk in sorted(os.listdir(sdir / bucket)):
                        tf.add(str(sdir / bucket / chunk), arcname="/sparsebak/qubes_dom0%%pool00/"
                               "vm-test-private/%s-tmp/%s/%s" % (s["name"], bucket, chunk))
                    shutil.rmtree(sdir / bucket)
        info = (sdir / "info").read_text().replace("format = folders", "format = tar")
        (sdir / "info").write_text(info)
    for s in v["sessions"]:
        out = tmp_path / ("%s.img" % s["id"])
        proc = run("extract", "-q", "--session", s["id"], vol, out)
        assert proc.returncode == 0, proc.stderr
        assert sha256_file(out) == s["sha256"]
    assert run("verify", "-q", "--all-sessions", vol).returncode == 0
