#!/usr/bin/env python3
"""make bench: vimage side by side with its peers and floors, on multi-GB data, in one run.

    python tests/bench.py                      # everything (make bench)
    python tests/bench.py MODE [MODE ...]      # some parts; the data is built once
    python tests/bench.py compressed zst xz    # some codecs of the compressed part
    python tests/bench.py build                # only build the data
    options: --rounds N (default 3), --reads N (random reads per round of the
             uncompressed mount, default 10000), --profile (cProfile the
             vimage mount/API where a target is missed; text in BENCH/profiles/)

MODES: mount verify api compressed clonezilla raw wyng

Methodology.  Absolute times on these machines move 2-4x from minute to
minute, so only ratios taken in the same run count: every comparison runs its
contenders side by side, in rounds whose order rotates, and keeps the best of
`--rounds` rounds (1 for the ~100 s bzip2 row).  FUSE comparisons mount every
contender at once (vimage under fusepy/libfuse2 and mfusepy/libfuse3,
imagebackup's vpartclone, a do-nothing fusepy file system and a do-nothing C
libfuse3 one, tests/bench_nullfs.c, both serving a page-cached raw file of
the same size) and before each turn read that contender's backing files into
the page cache (untimed), after it drop the page cache of the virtual file
and of the backing files (POSIX_FADV_DONTNEED), so no contender pays for
reclaiming another's cache.  No timing assertion lives in the test suite.

Data (built once, as root, under $BENCH_DIR, default build/bench): a 4 GiB
ext4 holding ~3.3 GB of files (half random, half text) kept as fs.raw and saved
by Debian's partclone.ext4 with CRC32 (bench.ptcl-img, 3.37 GB), the same data
with XXH128, a 2 TiB nearly empty ext4's partclone image, bench.ptcl-img
compressed by pigz, zstd -T0, xz -T2, lbzip2 and lz4, two Clonezilla
directories saved by Debian's ocs-sr from a loop disk with two ext4 partitions
(-z0 and -z9p), a raw image with a sha256sum sidecar and a par2 set, and a
sparsebak (gzip, bucketed, manifest) archive of a 4 GiB volume with three
sessions.  Results: BENCH/results.md (the header says machine, time and tool
versions; each part is replaced when it is run again).
"""
import gzip
import hashlib
import json
import multiprocessing
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BENCH = os.path.abspath(os.environ.get("BENCH_DIR", os.path.join(ROOT, "build", "bench")))
PY = sys.executable
VIMAGE = os.path.join(ROOT, "vimage.py")
IMG = os.path.join(BENCH, "bench.ptcl-img")
IMG_XXH = os.path.join(BENCH, "bench-xxh128.ptcl-img")
BIG = os.path.join(BENCH, "big2t.ptcl-img")
FSRAW = os.path.join(BENCH, "fs.raw")             # the 4 GiB ext4 itself
IB = os.path.join(BENCH, "ibvenv", "bin")
NULLC = os.path.join(BENCH, "bench_nullfs")
NULLC_SRC = os.path.join(ROOT, "tests", "bench_nullfs.c")
MNT = os.path.join(BENCH, "mnt")
CZ = os.path.join(BENCH, "clonezilla")
RAWDIR = os.path.join(BENCH, "raw")
WYNG = os.path.join(BENCH, "wyng")
PROFILES = os.path.join(BENCH, "profiles")
RESULTS = os.path.join(BENCH, "results.md")
PARTS = os.path.join(BENCH, "results")
MiB = 1 << 20
GiB = 1 << 30

OPTS = {"rounds": 3, "reads": 10000, "profile": False}
MODES = ["mount", "verify", "api", "compressed", "clonezilla", "raw", "wyng"]


# ---------------------------------------------------------------------------
# small helpers

def sh(cmd, **kw):
    return subprocess.run(cmd, shell=isinstance(cmd, str), check=True, **kw)


def quiet(cmd, **kw):
    return subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)


def out_of(cmd):
    try:
        return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              shell=isinstance(cmd, str)).stdout.decode("utf-8", "replace")
    except OSError as e:
        return str(e)


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def say(text):
    print(text, file=sys.stderr, flush=True)


def files_of(path):
    """The regular files a backup path consists of (for warming/dropping)."""
    if os.path.isdir(path):
        got = []
        for base, _dirs, names in os.walk(path):
            got += [os.path.join(base, n) for n in names]
        return sorted(got)
    return [path]


def warm(paths):
    buf = bytearray(16 * MiB)
    for p in paths:
        for f in files_of(p):
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass


def drop(paths):
    for p in paths:
        for f in files_of(p):
            try:
                fd = os.open(f, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def read_seq(path, bs=MiB):
    buf = bytearray(bs)
    n = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            k = f.readinto(buf)
            if not k:
                break
            n += k
    return n


def random_offsets(size, n, seed, align=4096):
    rnd = random.Random(seed)
    return [rnd.randrange(0, size // align) * align for _ in range(n)]


def random_reads(path, offsets, size=4096):
    """Latencies of preads at offsets (FADV_RANDOM): (total, p50, p99)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        lat = []
        pc = time.perf_counter
        for off in offsets:
            t = pc()
            os.pread(fd, size, off)
            lat.append(pc() - t)
    finally:
        os.close(fd)
    total = sum(lat)
    lat.sort()
    return {"time": total, "p50": lat[len(lat) // 2], "p99": lat[min(len(lat) - 1,
                                                                     int(len(lat) * 0.99))],
            "n": len(lat)}


def du_bytes(path):
    """Disk space really used below path (allocated blocks)."""
    if not os.path.exists(path):
        return 0
    total = 0
    for f in files_of(path):
        try:
            total += os.lstat(f).st_blocks * 512
        except OSError:
            pass
    return total


def human(n):
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= k:
            return "%.2f %s" % (n / k, unit)
    return "%d B" % n


def s(x):
    return "—" if x is None else ("%.2f s" % x if x < 100 else "%.0f s" % x)


def ms(x):
    return "%.2f ms" % (x * 1e3) if x < 0.01 else "%.1f ms" % (x * 1e3)


def rounds(names, fn, prepare=None, finish=None, n=None, label=""):
    """Run fn(name) for every contender, in rounds whose order rotates;
    {name: [result per round]}.  A result is seconds or a dict with 'time'."""
    n = n or OPTS["rounds"]
    res = {k: [] for k in names}
    for r in range(n):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            if prepare:
                prepare(name)
            got = fn(name)
            if finish:
                finish(name)
            res[name].append(got)
            t = got["time"] if isinstance(got, dict) else got
            say("  %s round %d/%d: %-42s %8.3f s" % (label, r + 1, n, name, t))
    return res


def best(results):
    """The best round of one contender (the one with the smallest time)."""
    return min(results, key=lambda g: g["time"] if isinstance(g, dict) else g)


def bt(results):
    b = best(results)
    return b["time"] if isinstance(b, dict) else b


# ---------------------------------------------------------------------------
# results

class Section:
    """One part of results.md: a title, a table of rows with targets, notes."""

    def __init__(self, key, title, intro=""):
        self.key, self.title, self.intro = key, title, intro
        self.rows, self.notes, self.extra = [], [], []

    def row(self, what, ours, peer, peer_fig, ratio, target, ok):
        """ok: True, False or None (no target)."""
        mark = "" if ok is None else ("✔" if ok else "✘")
        self.rows.append((what, ours, peer, peer_fig, ratio, target, mark))
        say("| %s | %s | %s | %s | %s | %s | %s |" % self.rows[-1])

    def note(self, text):
        self.notes.append(text)
        say("note: " + text)

    def table(self, text):
        self.extra.append(text)

    def render(self):
        out = ["## %s" % self.title, ""]
        if self.intro:
            out += [self.intro, ""]
        if self.rows:
            out += ["| what | vimage | compared with | its figure | ratio | target | |",
                    "|---|---|---|---|---|---|---|"]
            out += ["| %s | %s | %s | %s | %s | %s | %s |" % r for r in self.rows]
            out.append("")
        for t in self.extra:
            out += [t, ""]
        out += ["* " + n for n in self.notes]
        return "\n".join(out).rstrip() + "\n"

    def save(self):
        os.makedirs(PARTS, exist_ok=True)
        with open(os.path.join(PARTS, self.key + ".md"), "w") as f:
            f.write(self.render())
        write_results()
        print()
        print(self.render(), flush=True)


def versions():
    def deb(p):
        v = out_of(["dpkg-query", "-W", "-f", "${Version}", p]).strip()
        return v if v and "no packages" not in v else "absent"
    pip = {}
    for m in ("fusepy", "mfusepy", "zstandard", "pyzstd", "lz4", "xxhash", "blake3", "tqdm"):
        try:
            from importlib import metadata
            pip[m] = metadata.version(m)
        except Exception:
            pip[m] = "absent"
    ib = out_of([os.path.join(IB, "python"), "-c",
                 "from importlib import metadata; print(metadata.version('imagebackup'))"]).strip()
    try:
        import vimage
        vv = getattr(vimage, "__version__", "?")
    except Exception as e:           # pragma: no cover
        vv = "not importable: %s" % e
    head = out_of(["git", "-C", ROOT, "log", "-1", "--format=%h %cd", "--date=iso"]).strip()
    dirty = out_of(["git", "-C", ROOT, "status", "--porcelain", "vimage.py"]).strip()
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = re.search(r"model name\s*:\s*(.*)", f.read()).group(1)
    except (OSError, AttributeError):
        pass
    with open("/proc/meminfo") as f:
        mem = int(re.search(r"MemTotal:\s*(\d+)", f.read()).group(1)) / 1048576.0
    debs = ["partclone", "clonezilla", "libfuse2", "libfuse3-3", "fuse3", "pigz", "gzip", "xz-utils",
            "zstd", "lz4", "lbzip2", "bzip2", "par2", "coreutils"]
    return "\n".join([
        "machine: %s, %s, %d cores, %.1f GiB RAM, kernel %s" % (
            platform.node(), cpu, os.cpu_count() or 0, mem, platform.release()),
        "run: %s; Python %s (%s)" % (time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                                     platform.python_version(), PY),
        "vimage %s, vimage.py of commit %s%s" % (vv, head, " + local changes" if dirty else ""),
        "imagebackup %s (vpartclone, own venv)" % (ib or "absent"),
        "Python packages: " + ", ".join("%s %s" % kv for kv in pip.items()),
        "Debian packages: " + ", ".join("%s %s" % (p, deb(p)) for p in debs),
    ])


def write_results():
    parts = []
    for key in MODES + ["build"]:
        p = os.path.join(PARTS, key + ".md")
        if os.path.exists(p):
            with open(p) as f:
                parts.append(f.read())
    head = ["# vimage benchmark results (`make bench`, tests/bench.py)", "",
            "```", versions(), "```", "",
            "Only ratios taken in the same run count (absolute times here move 2-4x from "
            "minute to minute): contenders run side by side in rotating order, best of %d "
            "rounds unless a row says otherwise; FUSE contenders are mounted at once, each "
            "turn starts with its backing files in the page cache and ends by dropping the "
            "virtual file's and the backing files' cache. Each part below says when it ran."
            % OPTS["rounds"], ""]
    with open(RESULTS, "w") as f:
        f.write("\n".join(head) + "\n" + "\n".join(parts))


def when():
    return "Run %s." % time.strftime("%Y-%m-%d %H:%M:%S")


# ---------------------------------------------------------------------------
# mounts

def wait_file(path, size=None, timeout=600, proc=None):
    end = time.time() + timeout
    while time.time() < end:
        try:
            st = os.stat(path)
            if size is None or st.st_size == size:
                return
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("the file system for %s ended (exit %s)" % (path, proc.returncode))
        time.sleep(0.02)
    raise RuntimeError("%s did not appear" % path)


def is_mounted(mp):
    mp = os.path.realpath(mp)
    with open("/proc/mounts") as f:
        return any(line.split()[1] == mp for line in f)


def unmount(mp):
    if is_mounted(mp):
        if quiet(["fusermount", "-u", mp]).returncode and quiet(["umount", mp]).returncode:
            quiet(["umount", "-l", mp])


def fuse_env(binding):
    env = dict(os.environ)
    if binding == "mfusepy3":
        env.update(VIMAGE_FUSE="mfusepy", FUSE_LIBRARY_NAME="fuse3")
    elif binding == "mfusepy2":
        env.update(VIMAGE_FUSE="mfusepy", FUSE_LIBRARY_NAME="fuse")
    else:
        env.update(VIMAGE_FUSE="fuse")
    return env


LIVE = []


class Mount:
    """One mounted contender.  kind: vimage, vpartclone, nullpy, nullc."""

    def __init__(self, kind, source, mp, binding="fusepy", opts=(), name=None):
        self.kind, self.source, self.mp = kind, source, mp
        os.makedirs(mp, exist_ok=True)
        unmount(mp)
        self.proc, self.rss_kib = None, None
        t = time.perf_counter()
        if kind == "vimage":
            r = subprocess.run(["/usr/bin/time", "-f", "%M %e", PY, VIMAGE, "mount", "-q"]
                               + list(opts) + [source, mp], env=fuse_env(binding),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            if r.returncode:
                raise RuntimeError("vimage mount %s failed: %s" % (source, r.stderr.decode()))
            self.mount_time = time.perf_counter() - t
            self.rss_kib = int(r.stderr.decode().split()[-2])
            self.summary = r.stdout.decode()
            LIVE.append(self)
            names = sorted(os.listdir(mp))
            self.files = {n: os.path.join(mp, n) for n in names}
            self.file = self.files.get(name) or self.files[names[0]]
            return
        name = name or os.path.basename(source)
        self.file = os.path.join(mp, name)
        if kind == "vpartclone":
            cmd = [os.path.join(IB, "vpartclone"), "-q", "-m", mp, source]
            size = None
        elif kind == "nullpy":
            cmd = [PY, os.path.abspath(__file__), "_nullfs", source, name, mp]
            size = os.path.getsize(source)
        elif kind == "nullc":
            cmd = [NULLC, source, name, mp, "-f", "-s", "-o", "ro"]
            size = os.path.getsize(source)
        else:
            raise ValueError(kind)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        LIVE.append(self)
        wait_file(self.file, size, proc=self.proc)
        self.mount_time = time.perf_counter() - t

    def server_pid(self):
        if self.proc is not None:
            return self.proc.pid
        mp = os.path.realpath(self.mp)
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open("/proc/%s/cmdline" % pid, "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if b"mount" in argv and any(a.endswith(b"vimage.py") for a in argv) and \
                    os.path.realpath(argv[-2].decode() if argv[-1] == b"" else
                                     argv[-1].decode()) == mp:
                return int(pid)
        return None

    def hwm_kib(self):
        """Peak RSS of the serving process so far."""
        pid = self.server_pid()
        if pid is None:
            return None
        try:
            with open("/proc/%d/status" % pid) as f:
                return int(re.search(r"VmHWM:\s*(\d+)", f.read()).group(1))
        except (OSError, AttributeError):
            return None

    def close(self):
        if self in LIVE:
            LIVE.remove(self)
        if self.kind == "vimage":
            if quiet([PY, VIMAGE, "umount", "-q", self.mp]).returncode:
                unmount(self.mp)
            return
        unmount(self.mp)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def close_all():
    for m in list(LIVE):
        try:
            m.close()
        except Exception as e:           # pragma: no cover
            say("unmount of %s failed: %s" % (m.mp, e))


def nullfs_main(backing, name, mp):
    """The do-nothing fusepy file system: one file, pread from a backing file."""
    import errno
    import stat as st
    import fuse
    fd = os.open(backing, os.O_RDONLY)
    size = os.fstat(fd).st_size
    path = "/" + name
    now = time.time()
    fattr = {"st_mode": st.S_IFREG | 0o444, "st_nlink": 1, "st_size": size,
             "st_atime": now, "st_mtime": now, "st_ctime": now}
    dattr = {"st_mode": st.S_IFDIR | 0o555, "st_nlink": 2, "st_atime": now, "st_mtime": now,
             "st_ctime": now}
    pread = os.pread

    class NullFS(fuse.Operations):
        def getattr(self, p, fh=None):
            if p == "/":
                return dattr
            if p == path:
                return fattr
            raise fuse.FuseOSError(errno.ENOENT)

        def readdir(self, p, fh):
            return [".", "..", name]

        def open(self, p, flags):
            return 0

        def read(self, p, n, offset, fh):
            return pread(fd, n, offset)

    fuse.FUSE(NullFS(), mp, foreground=True, ro=True, nothreads=True)


def build_nullc():
    if os.path.exists(NULLC) and os.path.getmtime(NULLC) >= os.path.getmtime(NULLC_SRC):
        return True
    if quiet(["pkg-config", "--exists", "fuse3"]).returncode:
        if os.geteuid() == 0 and shutil.which("apt-get"):
            quiet(["apt-get", "install", "-y", "-qq", "libfuse3-dev"],
                  env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    flags = out_of(["pkg-config", "--cflags", "--libs", "fuse3"]).split()
    r = subprocess.run(["gcc", "-O2", "-Wall", "-o", NULLC, NULLC_SRC] + flags,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if r.returncode:
        say("bench_nullfs.c did not build (libfuse3-dev missing?):\n" + r.stdout.decode())
        return False
    return True


# ---------------------------------------------------------------------------
# data

TEXT = b"".join(b"%08d the quick brown fox jumps over the lazy dog %d\n" % (i, i * 7)
                for i in range(20000))[:MiB]


def fill(mnt, nfiles, prefix="f"):
    """nfiles files of 64 MiB, each 1 MiB piece random or text in turn."""
    for i in range(nfiles):
        with open(os.path.join(mnt, "%s%02d.bin" % (prefix, i)), "wb") as f:
            for j in range(64):
                f.write(os.urandom(MiB) if (i + j) % 2 else TEXT)


def build_main():
    os.makedirs(BENCH, exist_ok=True)
    if not os.path.exists(FSRAW) or not os.path.exists(IMG):
        for p in (FSRAW, IMG, IMG_XXH):
            if os.path.exists(p):
                os.unlink(p)
        say("building %s (4 GiB ext4, 48 files of 64 MiB) and its partclone image" % FSRAW)
        tmp = FSRAW + ".tmp"
        os.makedirs(MNT, exist_ok=True)
        sh(["truncate", "-s", "4G", tmp])
        sh(["mkfs.ext4", "-q", "-F", "-b", "4096", tmp])
        sh(["mount", "-o", "loop", tmp, MNT])
        try:
            fill(MNT, 48)
        finally:
            sh(["umount", MNT])
        sh(["partclone.ext4", "-c", "-s", tmp, "-O", IMG + ".tmp", "-L",
            os.path.join(BENCH, "clone.log")], stdout=subprocess.DEVNULL,
           stderr=subprocess.DEVNULL)
        os.rename(IMG + ".tmp", IMG)
        os.rename(tmp, FSRAW)
    if not os.path.exists(IMG_XXH):
        say("building %s" % IMG_XXH)
        to_xxh128(IMG, IMG_XXH + ".tmp")
        os.rename(IMG_XXH + ".tmp", IMG_XXH)
    if not os.path.exists(BIG):
        say("building %s (2 TiB ext4, nearly empty)" % BIG)
        raw = os.path.join(BENCH, "big.raw")
        sh(["truncate", "-s", "2T", raw])
        sh(["mkfs.ext4", "-q", "-F", "-b", "4096", "-N", "65536", "-J", "size=16",
            "-E", "lazy_itable_init=1,lazy_journal_init=1", raw])
        sh(["partclone.ext4", "-c", "-s", raw, "-O", BIG + ".tmp", "-L",
            os.path.join(BENCH, "big.log")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.rename(BIG + ".tmp", BIG)
        os.unlink(raw)
    if not os.path.exists(os.path.join(IB, "vpartclone")):
        say("installing imagebackup 0.2.2 into %s" % os.path.dirname(IB))
        sh([sys.executable, "-m", "venv", os.path.dirname(IB)])
        sh([os.path.join(IB, "pip"), "install", "-q", "imagebackup==0.2.2"])


def partclone_layout(path):
    """(block_size, blocks per checksum, used blocks, data start) of a partclone 0002 image."""
    import vimage
    with vimage.open(path) as p:
        info = p.info()
    bs, bpc, used, total = (info["block_size"], info["blocks_per_checksum"],
                            info["used_blocks"], info["total_blocks"])
    return bs, bpc, used, 110 + (total + 7) // 8 + 4


def to_xxh128(src, dst):
    """The CRC32 bench image re-checksummed with XXH128 (partclone 0.3.47's
    layout; Debian's partclone cannot write it).  Used only for timing."""
    import xxhash
    import vimage
    bs, bpc, used, data_start = partclone_layout(src)
    with open(src, "rb") as f:
        head = bytearray(f.read(110))
    head[96:106] = (b"\x31\x00\x10\x00" + bpc.to_bytes(4, "little") + b"\x01\x01")
    head[106:110] = vimage.crc32_partclone(bytes(head[:106])).to_bytes(4, "little") \
        if hasattr(vimage, "crc32_partclone") else head[106:110]
    with open(src, "rb") as f, open(dst, "wb") as out:
        f.seek(110)
        out.write(head)
        out.write(f.read(data_start - 110))
        left = used
        while left:
            n = min(bpc, left)
            data = f.read(n * bs)
            f.read(4)
            out.write(data)
            out.write(xxhash.xxh3_128(data).intdigest().to_bytes(16, "little"))
            left -= n


# ---------------------------------------------------------------------------
# 1. the uncompressed mount

def profile_mount(source, workload, tag, binding="fusepy", opts=()):
    """cProfile of a foreground `vimage mount -f` while workload(file) runs:
    the top functions by own time, as text in PROFILES/tag.txt."""
    os.makedirs(PROFILES, exist_ok=True)
    mp = os.path.join(BENCH, "mp-prof")
    os.makedirs(mp, exist_ok=True)
    unmount(mp)
    prof = os.path.join(PROFILES, tag + ".prof")
    proc = subprocess.Popen([PY, "-m", "cProfile", "-o", prof, VIMAGE, "mount", "-f", "-q"]
                            + list(opts) + [source, mp], env=fuse_env(binding),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 900
        while time.time() < deadline and not (is_mounted(mp) and os.listdir(mp)):
            if proc.poll() is not None:
                raise RuntimeError("profiled mount ended")
            time.sleep(0.05)
        f = os.path.join(mp, sorted(os.listdir(mp))[0])
        workload(f)
    finally:
        unmount(mp)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return pstats_text(prof, tag)


def pstats_text(prof, tag, n=18):
    import io
    import pstats
    if not os.path.exists(prof):
        return "(no profile written)"
    buf = io.StringIO()
    st = pstats.Stats(prof, stream=buf)
    st.sort_stats("tottime").print_stats(n)
    text = buf.getvalue()
    with open(os.path.join(PROFILES, tag + ".txt"), "w") as f:
        f.write(text)
    lines = [l for l in text.splitlines() if re.match(r"\s*\d", l)]
    return "\n".join(lines[:n])


def bench_mount():
    build_main()
    sec = Section("mount", "1. Uncompressed mount (bench.ptcl-img, 3.37 GB, CRC32)",
                  when() + " All contenders mounted at once; each turn starts with its backing "
                  "in the page cache and ends with the virtual file's and the backing's cache "
                  "dropped. Sequential: the whole 4 GiB virtual file in 1 MiB reads. Random: "
                  "%d reads of 4 KiB at 4 KiB-aligned random offsets (FADV_RANDOM), the same "
                  "offsets for every contender in a round. The do-nothing file systems serve "
                  "fs.raw (the 4 GiB ext4 itself, same size) with one pread per request."
                  % OPTS["reads"])
    have_c = build_nullc()
    size = os.path.getsize(FSRAW)
    cons = [("vimage (fusepy, libfuse2)", "vimage", IMG, "fusepy", [IMG]),
            ("vimage (mfusepy, libfuse3)", "vimage", IMG, "mfusepy3", [IMG]),
            ("imagebackup vpartclone", "vpartclone", IMG, None, [IMG]),
            ("do-nothing fusepy", "nullpy", FSRAW, None, [FSRAW])]
    if have_c:
        cons.append(("do-nothing C libfuse3", "nullc", FSRAW, None, [FSRAW]))
    else:
        sec.note("the do-nothing C floor is skipped: tests/bench_nullfs.c did not build "
                 "(apt-get install libfuse3-dev)")
    mounts, backing = {}, {}
    try:
        for i, (label, kind, src, binding, back) in enumerate(cons):
            mounts[label] = Mount(kind, src, os.path.join(BENCH, "mp%d" % i), binding or "fusepy",
                                  name="bench.ptcl-img")
            backing[label] = back
            assert os.path.getsize(mounts[label].file) == size, label
        names = [c[0] for c in cons]

        def prep(name):
            warm(backing[name])

        def fin(name):
            drop([mounts[name].file] + backing[name])

        seq = rounds(names, lambda n: timed(lambda: read_seq(mounts[n].file)), prep, fin,
                     label="seq")
        offs = [random_offsets(size, OPTS["reads"], seed) for seed in range(OPTS["rounds"])]
        counter = {n: 0 for n in names}

        def rr(n):
            o = offs[counter[n] % len(offs)]
            counter[n] += 1
            return random_reads(mounts[n].file, o)
        rnd = rounds(names, rr, prep, fin, label="random")
    finally:
        for m in mounts.values():
            m.close()

    V, M, P, N, C = names[0], names[1], names[2], names[3], (names[4] if have_c else None)
    tv = bt(seq[V])
    gb = size / 1e9
    sec.row("sequential read, 4 GiB", "%s (%.2f GB/s)" % (s(tv), gb / tv), "vpartclone mount",
            s(bt(seq[P])), "%.1f× faster" % (bt(seq[P]) / tv), "≥ 3×", bt(seq[P]) / tv >= 3)
    if C:
        r = bt(seq[C]) / tv
        sec.row("sequential read, 4 GiB", s(tv), "do-nothing C libfuse3 (-s)",
                "%s (%.2f GB/s)" % (s(bt(seq[C])), gb / bt(seq[C])),
                "%.2f× the floor's speed" % r, "≥ 0.9×", r >= 0.9)
    r = bt(seq[N]) / tv
    sec.row("sequential read, 4 GiB", s(tv), "do-nothing fusepy",
            "%s (%.2f GB/s)" % (s(bt(seq[N])), gb / bt(seq[N])), "%.2f× its speed" % r, "—", None)
    r = bt(seq[M]) / tv
    sec.row("sequential read, 4 GiB: vimage under fusepy/libfuse2 vs mfusepy/libfuse3", s(tv),
            "vimage, mfusepy/libfuse3", "%s (%.2f GB/s)" % (s(bt(seq[M])), gb / bt(seq[M])),
            "libfuse2 is %.2f× mfusepy's speed" % r, "—", None)
    bv = best(rnd[V])
    n = OPTS["reads"]

    def rstat(b):
        return "%s: %.0f reads/s (p50 %s, p99 %s)" % (s(b["time"]), n / b["time"], ms(b["p50"]),
                                                      ms(b["p99"]))
    bp, bn = best(rnd[P]), best(rnd[N])
    sec.row("%d random 4 KiB reads" % n, rstat(bv), "vpartclone mount", rstat(bp),
            "%.2f× faster" % (bp["time"] / bv["time"]), "≥ 2×", bp["time"] / bv["time"] >= 2)
    sec.row("%d random 4 KiB reads" % n, s(bv["time"]), "do-nothing fusepy", rstat(bn),
            "%.2f× its speed" % (bn["time"] / bv["time"]), "≥ 0.85×",
            bn["time"] / bv["time"] >= 0.85)
    if C:
        bc = best(rnd[C])
        sec.row("%d random 4 KiB reads" % n, s(bv["time"]), "do-nothing C libfuse3 (-s)",
                rstat(bc), "%.2f× its speed" % (bc["time"] / bv["time"]), "—", None)
    bm = best(rnd[M])
    sec.row("%d random 4 KiB reads: fusepy/libfuse2 vs mfusepy/libfuse3" % n, s(bv["time"]),
            "vimage, mfusepy/libfuse3", rstat(bm),
            "libfuse2 is %.2f× mfusepy's speed" % (bm["time"] / bv["time"]), "—", None)
    allr = ["| contender | sequential (best) | sequential (rounds) | random (best) |",
            "|---|---|---|---|"]
    for nm in names:
        allr.append("| %s | %s | %s | %s |" % (nm, s(bt(seq[nm])),
                                              " / ".join("%.2f" % x for x in seq[nm]),
                                              rstat(best(rnd[nm]))))
    sec.table("\n".join(allr))
    if OPTS["profile"]:
        if bn["time"] / bv["time"] < 0.85:
            offs0 = random_offsets(size, OPTS["reads"], 99)
            top = profile_mount(IMG, lambda f: random_reads(f, offs0), "mount-random")
            sec.table("cProfile of the vimage mount process during %d random reads "
                      "(top by own time):\n\n```\n%s\n```" % (OPTS["reads"], top))
        if C and bt(seq[C]) / tv < 0.9:
            top = profile_mount(IMG, read_seq, "mount-seq")
            sec.table("cProfile of the vimage mount process during the sequential read "
                      "(top by own time):\n\n```\n%s\n```" % top)
    sec.save()


# ---------------------------------------------------------------------------
# 2. verify, extract, the 2 TiB image

def crc_pass(path):
    fd = os.open(path, os.O_RDONLY)
    c, off = 0, 0
    buf = bytearray(8 * MiB)
    try:
        while True:
            n = os.preadv(fd, [buf], off)
            if not n:
                break
            c = zlib.crc32(memoryview(buf)[:n], c)
            off += n
    finally:
        os.close(fd)


def run_quiet(cmd):
    return lambda: sh(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def bench_verify():
    build_main()
    sec = Section("verify", "2. Verify, extract, a 2 TiB image (bench.ptcl-img, CRC32)",
                  when() + " Images in the page cache (warmed before each turn).")
    log = os.path.join(BENCH, "peer.log")
    cons = {
        "vimage verify CRC32": run_quiet([PY, VIMAGE, "verify", "-q", IMG]),
        "vimage verify XXH128": run_quiet([PY, VIMAGE, "verify", "-q", IMG_XXH]),
        "bare zlib.crc32 pass": lambda: crc_pass(IMG),
        "vpartclone -c": run_quiet([os.path.join(IB, "vpartclone"), "-c", "-q", IMG]),
        "partclone.chkimg": run_quiet(["partclone.chkimg", "-s", IMG, "-L", log]),
    }
    src = {k: [IMG_XXH] if "XXH" in k else [IMG] for k in cons}
    res = rounds(list(cons), lambda n: timed(cons[n]), lambda n: warm(src[n]), label="verify")
    tv = bt(res["vimage verify CRC32"])
    r = tv / bt(res["bare zlib.crc32 pass"])
    sec.row("verify CRC32", s(tv), "bare `zlib.crc32` pass over the file",
            s(bt(res["bare zlib.crc32 pass"])), "vimage takes %.2f× the pass" % r, "≤ 1.5×",
            r <= 1.5)
    for peer in ("vpartclone -c", "partclone.chkimg"):
        r = bt(res[peer]) / tv
        sec.row("verify CRC32", s(tv), "`%s`" % peer, s(bt(res[peer])), "%.1f× faster" % r,
                "≥ 5×", r >= 5)
    tx = bt(res["vimage verify XXH128"])
    sec.row("verify XXH128 (xxhash)", s(tx), "vimage verify CRC32", s(tv),
            "XXH128 takes %.2f× CRC32" % (tx / tv), "≤ 2×", tx / tv <= 2)

    # extract vs partclone.restore
    out = os.path.join(BENCH, "out.raw")
    ref = os.path.join(BENCH, "ref.raw")
    size = os.path.getsize(FSRAW)

    def ext(name):
        p = out if name == "vimage extract" else ref
        if os.path.exists(p):
            os.unlink(p)
        if name == "vimage extract":
            t = timed(run_quiet([PY, VIMAGE, "extract", "-q", IMG, out]))
        else:
            sh(["truncate", "-s", str(size), ref])
            t = timed(run_quiet(["partclone.restore", "-C", "-s", IMG, "-O", ref, "-L", log]))
        return t

    def ext_fin(name):
        p = out if name == "vimage extract" else ref
        drop([p])
    res = rounds(["vimage extract", "partclone.restore"], ext, lambda n: warm([IMG]), ext_fin,
                 label="extract")
    same = quiet(["cmp", out, ref]).returncode == 0
    te, tr = bt(res["vimage extract"]), bt(res["partclone.restore"])
    sec.row("extract to a sparse file", s(te), "`partclone.restore`", s(tr),
            "%.2f× faster (outputs %s)" % (tr / te, "identical" if same else "DIFFER"),
            "≥ 1×, identical", tr / te >= 1 and same)
    for p in (out, ref):
        if os.path.exists(p):
            os.unlink(p)

    # the 2 TiB image: time to a usable file and peak RSS
    warm([BIG])
    big_kib = {}

    def mnt(name):
        m = Mount("vimage" if name == "vimage" else "vpartclone", BIG, os.path.join(BENCH, "mpb"),
                  name="big2t.ptcl-img")
        if name == "vimage":
            big_kib.setdefault("pass", []).append(m.rss_kib)
            big_kib.setdefault("serve", []).append(m.hwm_kib())
        t = m.mount_time
        m.close()
        return t
    res = rounds(["vimage", "vpartclone"], mnt, label="2 TiB mount")
    tb, tp = bt(res["vimage"]), bt(res["vpartclone"])
    sec.row("mount a 2 TiB ext4 image (64 MiB bitmap): time to a usable file", s(tb),
            "vpartclone", s(tp), "%.1f× faster" % (tp / tb), "< 2 s", tb < 2)
    sec.row("mount of the 2 TiB image: peak RSS", "%.0f MiB (mount command); %.0f MiB (serving "
            "process)" % (max(big_kib["pass"]) / 1024.0, max(x or 0 for x in big_kib["serve"]) /
                          1024.0), "—", "—", "—", "—", None)
    sec.save()


# ---------------------------------------------------------------------------
# 3. Python API

API_BLOCKS = """
import sys
sys.path.insert(0, %r)
import vimage
n = 0
with vimage.open(sys.argv[1]) as p:
    for off, data in p.blocks():
        n += len(data)
print(n)
"""


def bench_api():
    build_main()
    import vimage
    sec = Section("api", "3. Python API, no FUSE (bench.ptcl-img)",
                  when() + " `.blocks()` runs in a fresh interpreter, like `vimage verify`; the "
                  "random `.read()`s run in this process on one open image.")
    cons = {"API .blocks()": run_quiet([PY, "-c", API_BLOCKS % ROOT, IMG]),
            "vimage verify": run_quiet([PY, VIMAGE, "verify", "-q", IMG])}
    res = rounds(list(cons), lambda n: timed(cons[n]), lambda n: warm([IMG]), label="api")
    tb, tv = bt(res["API .blocks()"]), bt(res["vimage verify"])
    sec.row("`.blocks()` over the whole image (checksums checked)", s(tb), "`vimage verify`",
            s(tv), "takes %.2f× verify" % (tb / tv), "≤ 1.1×", tb / tv <= 1.1)
    warm([IMG])
    n = 200000
    rates, rates_into = [], []
    with vimage.open(IMG) as p:
        size = p.size
        p.read(0, 4096)
        buf = bytearray(4096)
        for r in range(OPTS["rounds"]):
            offs = random_offsets(size, n, 1000 + r)
            rd = p.read
            t = time.perf_counter()
            for o in offs:
                rd(o, 4096)
            rates.append(n / (time.perf_counter() - t))
            ri = p.readinto
            t = time.perf_counter()
            for o in offs:
                ri(o, buf)
            rates_into.append(n / (time.perf_counter() - t))
            say("  api round %d: read %.0f/s, readinto %.0f/s" % (r + 1, rates[-1],
                                                                   rates_into[-1]))
    rate = max(rates)
    sec.row("`.read(offset, 4096)` at %d random aligned offsets" % n,
            "%.0f reads/s (%.1f µs each)" % (rate, 1e6 / rate), "—", "—", "—", "≥ 100 000/s",
            rate >= 100000)
    sec.row("`.readinto(offset, buf)` (4 KiB) at the same offsets",
            "%.0f reads/s" % max(rates_into), "—", "—", "—", "—", None)
    if OPTS["profile"] and (rate < 100000 or tb / tv > 1.1):
        import cProfile
        os.makedirs(PROFILES, exist_ok=True)
        prof = os.path.join(PROFILES, "api-read.prof")
        with vimage.open(IMG) as p:
            offs = random_offsets(p.size, 50000, 7)
            cProfile.runctx("for o in offs: p.read(o, 4096)", globals(), {"offs": offs, "p": p},
                            prof)
        sec.table("cProfile of 50 000 `.read(off, 4096)` calls (top by own time):\n\n```\n%s\n```"
                  % pstats_text(prof, "api-read"))
    sec.save()


# ---------------------------------------------------------------------------
# 4. compressed images mounted in place

COMPRESSED = [  # (suffix, command that makes it, plain decompressor, random target ms p50/p99)
    ("gz", "pigz -c", "gzip -dc", (50, 250)),
    ("zst", "zstd -q -T0 -c", "zstd -dc", (20, 100)),
    ("xz", "xz -T2 -c", "xz -dc", (50, 250)),
    ("bz2", "lbzip2 -n 2 -c", "bzip2 -dc", (50, 250)),
    ("lz4", "lz4 -q -c", "lz4 -dc", (50, 250)),
]
PASS_TARGET = {"zst": 1.3, "bz2": 0.7}


def bench_compressed(only=()):
    build_main()
    sec = Section("compressed", "4. Compressed images mounted in place (bench.ptcl-img compressed)",
                  when() + " Index pass = `vimage mount` with an empty cache dir until the file "
                  "reads, side by side with the plain decompressor to /dev/null (bzip2: one "
                  "round). Sequential read of the mounted file (1 MiB reads) vs the larger of two "
                  "floors from this run: the plain decompressor, and the same read of the "
                  "uncompressed image's vimage mount (alternated with it, caches dropped after "
                  "each turn). Random: 300 reads of 4 KiB at aligned random offsets "
                  "(FADV_RANDOM). Peak RSS: the mount command (the pass) and the serving process "
                  "after the reads. Cache dir: disk space used after the first mount.")
    cache = os.path.join(BENCH, "cache")
    mpu = os.path.join(BENCH, "mpu")
    plain_mount = Mount("vimage", IMG, mpu)
    rows = ["| image made by | size | plain decompressor | index pass | pass ÷ decompressor "
            "| cache dir after mount | sequential read (floor) | ÷ floor (≤ 1.25×) | random 4 KiB "
            "p50 / p99 | peak RSS pass / serving | mount again, saved index (< 2 s) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    try:
        for suffix, make, plain, (t50, t99) in COMPRESSED:
            if only and suffix not in only:
                continue
            path = IMG + "." + suffix
            if not os.path.exists(path):
                say("making %s" % path)
                sh("%s %s > %s.tmp" % (make, IMG, path))
                os.rename(path + ".tmp", path)
            n = 1 if suffix == "bz2" else OPTS["rounds"]
            mp = os.path.join(BENCH, "mpc")
            state = {"m": None, "du": []}

            def do_pass(name):
                if name.startswith("plain"):
                    return timed(lambda: sh("%s %s > /dev/null" % (plain, path)))
                if state["m"]:
                    state["m"].close()
                    state["m"] = None
                shutil.rmtree(cache, ignore_errors=True)
                m = Mount("vimage", path, mp, opts=["--cache-dir", cache])
                state["m"] = m
                state["du"].append(du_bytes(cache))
                return {"time": m.mount_time, "rss": m.rss_kib}
            names = ["plain `%s`" % plain, "vimage index pass"]
            res = rounds(names, do_pass, lambda nm: warm([path]), n=n, label="pass " + suffix)
            tplain, bpass = bt(res[names[0]]), best(res[names[1]])
            m = state["m"]
            vfile = m.file
            files = {"compressed": vfile, "uncompressed": plain_mount.file}
            backs = {"compressed": [path], "uncompressed": [IMG]}
            seq = rounds(["compressed", "uncompressed"],
                         lambda nm: timed(lambda: read_seq(files[nm])),
                         lambda nm: warm(backs[nm]), lambda nm: drop([files[nm]] + backs[nm]),
                         n=n, label="seq " + suffix)
            tseq, tun = bt(seq["compressed"]), bt(seq["uncompressed"])
            floor = max(tplain, tun)
            warm([path])
            rr = random_reads(vfile, random_offsets(os.path.getsize(vfile), 300, 5))
            hwm = m.hwm_kib()
            m.close()
            state["m"] = None
            du_after = du_bytes(cache)
            again = Mount("vimage", path, mp, opts=["--cache-dir", cache])
            t_again = again.mount_time
            again.close()
            shutil.rmtree(cache, ignore_errors=True)
            pr = bpass["time"] / tplain
            pt = PASS_TARGET.get(suffix, 1.3)
            okp = pr <= pt
            oks = tseq / floor <= 1.25
            okr = rr["p50"] * 1e3 <= t50 and rr["p99"] * 1e3 <= t99
            oka = t_again < 2
            cache_du = max(state["du"]) if state["du"] else 0
            rows.append("| `%s` | %s | %s | %s | %.2f× (≤ %.1f×) %s | %s | %s (%s) | %.2f× %s | "
                        "%s / %s (≤ %d / %d ms) %s | %.0f / %s MiB | %s %s |" % (
                            make, human(os.path.getsize(path)), s(tplain), s(bpass["time"]), pr,
                            pt, "✔" if okp else "✘", human(cache_du), s(tseq),
                            s(floor) + (" decompressor" if tplain >= tun else " uncompressed mount"),
                            tseq / floor, "✔" if oks else "✘", ms(rr["p50"]), ms(rr["p99"]),
                            t50, t99, "✔" if okr else "✘", bpass["rss"] / 1024.0,
                            "%.0f" % (hwm / 1024.0) if hwm else "?", s(t_again),
                            "✔" if oka else "✘"))
            say(rows[-1])
            detail = "%s: pass rounds %s; decompressor rounds %s; seq rounds %s; uncompressed " \
                     "mount seq rounds %s; cache dir after the remount %s" % (
                         suffix, " / ".join("%.2f" % (g["time"]) for g in res[names[1]]),
                         " / ".join("%.2f" % g for g in res[names[0]]),
                         " / ".join("%.2f" % g for g in seq["compressed"]),
                         " / ".join("%.2f" % g for g in seq["uncompressed"]), human(du_after))
            sec.note(detail)
            if suffix == "zst":
                sec.note("zstd -T0 is one frame: target pass ≤ 1.3× `zstd -dc` with no disk "
                         "space beyond the index; the cache dir held %s after the mount"
                         % human(cache_du))
            if OPTS["profile"] and not (okp and oks):
                if not okp:
                    top = profile_pass(path, cache, "pass-" + suffix)
                    sec.table("cProfile of the index pass of `%s` (mount -f until usable, top "
                              "by own time):\n\n```\n%s\n```" % (make, top))
                if not oks:
                    shutil.rmtree(cache, ignore_errors=True)
                    top = profile_mount(path, read_seq, "seq-" + suffix,
                                        opts=["--cache-dir", cache])
                    shutil.rmtree(cache, ignore_errors=True)
                    sec.table("cProfile of the `%s` mount during the sequential read (pass "
                              "included; top by own time):\n\n```\n%s\n```" % (make, top))
    finally:
        plain_mount.close()
        close_all()
    sec.table("\n".join(rows))
    old = os.path.join(PARTS, "compressed.md")
    if only and os.path.exists(old):
        # keep the rows of the codecs not run this time
        with open(old) as f:
            prev = [l for l in f.read().splitlines() if l.startswith("| `")]
        mine = {r.split("`")[1] for r in rows[2:]}
        keep = [l for l in prev if l.split("`")[1] not in mine]
        if keep:
            sec.extra[-1] = "\n".join(rows[:2] + keep + rows[2:])
            sec.note("rows of codecs not re-run (%s) are from an earlier run" %
                     ", ".join(sorted({l.split('`')[1] for l in keep})))
    sec.save()


def profile_pass(path, cache, tag):
    shutil.rmtree(cache, ignore_errors=True)
    try:
        return profile_mount(path, lambda f: None, tag, opts=["--cache-dir", cache])
    finally:
        shutil.rmtree(cache, ignore_errors=True)


# ---------------------------------------------------------------------------
# 5. Clonezilla directories

OCS_TMP_RX = re.compile(r"^(parttable-ocs|multipath_info|ocs_|ocs\.|img_out_err|hd_img|dd_info|"
                        r"dd_retcode|efi_info|new_sf|part_rec_f|vol_size_tmp|dsk_chk_tmp|"
                        r"root_reinst|ntfs_info|grub-efi|lshw-disk-info|menu|split_error|"
                        r".*-tmp-cnvted$)")
CZ_VARIANTS = [("z0", "-z0"), ("z9p", "-z9p")]


def attach(path):
    dev = out_of(["losetup", "-f", "--show", path]).strip()
    quiet(["partx", "-a", dev])
    base = os.path.basename(dev)
    for _ in range(50):
        parts = [p for p in os.listdir("/sys/block/" + base) if p.startswith(base + "p")]
        if len(parts) >= 2:
            break
        time.sleep(0.2)
    for p in parts:
        node = "/dev/" + p
        if not os.path.exists(node):
            with open("/sys/block/%s/%s/dev" % (base, p)) as f:
                major, minor = f.read().strip().split(":")
            sh(["mknod", node, "b", major, minor])
    return dev


def detach(dev):
    quiet(["partx", "-d", dev])
    quiet(["losetup", "-d", dev])


def build_clonezilla():
    want = [v for v, _o in CZ_VARIANTS if not os.path.exists(os.path.join(CZ, v + ".done"))]
    if not want:
        return
    os.makedirs(CZ, exist_ok=True)
    src = os.path.join(CZ, "src-disk.img")
    dev = None
    try:
        if not os.path.exists(src + ".done"):
            say("building the Clonezilla source disk (GPT, two ext4 of 2.2 GiB, 24 files of "
                "64 MiB each)")
            if os.path.exists(src):
                os.unlink(src)
            sh(["truncate", "-s", "4600M", src])
            sh(["sfdisk", "-q", src], input=b"label: gpt\nstart=2048, size=2200MiB, type=linux\n"
               b"size=2200MiB, type=linux\n")
            dev = attach(src)
            os.makedirs(MNT, exist_ok=True)
            for i in (1, 2):
                sh(["mkfs.ext4", "-q", "-F", "%sp%d" % (dev, i)])
                sh(["mount", "%sp%d" % (dev, i), MNT])
                try:
                    fill(MNT, 24, prefix="p%d-" % i)
                finally:
                    sh(["umount", MNT])
            open(src + ".done", "w").close()
        if dev is None:
            dev = attach(src)
        for v, opt in CZ_VARIANTS:
            if v not in want:
                continue
            d = os.path.join(CZ, v)
            shutil.rmtree(d, ignore_errors=True)
            say("ocs-sr %s savedisk of %s" % (opt, dev))
            before = set(os.listdir("/tmp"))
            log = os.path.join(CZ, "ocs-%s.log" % v)
            with open(log, "wb") as f:
                r = subprocess.run(["ocs-sr", "--ocsroot", CZ, "-q2", "-b", opt, "-sfsck", "-scs",
                                    "-senc", "-p", "true", "savedisk", v, os.path.basename(dev)],
                                   stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
            for n in set(os.listdir("/tmp")) - before:
                if OCS_TMP_RX.match(n):
                    shutil.rmtree(os.path.join("/tmp", n), ignore_errors=True)
                    if os.path.exists(os.path.join("/tmp", n)):
                        os.unlink(os.path.join("/tmp", n))
            if r.returncode or not os.path.isdir(d):
                raise RuntimeError("ocs-sr failed, see %s" % log)
            open(os.path.join(CZ, v + ".done"), "w").close()
    finally:
        if dev:
            detach(dev)
    if all(os.path.exists(os.path.join(CZ, v + ".done")) for v, _o in CZ_VARIANTS):
        os.unlink(src)


def cz_images(d):
    """{partition: [image files]} of a Clonezilla directory."""
    got = {}
    for n in sorted(os.listdir(d)):
        m = re.match(r"^(\w+?)\.\w+-ptcl-img\.", n)
        if m:
            got.setdefault(m.group(1), []).append(os.path.join(d, n))
    return got


def bench_clonezilla():
    build_clonezilla()
    sec = Section("clonezilla", "5. Clonezilla image directories (ocs-sr savedisk, two ext4 "
                  "partitions of 2.2 GiB with ~1.6 GB of files each)",
                  when() + " Saved by Debian's `ocs-sr` from a GPT loop disk. `verify DIR` "
                  "vs the sum of `vimage verify` of each partition image alone (side by side, "
                  "images in the page cache); sequential read (1 MiB reads) of the whole "
                  "virtual disk vs the partition files one after the other, on the same mount "
                  "(caches dropped after each turn); the first mount (empty cache dir) and a "
                  "second with the saved indexes.")
    cache = os.path.join(BENCH, "cache-cz")
    for v, opt in CZ_VARIANTS:
        d = os.path.join(CZ, v)
        imgs = cz_images(d)
        parts = sorted(imgs)
        allfiles = [f for p in parts for f in imgs[p]]
        cons = {"verify DIR": run_quiet([PY, VIMAGE, "verify", "-q", d])}
        for p in parts:
            cons["verify " + p] = run_quiet([PY, VIMAGE, "verify", "-q", imgs[p][0]])
        res = rounds(list(cons), lambda n: timed(cons[n]), lambda n: warm(allfiles),
                     label="cz verify " + v)
        tdir = bt(res["verify DIR"])
        tsum = sum(bt(res["verify " + p]) for p in parts)
        target = 1.1 if v == "z0" else 0.7
        size = sum(os.path.getsize(f) for f in allfiles)
        sec.row("`ocs-sr %s` (%s): `verify DIR`" % (opt, human(size)), s(tdir),
                "sum of verifying each image alone",
                " + ".join(s(bt(res["verify " + p])) for p in parts) + " = " + s(tsum),
                "takes %.2f× the sum" % (tdir / tsum), "≤ %.1f×" % target, tdir / tsum <= target)
        shutil.rmtree(cache, ignore_errors=True)
        mp = os.path.join(BENCH, "mpz")
        m = Mount("vimage", d, mp, opts=["--cache-dir", cache])
        first, first_rss, cdu = m.mount_time, m.rss_kib, du_bytes(cache)
        try:
            import vimage
            with vimage.open(d) as b:
                dname, pnames = b.disk.name, [p.name for p in b.partitions]
            disk = m.files[dname]
            pfiles = [m.files[n] for n in pnames]

            def seqr(name):
                if name == "whole disk":
                    return timed(lambda: read_seq(disk))
                return timed(lambda: [read_seq(f) for f in pfiles])
            res = rounds(["whole disk", "partitions one after the other"], seqr,
                         lambda n: warm(allfiles), lambda n: drop([disk] + pfiles + allfiles),
                         label="cz seq " + v)
        finally:
            m.close()
        td, tp = bt(res["whole disk"]), bt(res["partitions one after the other"])
        sec.row("`ocs-sr %s`: sequential read of the virtual disk" % opt, s(td),
                "the %d partition files one after the other" % len(pfiles), s(tp),
                "takes %.2f× theirs" % (td / tp), "≤ 1.1×", td / tp <= 1.1)
        m2 = Mount("vimage", d, mp, opts=["--cache-dir", cache])
        second = m2.mount_time
        m2.close()
        sec.row("`ocs-sr %s`: mount ready" % opt, "first %s, again %s" % (s(first), s(second)),
                "—", "—", "cache dir after the first mount %s; peak RSS %.0f MiB" % (
                    human(cdu), first_rss / 1024.0), "again < 2 s", second < 2)
        shutil.rmtree(cache, ignore_errors=True)
    sec.save()


# ---------------------------------------------------------------------------
# 6. raw image with a sha256sum sidecar and a par2 set

def build_raw():
    os.makedirs(RAWDIR, exist_ok=True)
    disk = os.path.join(RAWDIR, "disk.img")
    if not os.path.exists(disk):
        os.link(FSRAW, disk)
    if not os.path.exists(disk + ".sha256"):
        say("sha256sum sidecar")
        line = out_of("cd %s && sha256sum disk.img" % RAWDIR)
        with open(disk + ".sha256.tmp", "w") as f:
            f.write(line)
        os.rename(disk + ".sha256.tmp", disk + ".sha256")
    if not os.path.exists(disk + ".par2"):
        say("par2 c -b500 -r5 (about a minute)")
        for n in os.listdir(RAWDIR):
            if n.endswith(".par2"):
                os.unlink(os.path.join(RAWDIR, n))
        sh("cd %s && par2 c -q -q -b500 -r5 disk.img.par2 disk.img" % RAWDIR,
           stdout=subprocess.DEVNULL)
    return disk


def bench_raw():
    build_main()
    disk = build_raw()
    sec = Section("raw", "6. Raw image verify (a 4 GiB ext4 dd image, `sha256sum` sidecar, "
                  "`par2 c -b500 -r5` set)",
                  when() + " `vimage verify disk.img` checks the sidecar and the par2 set from "
                  "one read; the peers each check one. Image in the page cache.")
    par2s = [os.path.join(RAWDIR, n) for n in os.listdir(RAWDIR) if n.endswith(".par2")]
    cons = {"vimage verify": run_quiet([PY, VIMAGE, "verify", "-q", disk]),
            "sha256sum": run_quiet("cd %s && sha256sum -c --quiet disk.img.sha256" % RAWDIR),
            "par2 v": run_quiet("cd %s && par2 v -q disk.img.par2" % RAWDIR)}
    res = rounds(list(cons), lambda n: timed(cons[n]), lambda n: warm([disk] + par2s),
                 label="raw")
    tv, ts, tp = bt(res["vimage verify"]), bt(res["sha256sum"]), bt(res["par2 v"])
    sec.row("verify (sha256 sidecar + par2 set)", s(tv), "`sha256sum -c` alone", s(ts),
            "takes %.2f× sha256sum" % (tv / ts), "≤ 0.8×", tv / ts <= 0.8)
    sec.row("verify (sha256 sidecar + par2 set)", s(tv), "`par2 v`", s(tp),
            "%.1f× faster" % (tp / tv), "≥ 3×", tp / tv >= 3)
    verdict = out_of([PY, VIMAGE, "verify", disk]).strip().splitlines()
    sec.note("vimage verify said: " + " / ".join(l.strip() for l in verdict[-3:]))
    sec.save()


# ---------------------------------------------------------------------------
# 7. a sparsebak archive (gzip, bucketed, manifest) of a 4 GiB volume, 3 sessions

WY_C = 128 * 1024
WY_SESSIONS = ["S_20181015-200000", "S_20181018-200000", "S_20181022-200000"]
WY_VOL = os.path.join(WYNG, "sparsebak", "qubes_dom0%pool00", "vm-bench-private")


def wy_changed(si, idx):
    """What session si (1, 2) does to chunk idx: None, 'zero' or 'data'."""
    if si == 1 and idx % 50 == 7:
        return "data"
    if si == 2:
        if idx % 50 == 23 or idx % 200 == 7:
            return "data"
        if 1000 <= idx < 1256:                # 32 MiB zeroed
            return "zero"
    return None


def wy_data(si, idx):
    rnd = random.Random(si * 1000003 + idx)
    if idx % 2:
        return rnd.getrandbits(8 * WY_C).to_bytes(WY_C, "little")
    t = b"session %d chunk %d " % (si, idx)
    return (t * (WY_C // len(t) + 1))[:WY_C]


def wy_chunk(fd, si, idx):
    """Chunk idx as of session si (0-based)."""
    for s_ in range(si, 0, -1):
        what = wy_changed(s_, idx)
        if what == "zero":
            return bytes(WY_C)
        if what == "data":
            return wy_data(s_, idx)
    return os.pread(fd, WY_C, idx * WY_C)


def _wy_job(args):
    si, idx, path = args
    fd = os.open(FSRAW, os.O_RDONLY)
    try:
        buf = wy_chunk(fd, si, idx)
    finally:
        os.close(fd)
    last = idx == os.path.getsize(FSRAW) // WY_C - 1
    if buf == bytes(WY_C) and not last:
        open(path, "wb").close()
        return idx, None, hashlib.sha256(buf).digest()
    blob = gzip.compress(buf, compresslevel=4, mtime=1539633600 + si * 86400)
    with open(path, "wb") as f:
        f.write(blob)
    return idx, hashlib.sha256(blob).hexdigest(), hashlib.sha256(buf).digest(), len(blob)


def build_wyng():
    done = os.path.join(WYNG, ".done")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    build_main()
    shutil.rmtree(WYNG, ignore_errors=True)
    os.makedirs(WY_VOL)
    size = os.path.getsize(FSRAW)
    nchunks = size // WY_C
    shas = []
    say("writing the sparsebak archive (4 GiB volume, 128 KiB gzip chunks, 3 sessions)")
    with multiprocessing.Pool(os.cpu_count() or 2) as pool:
        for si, sname in enumerate(WY_SESSIONS):
            sdir = os.path.join(WY_VOL, sname)
            idxs = list(range(nchunks)) if si == 0 else \
                [i for i in range(nchunks) if wy_changed(si, i)]
            jobs = []
            for i in idxs:
                h = "%016x" % (i * WY_C)
                os.makedirs(os.path.join(sdir, h[:9]), exist_ok=True)
                jobs.append((si, i, os.path.join(sdir, h[:9], "x" + h)))
            lines, nbytes, zeros = [], 0, 0
            for got in pool.imap(_wy_job, jobs, chunksize=64):
                idx, dg = got[0], got[1]
                if dg is None:
                    zeros += 1
                    lines.append("%016x 0" % (idx * WY_C))
                else:
                    nbytes += got[3]
                    lines.append("%016x %s" % (idx * WY_C, dg))
            with open(os.path.join(sdir, "manifest"), "w") as f:
                f.write("".join(l + "\n" for l in lines))
            with open(os.path.join(sdir, "info"), "w") as f:
                f.write("volsize = %d\nchunksize = %d\nchunks = %d\nbytes = %d\nzeros = %d\n"
                        "format = folders\nprevious = %s\n" % (
                            size, WY_C, len(lines), nbytes, zeros,
                            WY_SESSIONS[si - 1] if si else "none"))
            # the volume as of this session, for checking the restores
            h = hashlib.sha256()
            fd = os.open(FSRAW, os.O_RDONLY)
            for i in range(nchunks):
                h.update(wy_chunk(fd, si, i))
            os.close(fd)
            shas.append(h.hexdigest())
            say("  %s: %d chunks (%d zero), %s stored" % (sname, len(lines), zeros, human(nbytes)))
    meta = {"size": size, "sha256": shas}
    with open(done, "w") as f:
        json.dump(meta, f)
    return meta


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(8 * MiB), b""):
            h.update(b)
    return h.hexdigest()


def bench_wyng():
    meta = build_wyng()
    sec = Section("wyng", "7. sparsebak archive: a 4 GiB volume, three sessions (gzip, 128 KiB "
                  "chunks in bucket folders, sha256 manifests; the 2018-10 D1 layout)",
                  when() + " Written by this script (the real tools need LVM thin pools); the "
                  "newest session is restored by `vimage extract --session` and by "
                  "tests/manual_restore.sh (the seed README's manual procedure, corrected: "
                  "cp -a of the volume, cp -l of the sessions newest first into full/, zero "
                  "files aside, rename to .gz + gunzip, every chunk placed with dd) side by side; "
                  "both outputs are checked against the volume's sha256. Archive in the page "
                  "cache. The manual procedure takes minutes: it runs once, between two vimage "
                  "rounds (best of the two).")
    sid = WY_SESSIONS[-1][2:]
    out_v = os.path.join(BENCH, "wyng-vimage.img")
    out_m = os.path.join(BENCH, "wyng-manual.img")
    tmpdir = os.path.join(BENCH, "tmp")
    os.makedirs(tmpdir, exist_ok=True)
    env = dict(os.environ, TMPDIR=tmpdir)

    def run(name):
        out = out_v if name == "vimage extract" else out_m
        if os.path.exists(out):
            os.unlink(out)
        if name == "vimage extract":
            cmd = [PY, VIMAGE, "extract", "-q", "--session", sid, WY_VOL, out]
        else:
            cmd = ["bash", os.path.join(ROOT, "tests", "manual_restore.sh"), WY_VOL,
                   WY_SESSIONS[-1], out, str(WY_C)]
        return timed(lambda: sh(cmd, stdout=subprocess.DEVNULL, env=env))
    # The manual procedure takes 5-10 minutes (tens of thousands of mv and dd
    # processes), ~30x vimage: it runs once, between two vimage rounds.
    res = {"vimage extract": [], "manual restore": []}
    for name in ["vimage extract", "manual restore", "vimage extract"]:
        warm([WY_VOL])
        res[name].append(run(name))
        drop([out_v if name == "vimage extract" else out_m])
        say("  wyng: %-40s %8.2f s" % (name, res[name][-1]))
    ok_v = sha256_file(out_v) == meta["sha256"][-1]
    ok_m = sha256_file(out_m) == meta["sha256"][-1]
    for p in (out_v, out_m):
        os.unlink(p)
    tv, tm = bt(res["vimage extract"]), bt(res["manual restore"])
    sec.row("restore the newest session (4 GiB)", "%s (%s)" % (s(tv), "right" if ok_v else
                                                               "WRONG BYTES"),
            "manual procedure (tests/manual_restore.sh)",
            "%s (%s)" % (s(tm), "right" if ok_m else "wrong bytes"),
            "%.1f× faster" % (tm / tv), "≥ 2×", tm / tv >= 2 and ok_v)
    mp = os.path.join(BENCH, "mpw")
    warm([WY_VOL])
    times = []
    for _ in range(OPTS["rounds"]):
        m = Mount("vimage", WY_VOL, mp, opts=["--session", sid])
        times.append(m.mount_time)
        if len(times) < OPTS["rounds"]:
            m.close()
    try:
        rr = random_reads(m.file, random_offsets(meta["size"], 2000, 11))
        t_seq = timed(lambda: read_seq(m.file))
        hwm = m.hwm_kib()
    finally:
        m.close()
    sec.row("mount ready (session %s)" % sid, "%s (rounds: %s)" % (s(min(times)), " / ".join(
        "%.2f" % t for t in times)), "—", "—", "—", "< 1 s", min(times) < 1)
    sec.row("2000 random 4 KiB reads of the mounted volume", "p50 %s, p99 %s" % (
        ms(rr["p50"]), ms(rr["p99"])), "—", "—", "—", "p50 < 2 ms", rr["p50"] < 0.002)
    sec.row("sequential read of the mounted volume (1 MiB reads)", "%s (%.2f GB/s)" % (
        s(t_seq), meta["size"] / 1e9 / t_seq), "vimage extract of it", s(tv), "—", "—", None)
    sec.note("peak RSS of the serving process: %s MiB" % ("%.0f" % (hwm / 1024.0) if hwm else "?"))
    sec.save()


# ---------------------------------------------------------------------------

def main(argv):
    if argv[:1] == ["_nullfs"]:
        nullfs_main(*argv[1:4])
        return
    if os.geteuid() != 0:
        sys.exit("make bench needs root (loop mounts, FUSE, ocs-sr)")
    args, codecs = [], []
    it = iter(argv)
    for a in it:
        if a == "--rounds":
            OPTS["rounds"] = int(next(it))
        elif a == "--reads":
            OPTS["reads"] = int(next(it))
        elif a == "--profile":
            OPTS["profile"] = True
        elif a in [c[0] for c in COMPRESSED]:
            codecs.append(a)
        elif a in MODES + ["all", "build"]:
            args.append(a)
        else:
            sys.exit("unknown argument %r (modes: %s, build, all)" % (a, " ".join(MODES)))
    if codecs and not args:
        args = ["compressed"]
    if not args or "all" in args:
        args = MODES
    os.makedirs(BENCH, exist_ok=True)
    failed = []
    try:
        if "build" in args:
            build_main()
            build_nullc()
            build_raw()
            build_clonezilla()
            build_wyng()
            for suffix, make, _p, _t in COMPRESSED:
                path = IMG + "." + suffix
                if not os.path.exists(path):
                    say("making %s" % path)
                    sh("%s %s > %s.tmp" % (make, IMG, path))
                    os.rename(path + ".tmp", path)
        for mode in MODES:
            if mode in args:
                say("== %s" % mode)
                try:
                    if mode == "compressed":
                        bench_compressed(codecs)
                    else:
                        globals()["bench_" + mode]()
                except Exception:
                    import traceback
                    traceback.print_exc()
                    failed.append(mode)
                    close_all()
    finally:
        close_all()
    print("results: %s" % RESULTS)
    if failed:
        sys.exit("these parts failed: %s" % " ".join(failed))


if __name__ == "__main__":
    main(sys.argv[1:])
