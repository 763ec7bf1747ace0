#!/usr/bin/env python3
"""vimage - get data back from disk-image backups, in one file.

Copied next to the backups on a rescue stick and run with Python 3.8+.

What it reads (told by content, never by file name):
  * partclone images, format 0002 (checksums none, CRC32, XXH64, XXH128, any
    blocks-per-checksum, reseed on/off, both endians) and format 0001
    (partclone < 0.3: byte bitmap, per-block CRC with the old CRC quirk);
  * ntfsclone --save-image images, versions 10.0 and 10.1;
  * partimage 0.6 images, single files and multi-volume sets (.000, .001 ...);
  * raw (dd) images that hold a partition table (MBR with logical
    partitions, GPT, 512- or 4096-byte sectors, hybrid MBR) or a known file
    system, or that are named or declared (--format raw) as such;
  * Clonezilla and Rescuezilla image directories (the disks, assembled as
    `ocs-sr restoredisk` lays them out, and every partition image);
  * sparsebak and Wyng archives of every era (a volume as of any session).
Containers around images: split sets as Clonezilla writes them (.aa, .ab ...,
or longer suffixes), compressed with gzip/pigz, bzip2, xz, lzma, lzip (stdlib)
or zstd, lz4, lzop (optional packages), or read from stdin ("-").  Beside
them: sha*sum sidecars and lists, Clonezilla's MD5SUMS/SHA1SUMS/B2SUMS/B3SUMS,
par2 recovery sets.

What it promises:
  * inputs are only ever opened read-only, and a mount gives no one more
    access than the image files give (no setuid, no devices, private caches);
  * `extract` writes, byte for byte, what the real tools' restores write;
  * `verify` checks every checksum there is, names each bad place, and says
    what it could not check;
  * bad input gives a one-line error and exit status 1, never a traceback.

Subcommands: info, verify, extract, mount, umount; and a Python API
(vimage.open(), see __all__).  `mount` serves every disk, partition and volume
as a read-only file through FUSE, compressed images included (seek points,
or a cache file where a codec has none); it needs fusepy (or mfusepy).
Everything else runs on the standard library alone.  Optional speed-ups and
codecs: tqdm, xxhash, zstandard/pyzstd, lz4, python-lzo, blake3.
"""

import argparse
import bisect
import bz2
import errno
import hashlib
import io
import json
import lzma
import mmap
import os
import queue
import re
import stat
import struct
import sys
import threading
import time
import weakref
import zlib
from array import array
from collections import OrderedDict, namedtuple
from functools import lru_cache
from itertools import repeat
from operator import mul

__version__ = "0.1.0"
PROG = "vimage"

# ===========================================================================
# Errors and helpers
# ===========================================================================


class VimageError(Exception):
    """Base of every error vimage reports; main() prints it as one line."""

    exit_code = 1


class FormatError(VimageError):
    """The input is not a readable image, or its structure is broken."""


class ContainerError(VimageError):
    """A split set or a compressed stream cannot be read."""


class MissingDependency(VimageError):
    """An optional package is needed for what was asked."""


class ChecksumError(VimageError):
    """Data does not match its checksum (extract without --ignore-checksums)."""


class OutputError(VimageError):
    """The output cannot be written as asked."""


MiB = 1 << 20
CHUNK = 8 * MiB          # size of the large reads on every data path
M32 = 0xFFFFFFFF
_ZEROS = bytes(MiB)


DEFAULT_INDEX_BITS = 4096   # bits of bitmap per rank index entry


def zero_fill(view):
    """Set a writable memoryview to zeros."""
    for i in range(0, len(view), len(_ZEROS)):
        k = min(len(_ZEROS), len(view) - i)
        view[i:i + k] = _ZEROS_VIEW[:k]


_ZEROS_VIEW = memoryview(_ZEROS)


class ReadIntoMixin:
    """read() for partitions that implement readinto()."""

    def read(self, offset, size):
        n = max(0, min(size, self.size - offset))
        buf = bytearray(n)
        if n:
            self.readinto(offset, memoryview(buf))
        return bytes(buf)


def human(n):
    """Bytes as a short human string (1.5 GiB)."""
    if n is None:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return ("%d %s" % (n, unit)) if unit == "B" else ("%.1f %s" % (n, unit))
        n /= 1024.0
    return str(n)


def cstr(raw):
    """A NUL-terminated byte field as text."""
    return raw.split(b"\0", 1)[0].decode("latin-1").strip()


def need_module(name, purpose, pip_name=None):
    """Import an optional module, or raise MissingDependency saying what to install."""
    import importlib
    try:
        return importlib.import_module(name)
    except ImportError:
        raise MissingDependency("%s needs the Python package '%s' (pip install %s)"
                                % (purpose, pip_name or name, pip_name or name))


def optional_module(name):
    """Import an optional module or return None."""
    import importlib
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


if hasattr(int, "bit_count"):
    def _popcount_int(x):
        return x.bit_count()  # novermin
else:  # Python < 3.10
    def _popcount_int(x):
        return bin(x).count("1")


def popcount(data):
    """Number of set bits in a bytes-like object (in 1 MiB steps: no big copies)."""
    if len(data) <= MiB:
        return _popcount_int(int.from_bytes(data, "little"))
    view = memoryview(data)
    return sum(_popcount_int(int.from_bytes(view[i:i + MiB], "little"))
               for i in range(0, len(view), MiB))


class Progress:
    """Progress of a long pass: tqdm when present, a plain line otherwise.

    Silent when quiet or when stderr is not a terminal."""

    def __init__(self, total, desc, quiet=False):
        self.total = total
        self.desc = desc
        self.done = 0
        self._bar = None
        self._last = 0.0
        self._start = time.monotonic()
        self.enabled = not quiet and sys.stderr.isatty()
        self._lock = threading.Lock()
        if self.enabled:
            tqdm = optional_module("tqdm")
            if tqdm is not None:
                self._bar = tqdm.tqdm(total=total, desc=desc, unit="B", unit_scale=True,
                                      unit_divisor=1024, leave=False)

    def update_to(self, done):
        if not self.enabled:
            return
        with self._lock:
            self._update(done)

    def _update(self, done):
        if self._bar is not None:
            self._bar.update(done - self.done)
            self.done = done
            return
        self.done = done
        now = time.monotonic()
        if now - self._last < 0.5:
            return
        self._last = now
        rate = done / max(now - self._start, 1e-6)
        if self.total:
            line = "%s: %5.1f%% %s of %s, %s/s" % (self.desc, 100.0 * done / self.total,
                                                     human(done), human(self.total), human(rate))
        else:
            line = "%s: %s, %s/s" % (self.desc, human(done), human(rate))
        sys.stderr.write("\r" + line[:79].ljust(79))
        sys.stderr.flush()

    def close(self):
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        else:
            sys.stderr.write("\r" + " " * 79 + "\r")
            sys.stderr.flush()


class OffsetProgress:
    """A member's progress inside the progress of the whole backup."""

    def __init__(self, progress, base):
        self.progress, self.base = progress, base

    def update_to(self, done):
        self.progress.update_to(self.base + done)


class SharedProgress:
    """One progress display for passes that run side by side in threads: each
    pass gets a part() that reports its own bytes; the display shows the sum."""

    def __init__(self, total, desc, quiet=False):
        self.bar = Progress(total, desc, quiet)
        self.done = {}
        self.lock = threading.Lock()

    def part(self, total=None, desc=None):
        return _ProgressPart(self)

    def set_total(self, total):
        self.bar.total = total
        if self.bar._bar is not None:
            self.bar._bar.total = total
            self.bar._bar.refresh()

    def close(self):
        self.bar.close()


class _ProgressPart:
    def __init__(self, shared):
        self.shared = shared

    def update_to(self, done):
        with self.shared.lock:
            self.shared.done[id(self)] = done
            total = sum(self.shared.done.values())
        self.shared.bar.update_to(total)

    def close(self):
        pass


# ===========================================================================
# Byte sources: split files, stdin, streaming decompression
# ===========================================================================

class Source:
    """A byte stream read from the front.

    `read(n)` returns exactly n bytes unless the stream ends first.
    `consumed()` counts input bytes taken from disk (for progress),
    `input_size` is their total when known.  Sources over plain files also
    offer `pread(n, offset)` (random access, thread-safe)."""

    input_size = None
    size = None          # length of the stream when known without reading it
    random_access = False
    description = ""

    def read(self, n):
        raise NotImplementedError

    def consumed(self):
        return 0

    def failure(self):
        """A decoding error that cut the stream short, if any."""
        inner = getattr(self, "inner", None) or getattr(self, "raw", None)
        return getattr(self, "failed", None) or (inner.failure() if inner is not None else None)

    def close(self):
        pass


_SPLIT_RE = re.compile(r"^(.*)\.(a{2,})$")


def split_pieces(path):
    """All pieces of a split set, from the first one (X.aa -> X.aa, X.ab ...)."""
    m = _SPLIT_RE.match(path)
    if not m:
        m2 = re.match(r"^(.*)\.([a-z]{2,})$", path)
        if m2 and os.path.exists(m2.group(1) + "." + "a" * len(m2.group(2))) \
                and m2.group(2) != "a" * len(m2.group(2)):
            raise ContainerError("%s is a later piece of a split set; give the first piece, %s"
                                 % (path, m2.group(1) + "." + "a" * len(m2.group(2))))
        return [path]
    base, width = m.group(1), len(m.group(2))
    directory = os.path.dirname(base) or "."
    stem = os.path.basename(base) + "."
    present = set()
    try:
        for name in os.listdir(directory):
            if name.startswith(stem):
                suffix = name[len(stem):]
                if len(suffix) == width and suffix.isalpha() and suffix.islower():
                    present.add(suffix)
    except OSError as e:
        raise ContainerError("cannot list %s: %s" % (directory, e.strerror))
    pieces, index = [], 0
    last = max(present) if present else "a" * width
    while True:
        suffix = _suffix(index, width)
        if suffix is None or suffix > last:
            break
        if suffix not in present:
            raise ContainerError("piece %s.%s of the split set is missing" % (base, suffix))
        pieces.append("%s.%s" % (base, suffix))
        index += 1
    return pieces


def _suffix(index, width):
    """The index-th split suffix of the given width (0 -> 'aa'), None when out of range."""
    letters = []
    for _ in range(width):
        index, r = divmod(index, 26)
        letters.append(chr(97 + r))
    return None if index else "".join(reversed(letters))


IOV_MAX = 1024
FILE_TAPS = {}      # real path -> FileTap, while a verify pass runs


class FileTap:
    """Whole-file checks fed by the in-order reads a verify pass makes anyway,
    so that a sums file or a par2 set costs no second read of an image: the
    hashes (Hashers) and a par2 check (Par2Check) work on threads of their
    own while the pass goes on.  What the pass did not read (it stopped
    early) is read when a result is asked for."""

    def __init__(self, path, algos=(), par2=None):
        self.path, self.pos, self.broken = path, 0, False
        self.algos, self.hashers, self.par2 = sorted(algos), None, par2
        self.digests = self.result = None

    def feed(self, offset, data, threads=1):
        if offset != self.pos:
            if offset > self.pos or offset + len(data) <= self.pos:
                self.broken = self.broken or offset > self.pos
                return
            data = bytes(memoryview(data)[self.pos - offset:])
        if self.hashers is None:          # the workers start with the first data
            self.hashers = Hashers(self.algos, threads=threads)
        self.hashers.update(data)
        if self.par2 is not None:
            self.par2.update(data)
        self.pos += len(data)

    def _finish(self):
        if self.digests is not None or self.broken:
            return
        try:
            with io.open(self.path, "rb") as f:
                f.seek(self.pos)
                for data in iter(lambda: f.read(CHUNK), b""):
                    # a file the scans did not read is hashed here, in this thread
                    self.feed(self.pos, data, threads=1 if self.hashers else 0)
            if self.hashers is None:
                self.feed(0, b"", threads=0)
        except OSError:
            self.broken = True
            return
        self.digests = self.hashers.hexdigests() if self.hashers is not None else {}
        self.result = self.par2.finish() if self.par2 is not None else None

    def hexdigest(self, algo):
        self._finish()
        return None if self.broken else self.digests.get(algo)

    def par2_result(self):
        self._finish()
        return self.result

    def close(self):
        if self.hashers is not None:
            self.hashers.close()
        if self.par2 is not None:
            self.par2.close()


class Segmented:
    """Thread-safe random reads over a list of file segments (see segments()).
    `single` is the descriptor when there is only one file.

    With `watch` set (a mount), every read also checks that the files are
    still the ones opened: an image file that was rewritten, resized or
    deleted meanwhile gives EIO instead of a mix of old and new bytes."""

    watch = False
    single = None

    def pread(self, n, offset):
        """Up to n bytes at offset (short only at the end)."""
        parts = []
        for fd, off, length in self.segments(offset, n):
            data = os.pread(fd, length, off)
            parts.append(data)
            if self.watch:
                self.check(fd)
            if len(data) < length:
                raise OSError(errno.EIO, "an image file shrank while being read")
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def preadv_into(self, bufs, offset):
        """Fill the writable buffers `bufs`, in order, from `offset` on: one
        preadv per file segment (and per IOV_MAX buffers), no copies."""
        if self.single is not None and len(bufs) <= IOV_MAX:     # one file: the short way
            fd = self.single
            want = len(bufs[0]) if len(bufs) == 1 else sum(len(b) for b in bufs)
            got = os.preadv(fd, bufs, offset)
            if self.watch:
                self.check(fd)
            if got != want:
                raise OSError(errno.EIO, "image is truncated")
            return
        bufs = list(bufs)
        total = sum(len(b) for b in bufs)
        i = 0
        for fd, off, length in self.segments(offset, total):
            batch, need = [], length
            while need:
                b = bufs[i]
                if len(b) <= need:
                    batch.append(b)
                    need -= len(b)
                    i += 1
                else:
                    batch.append(b[:need])
                    bufs[i] = b[need:]
                    need = 0
            for k in range(0, len(batch), IOV_MAX):
                part = batch[k:k + IOV_MAX]
                want = sum(len(x) for x in part)
                got = os.preadv(fd, part, off)
                if self.watch:
                    self.check(fd)
                if got != want:
                    raise OSError(errno.EIO, "image is truncated")
                off += want
            total -= length
        if total:
            raise OSError(errno.EIO, "image is truncated")


class FileSource(Segmented, Source):
    """One file or a split set of files, read-only, with thread-safe pread."""

    random_access = True

    def __init__(self, paths):
        self.paths = list(paths)
        self.fds, self.starts = [], []
        self.opened, self.changed = {}, set()
        pos = 0
        try:
            for p in self.paths:
                fd = os.open(p, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                self.fds.append(fd)
                st = os.fstat(fd)
                self.opened[fd] = (st.st_size, st.st_mtime_ns)
                if stat.S_ISDIR(st.st_mode):
                    raise ContainerError("%s is a directory, not an image" % p)
                size = st.st_size
                if stat.S_ISBLK(st.st_mode):
                    size = os.lseek(fd, 0, os.SEEK_END)
                self.starts.append(pos)
                pos += size
        except OSError as e:
            self.close()
            raise ContainerError("cannot open %s: %s" % (e.filename or p, e.strerror))
        except VimageError:
            self.close()
            raise
        self.size = self.input_size = pos
        self.pos = 0
        self.description = ("%d split pieces" % len(self.paths)) if len(self.paths) > 1 else "file"
        self.taps = [FILE_TAPS.get(os.path.realpath(p)) for p in self.paths] if FILE_TAPS else None
        self.single = self.fds[0] if len(self.fds) == 1 else None

    def check(self, fd):
        """EIO (and one log line) once the file behind fd is not the one opened."""
        st = os.fstat(fd)
        if (st.st_size, st.st_mtime_ns) != self.opened[fd] or st.st_nlink == 0:
            path = self.paths[self.fds.index(fd)]
            what = "was deleted" if st.st_nlink == 0 else "changed (size or time)"
            if fd not in self.changed:
                self.changed.add(fd)
                log_error("%s %s while mounted; its reads are refused from now on" % (path, what))
            raise OSError(errno.EIO, "%s %s while mounted" % (path, what))

    def segments(self, offset, n):
        """(fd, offset in that file, length) covering n bytes from offset."""
        out = []
        i = bisect.bisect_right(self.starts, offset) - 1
        while n > 0 and 0 <= i < len(self.fds):
            end = self.starts[i + 1] if i + 1 < len(self.starts) else self.size
            take = min(n, end - offset)
            if take <= 0:
                break
            out.append((self.fds[i], offset - self.starts[i], take))
            n -= take
            offset += take
            i += 1
        return out

    def read(self, n):
        if self.taps and any(self.taps):
            return self._tapped_read(n)
        data = self.pread(n, self.pos)
        self.pos += len(data)
        return data

    def _tapped_read(self, n):
        parts = []
        for fd, off, length in self.segments(self.pos, n):
            data = os.pread(fd, length, off)
            tap = self.taps[self.fds.index(fd)]
            if tap is not None:
                tap.feed(off, data)
            parts.append(data)
            if len(data) < length:
                raise ContainerError("an image file shrank while being read")
        data = b"".join(parts)
        self.pos += len(data)
        return data

    def consumed(self):
        return self.pos

    def close(self):
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds, self.single = [], None


class StdinSource(Source):
    """Standard input as a stream."""

    description = "stdin"

    def __init__(self):
        self.fd = sys.stdin.fileno()
        self.pos = 0

    def read(self, n):
        parts, want = [], n
        while want > 0:
            data = os.read(self.fd, min(want, CHUNK))
            if not data:
                break
            parts.append(data)
            want -= len(data)
        data = b"".join(parts)
        self.pos += len(data)
        return data

    def consumed(self):
        return self.pos


class PeekSource(Source):
    """A stream whose first bytes can be looked at before they are read."""

    def __init__(self, inner):
        self.inner = inner
        self.buf = b""
        self.pos = 0
        self.input_size = inner.input_size
        self.size = inner.size
        self.description = inner.description

    def peek(self, n):
        if len(self.buf) < n:
            self.buf += self.inner.read(n - len(self.buf))
        return self.buf[:n]

    def read(self, n):
        if self.buf:
            head, self.buf = self.buf[:n], self.buf[n:]
            if len(head) < n:
                head += self.inner.read(n - len(head))
        else:
            head = self.inner.read(n)
        self.pos += len(head)
        return head

    def consumed(self):
        return self.inner.consumed()

    def close(self):
        self.inner.close()


class DecompressSource(Source):
    """Streaming decompression of one or more concatenated members.

    The codec's decoder object follows the stdlib shape: decompress(data,
    max_length), eof, unused_data, needs_input.  A new decoder starts at the
    next member; zero padding after the last member is accepted."""

    IN_CHUNK = 256 * 1024

    def __init__(self, raw, codec):
        self.raw = raw
        self.codec = codec
        self.input_size = raw.input_size
        self.description = codec.name
        self.dec = None
        self.inbuf = b""        # input not yet given to a decoder
        self.outbuf = b""
        self.in_pos = 0         # input offset of inbuf[0], for messages
        self.done = False
        self.failed = None        # a decoding error, raised once the good data is read
        self.members = 0
        self.out_pos = 0

    def _more_input(self):
        data = self.raw.read(self.IN_CHUNK)
        self.inbuf += data
        return bool(data)

    def _produce(self, want):
        """Decompress until at least `want` bytes are buffered or the stream ends."""
        chunks = [self.outbuf]
        have = len(self.outbuf)
        try:
            self._produce_into(chunks, have, want)
        except ContainerError as e:
            # hand out what decoded well first; the error comes with the next read
            self.failed, self.done = e, True
        self.outbuf = b"".join(chunks)

    def _produce_into(self, chunks, have, want):
        while have < want and not self.done:
            if self.dec is None:
                if not self._next_member():
                    self.done = True
                    break
            if self.inbuf:
                data, self.inbuf = self.inbuf, b""
            elif self.dec.needs_input:
                if not self._more_input():
                    raise ContainerError("%s stream is truncated at input offset %d"
                                         % (self.codec.name, self.in_pos))
                data, self.inbuf = self.inbuf, b""
            else:
                data = b""
            try:
                out = self.dec.decompress(data, max(want - have, 1 << 16))
            except (zlib.error, OSError, EOFError, lzma.LZMAError, ValueError, RuntimeError) as e:
                raise ContainerError("%s stream is corrupt near input offset %d: %s"
                                     % (self.codec.name, self.in_pos, e))
            except Exception as e:  # optional codec packages raise their own types
                raise ContainerError("%s stream is corrupt near input offset %d: %s"
                                     % (self.codec.name, self.in_pos, e))
            self.in_pos += len(data)
            if out:
                chunks.append(out)
                have += len(out)
            if self.dec.eof:
                rest = self.dec.unused_data or b""
                self.in_pos -= len(rest)
                self.inbuf = rest + self.inbuf
                self._advance(self.codec.finish_member(self.dec, self.inbuf, self))
                self.dec = None
                self.members += 1

    def _next_member(self):
        """Position inbuf at the next member; False at the end of the stream."""
        while True:
            while len(self.inbuf) < 64 and self._more_input():
                pass
            if self.members and self.codec.skip_zero_padding:
                stripped = self.inbuf.lstrip(b"\0")
                self.in_pos += len(self.inbuf) - len(stripped)
                self.inbuf = stripped
                if not self.inbuf:
                    if self._more_input():
                        continue
                    return False
                if len(self.inbuf) < 64 and self._more_input():
                    continue
            if not self.inbuf:
                if self.members:
                    return False
                raise ContainerError("%s stream is empty" % self.codec.name)
            if not self.codec.matches(self.inbuf):
                raise ContainerError("%s stream: unexpected data at input offset %d after member %d"
                                     % (self.codec.name, self.in_pos, self.members))
            self.dec, skip = self.codec.new_decoder(self.inbuf)
            self._advance(skip)
            return True

    def _advance(self, n):
        while len(self.inbuf) < n and self._more_input():
            pass
        self.in_pos += n
        self.inbuf = self.inbuf[n:]

    def read(self, n):
        if len(self.outbuf) < n:
            self._produce(n)
        if not self.outbuf and self.failed:
            raise self.failed
        data, self.outbuf = self.outbuf[:n], self.outbuf[n:]
        self.out_pos += len(data)
        return data

    def consumed(self):
        return self.raw.consumed()

    def close(self):
        self.raw.close()


class ReaderSource(Source):
    """A codec package's own file-like reader (zstandard's stream_reader)."""

    def __init__(self, raw, reader, name):
        self.raw = raw
        self.reader = reader
        self.input_size = raw.input_size
        self.description = name

    failed = None

    def read(self, n):
        if self.failed:
            raise self.failed
        parts, want = [], n
        while want > 0:
            try:
                data = self.reader.read(min(want, CHUNK))
            except Exception as e:
                self.failed = ContainerError("%s stream is corrupt near input offset %d: %s"
                                             % (self.description, self.raw.consumed(), e))
                if parts:                   # the good data first, the error next time
                    break
                raise self.failed
            if not data:
                break
            parts.append(data)
            want -= len(data)
        return b"".join(parts)

    def consumed(self):
        return self.raw.consumed()

    def close(self):
        self.raw.close()


class _RawFile(io.RawIOBase):
    """A Source seen as a file object, for codec packages that want one."""

    def __init__(self, source):
        self.source = source

    def readable(self):
        return True

    def readinto(self, b):
        data = self.source.read(len(b))
        b[:len(data)] = data
        return len(data)


# --- codecs: magic -> decoder ---------------------------------------------

class _ZlibDecoder:
    """zlib's decompressobj in the bz2/lzma decoder shape."""

    def __init__(self, wbits):
        self.d = zlib.decompressobj(wbits)
        self.tail = b""
        self.needs_input = True

    def decompress(self, data, max_length):
        out = self.d.decompress(self.tail + data, max_length)
        self.tail = self.d.unconsumed_tail
        self.needs_input = not self.tail and len(out) < max_length
        return out

    @property
    def eof(self):
        return self.d.eof

    @property
    def unused_data(self):
        return self.d.unused_data


class Codec:
    """A compression format: its magic and how to decode one member."""

    skip_zero_padding = True

    def __init__(self, name, magic, factory, module=None, pip_name=None, check=None,
                 finish=None):
        self.name = name
        self.magic = magic
        self.factory = factory
        self.module = module
        self.pip_name = pip_name
        self.check = check
        self.finish = finish

    def matches(self, head):
        if not head.startswith(self.magic):
            return False
        return self.check(head) if self.check else True

    def new_decoder(self, head):
        """(decoder, number of header bytes it does not want)."""
        return self.factory(head)

    def finish_member(self, dec, rest, source):
        """Bytes after a member that belong to it (lzip trailer); checked here."""
        return self.finish(dec, rest, source) if self.finish else 0

    def open(self, raw):
        if self.module:
            need_module(self.module, "reading %s-compressed images" % self.name, self.pip_name)
        return DecompressSource(raw, self)


def _lzma_alone_check(head):
    # lzma-alone has no real magic: properties byte 0x5D and a sane dictionary size.
    if len(head) < 13:
        return False
    dict_size = struct.unpack_from("<I", head, 1)[0]
    return head[0] == 0x5D and 4096 <= dict_size <= (1 << 30) and \
        (dict_size & (dict_size - 1) == 0 or dict_size % (1 << 20) == 0)


def _zstd_check(head):
    """A zstd frame, possibly after skippable frames (pzstd starts with one)."""
    while len(head) >= 8 and 0x184D2A50 <= struct.unpack_from("<I", head)[0] <= 0x184D2A5F:
        head = head[8 + struct.unpack_from("<I", head, 4)[0]:]
    return head.startswith(b"\x28\xb5\x2f\xfd")


def _lzip_decoder(head):
    if len(head) < 6 or head[4] != 1:
        raise ContainerError("unsupported lzip version")
    b = head[5]
    dict_size = (1 << (b & 0x1F)) - ((1 << (b & 0x1F)) // 16) * (b >> 5)
    if not (1 << 12) <= dict_size <= (1 << 29):
        raise ContainerError("lzip header has an invalid dictionary size")
    filters = [{"id": lzma.FILTER_LZMA1, "dict_size": dict_size, "lc": 3, "lp": 0, "pb": 2}]
    return _LzipDecoder(lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=filters)), 6


class _LzipDecoder:
    """Raw LZMA1 decoder that also keeps the CRC32 and size the lzip trailer checks."""

    def __init__(self, dec):
        self.d = dec
        self.crc = 0
        self.size = 0

    def decompress(self, data, max_length):
        out = self.d.decompress(data, max_length)
        self.crc = zlib.crc32(out, self.crc)
        self.size += len(out)
        return out

    eof = property(lambda self: self.d.eof)
    unused_data = property(lambda self: self.d.unused_data)
    needs_input = property(lambda self: self.d.needs_input)


def _lzip_finish(dec, rest, source):
    while len(rest) < 20 and source._more_input():
        rest = source.inbuf
    if len(rest) < 20:
        raise ContainerError("lzip stream is truncated (member trailer missing)")
    crc, size = struct.unpack_from("<IQ", rest, 0)
    if crc != dec.crc or size != dec.size:
        raise ContainerError("lzip member check failed near input offset %d" % source.in_pos)
    return 20


def _zstd_open(raw):
    zstandard = optional_module("zstandard")
    if zstandard is not None:
        reader = zstandard.ZstdDecompressor().stream_reader(
            _RawFile(raw), read_size=256 * 1024, read_across_frames=True)
        return ReaderSource(raw, reader, "zstd")
    if optional_module("pyzstd") is not None:
        return DecompressSource(raw, CODECS_BY_NAME["zstd-pyzstd"])
    raise MissingDependency("reading zstd-compressed images needs the Python package "
                            "'zstandard' or 'pyzstd' (pip install zstandard)")


class _PyzstdDecoder:
    def __init__(self):
        import pyzstd
        self.d = pyzstd.ZstdDecompressor()

    def decompress(self, data, max_length):
        return self.d.decompress(data, max_length)

    eof = property(lambda self: self.d.eof)
    unused_data = property(lambda self: self.d.unused_data)
    needs_input = property(lambda self: self.d.needs_input)


def _lz4_decoder(head):
    import lz4.frame
    return lz4.frame.LZ4FrameDecompressor(), 0


class BlockStreamSource(Source):
    """A stream decoded block by block by our own code (lz4 legacy, lzop):
    subclasses give next_block(), the decoded bytes of the next block or None."""

    def __init__(self, raw, name):
        self.raw, self.description = raw, name
        self.input_size = raw.input_size
        self.outbuf = b""
        self.ended = False

    def read(self, n):
        parts, have = [self.outbuf], len(self.outbuf)
        while have < n and not self.ended:
            block = self.next_block()
            if block is None:
                self.ended = True
                break
            parts.append(block)
            have += len(block)
        out = b"".join(parts)
        self.outbuf = out[n:]
        return out[:n]

    def consumed(self):
        return self.raw.consumed()


class Lz4LegacySource(BlockStreamSource):
    """lz4 legacy format (lz4 -l): magic, then blocks of u32 size + data, each
    at most 8 MiB when decoded; a repeated magic starts a concatenated stream."""

    MAGIC = b"\x02\x21\x4c\x18"

    def __init__(self, raw, block):
        BlockStreamSource.__init__(self, raw, "lz4-legacy")
        self.block = block

    def next_block(self):
        word = self.MAGIC
        while word == self.MAGIC:
            word = self.raw.read(4)
        if not word:
            return None
        if len(word) < 4:
            raise ContainerError("lz4 legacy stream is truncated")
        (csize,) = struct.unpack("<I", word)
        if csize > 8 * MiB + 65536:
            raise ContainerError("lz4 legacy block size %d is corrupt" % csize)
        data = self.raw.read(csize)
        if len(data) < csize:
            raise ContainerError("lz4 legacy stream is truncated")
        try:
            return self.block.decompress(data, uncompressed_size=8 * MiB)
        except Exception as e:
            raise ContainerError("lz4 legacy block is corrupt: %s" % e)


def _lz4_legacy_open(raw):
    block = need_module("lz4.block", "reading lz4-compressed images", "lz4")
    raw.read(4)
    return Lz4LegacySource(raw, block)


def _lzo_open(raw):
    lzo = need_module("lzo", "reading lzop-compressed images", "python-lzo")
    return LzopSource(raw, lzo)


class LzopSource(BlockStreamSource):
    """lzop files: a header, then blocks of (usize, csize, checksums, data)."""

    MAGIC = b"\x89LZO\x00\r\n\x1a\n"
    # flag bits of the lzop header
    ADLER_D, ADLER_C, EXTRA, CRC_D, CRC_C, FILTER = 0x1, 0x2, 0x40, 0x100, 0x200, 0x800

    def __init__(self, raw, lzo):
        BlockStreamSource.__init__(self, raw, "lzop")
        self.lzo = lzo
        self.flags = None

    def _take(self, n):
        data = self.raw.read(n)
        if len(data) < n:
            raise ContainerError("lzop stream is truncated")
        return data

    def _header(self):
        head = self._take(9 + 6)
        version, _lib, _need, method = struct.unpack(">HHHB", head[9:16] + self._take(1))[:4]
        if version < 0x0940:
            raise ContainerError("lzop file version %#x is not supported" % version)
        if method not in (1, 2, 3):
            raise ContainerError("lzop method %d is not LZO1X" % method)
        self._take(1)                                   # level
        (flags,) = struct.unpack(">I", self._take(4))
        if flags & self.FILTER:
            self._take(4)
        self._take(12)                                  # mode, mtime low/high
        (name_len,) = self._take(1)
        self._take(name_len + 4)                        # name, header checksum
        if flags & self.EXTRA:
            (n,) = struct.unpack(">I", self._take(4))
            self._take(n + 4)
        self.flags = flags

    def next_block(self):
        if self.flags is None:
            self._header()
        (usize,) = struct.unpack(">I", self._take(4))
        if usize == 0:
            return None
        (csize,) = struct.unpack(">I", self._take(4))
        if usize > 64 * MiB or csize > usize:
            raise ContainerError("lzop block header is corrupt")
        f = self.flags
        dsum = self._take(4) if f & (self.ADLER_D | self.CRC_D) else None
        if csize < usize and f & (self.ADLER_C | self.CRC_C):
            self._take(4)
        data = self._take(csize)
        if csize < usize:
            try:
                data = self.lzo.decompress(data, False, usize)
            except Exception as e:
                raise ContainerError("lzop block is corrupt: %s" % e)
        if dsum is not None:
            want = zlib.crc32(data) if f & self.CRC_D else zlib.adler32(data)
            if struct.unpack(">I", dsum)[0] != want:
                raise ContainerError("lzop block checksum mismatch near input offset %d"
                                     % self.raw.consumed())
        return data


CODECS = [
    Codec("gzip", b"\x1f\x8b", lambda h: (_ZlibDecoder(31), 0)),
    Codec("bzip2", b"BZh", lambda h: (bz2.BZ2Decompressor(), 0),
          check=lambda h: len(h) > 3 and 0x31 <= h[3] <= 0x39),
    Codec("xz", b"\xfd7zXZ\x00", lambda h: (lzma.LZMADecompressor(lzma.FORMAT_XZ), 0)),
    Codec("lzip", b"LZIP", _lzip_decoder, finish=_lzip_finish),
    Codec("lzma", b"\x5d", lambda h: (lzma.LZMADecompressor(lzma.FORMAT_ALONE), 0),
          check=_lzma_alone_check),
    Codec("zstd", b"", None, check=_zstd_check),
    Codec("zstd-pyzstd", b"", lambda h: (_PyzstdDecoder(), 0), check=_zstd_check),
    Codec("lz4", b"\x04\x22\x4d\x18", _lz4_decoder, module="lz4.frame", pip_name="lz4"),
    Codec("lz4-legacy", Lz4LegacySource.MAGIC, None),
    Codec("lzop", LzopSource.MAGIC, None),
]
CODECS_BY_NAME = {c.name: c for c in CODECS}
CODECS_BY_NAME["zstd"].open = _zstd_open
CODECS_BY_NAME["lzop"].open = _lzo_open
CODECS_BY_NAME["lz4-legacy"].open = _lz4_legacy_open
DETECTED_CODECS = [c for c in CODECS if c.name != "zstd-pyzstd"]


def open_stream(path):
    """Open IMAGE (a path, the first piece of a split set, or '-') as a
    decompressed, peekable stream.  Returns (stream, container description)."""
    if path == "-":
        raw = StdinSource()
        pieces = 1
    else:
        if not os.path.lexists(path):
            raise ContainerError("%s: no such file" % path)
        raw = FileSource(split_pieces(path))
        pieces = len(raw.paths)
    raw = PeekSource(raw)
    head = raw.peek(64)
    codec = next((c for c in DETECTED_CODECS if c.matches(head)), None)
    if codec is None:
        return raw, {"compression": None, "pieces": pieces}
    stream = PeekSource(codec.open(raw))
    return stream, {"compression": codec.name, "pieces": pieces}


# ===========================================================================
# Checksums
# ===========================================================================
#
# Every checksum engine is a function data -> the bytes stored in the image,
# built per image by make_digest().  Engines with "running" state (partclone's
# no-reseed modes, format 0001) keep it in a closure; the data must then be
# fed in image order, which every pass here does.

# --- XXH64 and XXH3-128 in pure Python ------------------------------------
# Used only when the C package `xxhash` is missing (same digests, ~25 MB/s).
# Written from the xxHash specification; digest() never ends the stream.

M64 = 0xFFFFFFFFFFFFFFFF
P32_1, P32_2, P32_3 = 0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D
P64_1, P64_2, P64_3 = 0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9
P64_4, P64_5 = 0x85EBCA77C2B2AE63, 0x27D4EB2F165667C5
PMX1, PMX2 = 0x165667919E3779F9, 0x9FB21C651E98DF25

_U64 = struct.Struct("<Q").unpack_from
_U32 = struct.Struct("<I").unpack_from


def _words(buf, off, n):
    """n little-endian 64-bit words of buf starting at byte off."""
    return struct.unpack_from("<%dQ" % n, buf, off)


def _view(data):
    if isinstance(data, str):  # the C package accepts str as UTF-8, so do we
        data = data.encode("utf-8")
    mv = memoryview(data)
    return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")


class _Hash:
    def hexdigest(self):
        return self.digest().hex()

    def digest(self):
        return self.intdigest().to_bytes(self.digest_size, "big")


# ---------------------------------------------------------------- XXH64

def _avalanche64(h):
    h = ((h ^ (h >> 33)) * P64_2) & M64
    h = ((h ^ (h >> 29)) * P64_3) & M64
    return h ^ (h >> 32)


def _round64(acc, lane):
    acc = (acc + lane * P64_2) & M64
    return ((acc << 31 | acc >> 33) * P64_1) & M64


class PyXXH64(_Hash):
    name, digest_size, block_size = "XXH64", 8, 32
    _CHUNK = 1 << 16  # bytes unpacked at once: bounds the temporary tuple

    def __init__(self, data=b"", seed=0):
        seed &= M64
        self._seed = seed
        self._v = [(seed + P64_1 + P64_2) & M64, (seed + P64_2) & M64,
                   seed, (seed - P64_1) & M64]
        self._buf = bytearray()  # < 32 bytes not yet forming a stripe
        self._len = 0
        self.update(data)

    def copy(self):
        c = object.__new__(PyXXH64)
        c._seed, c._v, c._buf, c._len = self._seed, self._v[:], self._buf[:], self._len
        return c

    def update(self, data):
        mv = _view(data)
        self._len += len(mv)
        buf = self._buf
        if len(buf) + len(mv) < 32:
            buf += mv
            return
        if buf:  # complete the pending stripe first
            k = 32 - len(buf)
            buf += mv[:k]
            mv = mv[k:]
            self._stripes(buf)
            del buf[:]
        end = len(mv) & ~31
        for off in range(0, end, self._CHUNK):
            self._stripes(mv[off:min(off + self._CHUNK, end)])
        buf += mv[end:]

    def _stripes(self, mv):
        """Run the 4 lane rounds over whole 32-byte stripes of mv."""
        v1, v2, v3, v4 = self._v
        # lane * PRIME64_2 is done in C by map(); zip(it, it, it, it) yields
        # one stripe per iteration so the loop body is just the 4 rounds.
        it = map(mul, _words(mv, 0, len(mv) >> 3), repeat(P64_2))
        for a, b, c, d in zip(it, it, it, it):
            v1 = (v1 + a) & M64
            v1 = ((v1 << 31 | v1 >> 33) * P64_1) & M64
            v2 = (v2 + b) & M64
            v2 = ((v2 << 31 | v2 >> 33) * P64_1) & M64
            v3 = (v3 + c) & M64
            v3 = ((v3 << 31 | v3 >> 33) * P64_1) & M64
            v4 = (v4 + d) & M64
            v4 = ((v4 << 31 | v4 >> 33) * P64_1) & M64
        self._v = [v1, v2, v3, v4]

    def intdigest(self):
        if self._len >= 32:
            v1, v2, v3, v4 = self._v
            h = ((v1 << 1 | v1 >> 63) + (v2 << 7 | v2 >> 57) +
                 (v3 << 12 | v3 >> 52) + (v4 << 18 | v4 >> 46)) & M64
            for v in self._v:
                h = (((h ^ _round64(0, v)) * P64_1) + P64_4) & M64
        else:
            h = (self._seed + P64_5) & M64
        h = (h + self._len) & M64
        buf, i, n = self._buf, 0, len(self._buf)
        while i + 8 <= n:
            h ^= _round64(0, _U64(buf, i)[0])
            h = (((h << 27 | h >> 37) & M64) * P64_1 + P64_4) & M64
            i += 8
        if i + 4 <= n:
            h ^= (_U32(buf, i)[0] * P64_1) & M64
            h = (((h << 23 | h >> 41) & M64) * P64_2 + P64_3) & M64
            i += 4
        for b in buf[i:]:
            h ^= (b * P64_5) & M64
            h = (((h << 11 | h >> 53) & M64) * P64_1) & M64
        return _avalanche64(h)


# ---------------------------------------------------------------- XXH3-128

_SECRET = bytes.fromhex(
    "b8fe6c3923a44bbe7c01812cf721ad1cded46de9839097db7240a4a4b7b3671f"
    "cb79e64eccc0e578825ad07dccff7221b8084674f743248ee03590e6813a264c"
    "3c2852bb91c300cb88d0658b1b532ea371644897a20df94e3819ef46a9deacd8"
    "a8fa763fe39c343ff9dcbbc7c70b4f1d8a51e04bcdb45931c89f7ec9d9787364"
    "eac5ac8334d3ebc3c581a0fffa1363eb170ddd51b7f0da49d316552629d4689e"
    "2b16be587d47a1fc8ff8b8d17ad031ce45cb3a8f95160428afd7fbcabb4b407e")
# Stripe n of a block reads the secret from byte 8*n: lay those 16 windows end
# to end so that a run of stripes is xored with its key in one big-int xor.
_BLOCK_KEY = b"".join(_SECRET[8 * n:8 * n + 64] for n in range(16))
_SCRAMBLE = _words(_SECRET, 128, 8)    # last 64 bytes of the secret
_LAST_KEY = _SECRET[121:185]           # secretLength - 64 - 7
_MERGE_LO = _words(_SECRET, 11, 8)
_MERGE_HI = _words(_SECRET, 117, 8)    # secretLength - 75
_ACC_INIT = (P32_3, P64_1, P64_2, P64_3, P64_4, P32_2, P64_5, P32_1)


def _avalanche3(h):
    h = ((h ^ (h >> 37)) * PMX1) & M64
    return h ^ (h >> 32)


def _mul_fold(a, b):
    p = a * b
    return (p ^ (p >> 64)) & M64


def _bswap64(x):
    return int.from_bytes(x.to_bytes(8, "little"), "big")


@lru_cache(maxsize=16)
def _halves(nw):
    """Unpackers for the low and the high 32-bit halves of nw 64-bit words."""
    return (struct.Struct("<" + "I4x" * nw).unpack_from,
            struct.Struct("<" + "4xI" * nw).unpack_from)


def _accumulate(acc, data, key):
    """Accumulate the whole stripes of data, xoring it with key (same length).

    Per lane i: acc[i] += lo32 * hi32 of (data ^ key), acc[i ^ 1] += data.
    All per-word work happens in C: one big-int xor, struct unpacking straight
    into 32-bit halves, map(mul) and sum() over lane slices.  Masking is done
    once at the end since Python ints do not overflow.
    """
    n = len(data)
    x = (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")
    lo, hi = _halves(n >> 3)
    prods = list(map(mul, lo(x), hi(x)))
    words = _words(data, 0, n >> 3)
    for i in range(8):
        acc[i] = (acc[i] + sum(prods[i::8]) + sum(words[i ^ 1::8])) & M64


def _merge(acc, init, key):
    h = init
    for i in range(0, 8, 2):
        h += _mul_fold(acc[i] ^ key[i], acc[i + 1] ^ key[i + 1])
    return _avalanche3(h & M64)


def _mix32(acc, b, o1, o2, s):
    """mixTwoChunks: 16 bytes at o1 and at o2 against 32 secret bytes at s."""
    a1, a2 = _words(b, o1, 2)
    b1, b2 = _words(b, o2, 2)
    k = _words(_SECRET, s, 4)
    acc[0] = ((acc[0] + _mul_fold(a1 ^ k[0], a2 ^ k[1])) & M64) ^ ((b1 + b2) & M64)
    acc[1] = ((acc[1] + _mul_fold(b1 ^ k[2], b2 ^ k[3])) & M64) ^ ((a1 + a2) & M64)


def _xxh3_128_short(b):
    """XXH3-128 of len(b) <= 240 bytes (seed 0)."""
    n = len(b)
    if n > 16:
        acc = [(n * P64_1) & M64, 0]
        if n <= 128:
            for i in range((n - 1) >> 5, -1, -1):
                _mix32(acc, b, 16 * i, n - 16 * i - 16, 32 * i)
        else:
            for i in range(4):
                _mix32(acc, b, 32 * i, 32 * i + 16, 32 * i)
            acc = [_avalanche3(acc[0]), _avalanche3(acc[1])]
            for i in range(4, n >> 5):
                _mix32(acc, b, 32 * i, 32 * i + 16, 32 * (i - 4) + 3)
            _mix32(acc, b, n - 16, n - 32, 103)
        lo = (acc[0] + acc[1]) & M64
        hi = (acc[0] * P64_1 + acc[1] * P64_4 + n * P64_2) & M64
        return _avalanche3(lo), (-_avalanche3(hi)) & M64
    if n > 8:
        first, last = _U64(b, 0)[0], _U64(b, n - 8)[0]
        s = _words(_SECRET, 32, 4)
        p = (s[0] ^ s[1] ^ first ^ last) * P64_1
        lo = ((p & M64) + ((n - 1) << 54)) & M64
        v2 = s[2] ^ s[3] ^ last
        # == hi64(p) + (v2 >> 32 << 32) + lo32(v2) * PRIME32_2
        hi = ((p >> 64) + v2 + (v2 & M32) * (P32_2 - 1)) & M64
        lo ^= _bswap64(hi)
        p = lo * P64_2
        hi = ((p >> 64) + hi * P64_2) & M64
        return _avalanche3(p & M64), _avalanche3(hi)
    if n >= 4:
        s = _words(_SECRET, 16, 2)
        v = s[0] ^ s[1] ^ (_U32(b, 0)[0] | _U32(b, n - 4)[0] << 32)
        p = v * ((P64_1 + (n << 2)) & M64)
        lo, hi = p & M64, p >> 64
        hi = (hi + (lo << 1)) & M64
        lo ^= hi >> 3
        lo ^= lo >> 35
        lo = (lo * PMX2) & M64
        return lo ^ (lo >> 28), _avalanche3(hi)
    if n:
        c = b[n - 1] | n << 8 | b[0] << 16 | b[n >> 1] << 24
        cs = int.from_bytes(c.to_bytes(4, "little"), "big")  # bswap32
        s = struct.unpack_from("<4I", _SECRET)
        return (_avalanche64((s[0] ^ s[1]) ^ c),
                _avalanche64((s[2] ^ s[3]) ^ ((cs << 13 | cs >> 19) & M32)))
    s = _words(_SECRET, 64, 4)
    return _avalanche64(s[0] ^ s[1]), _avalanche64(s[2] ^ s[3])


class PyXXH3_128(_Hash):
    name, digest_size, block_size = "XXH3_128", 16, 64

    def __init__(self, data=b""):
        self._acc = None        # None while total length <= 240 (short path)
        self._n = 0             # bytes accumulated in the current block
        self._buf = bytearray()  # pending input (all of it while short)
        self._last = b""        # last 64 bytes consumed, for the final stripe
        self._len = 0
        self.update(data)

    def copy(self):
        c = object.__new__(PyXXH3_128)
        c._acc = None if self._acc is None else self._acc[:]
        c._n, c._buf, c._last, c._len = self._n, self._buf[:], self._last, self._len
        return c

    def update(self, data):
        mv = _view(data)
        self._len += len(mv)
        buf = self._buf
        if self._acc is None:
            if self._len <= 240:
                buf += mv
                return
            self._acc = list(_ACC_INIT)
        # A stripe is consumed only once more input follows it: the stripe
        # ending the input is hashed specially in intdigest(), and a full
        # block is scrambled only when not last.  So 1..64 bytes stay pending.
        if len(buf) + len(mv) <= 64:
            buf += mv
            return
        if buf:
            k = -len(buf) % 64
            buf += mv[:k]
            mv = mv[k:]
            end = len(buf) if mv else (len(buf) - 1) & ~63
            self._consume(buf[:end])
            del buf[:end]
        if mv:
            end = (len(mv) - 1) & ~63
            if end:
                self._consume(mv[:end])
            buf += mv[end:]

    def _consume(self, mv):
        """Accumulate whole stripes of mv (len a nonzero multiple of 64),
        one block at a time so temporaries stay small."""
        acc, n, off, total = self._acc, self._n, 0, len(mv)
        while off < total:
            m = min(1024 - n, total - off)  # bytes left in this block
            _accumulate(acc, mv[off:off + m], _BLOCK_KEY[n:n + m])
            n += m
            off += m
            if n == 1024:
                for i in range(8):
                    a = acc[i]
                    acc[i] = ((a ^ (a >> 47) ^ _SCRAMBLE[i]) * P32_1) & M64
                n = 0
        self._n = n
        self._last = bytes(mv[-64:])

    def intdigest(self):
        if self._acc is None:
            lo, hi = _xxh3_128_short(bytes(self._buf))
        else:
            acc = self._acc[:]
            _accumulate(acc, (self._last + self._buf)[-64:], _LAST_KEY)
            n = self._len
            lo = _merge(acc, (n * P64_1) & M64, _MERGE_LO)
            hi = _merge(acc, ~(n * P64_2) & M64, _MERGE_HI)
        return hi << 64 | lo


def _xxhash_or_fallback():
    """(xxh64 class, xxh3_128 class) from the C package, else the pure-Python ones."""
    xxhash = optional_module("xxhash")
    if xxhash is not None:
        return xxhash.xxh64, xxhash.xxh3_128
    return PyXXH64, PyXXH3_128


def crc32_partclone(data, state=0):
    """partclone's CRC32: zlib's polynomial and init, but no final inversion."""
    return zlib.crc32(data, state) ^ M32


_PACK_U32 = struct.Struct("<I").pack
_PACK_U64 = struct.Struct("<Q").pack


def make_digest(kind, reseed, endian="<", field_size=None):
    """A function data -> stored checksum bytes, for one image's checksum mode.

    kind: 'crc32', 'xxh64', 'xxh128' (partclone 0002) or 'crc32-v1'
    (partclone 0001: the running CRC of each block's first byte repeated)."""
    u32 = struct.Struct(endian + "I").pack
    u64 = struct.Struct(endian + "Q").pack
    if kind == "crc32":
        if reseed:
            return lambda d: u32(zlib.crc32(d) ^ M32)
        state = [0]

        def running_crc(d):
            state[0] = zlib.crc32(d, state[0])
            return u32(state[0] ^ M32)
        return running_crc
    if kind == "crc32-v1":
        # The 0001 writer fed the first byte of each block block-size times
        # into a CRC that is never reset; keep 256 such blocks at hand.
        pack = u32 if field_size == 4 else u64
        cache = {}
        state = [0]

        def v1_crc(d):
            key = d[0]
            rep = cache.get(key)
            if rep is None or len(rep) != len(d):
                rep = cache[key] = bytes((key,)) * len(d)
            state[0] = zlib.crc32(rep, state[0])
            return pack(state[0] ^ M32)
        return v1_crc
    xxh64, xxh128 = _xxhash_or_fallback()
    if kind == "xxh64":
        if reseed:
            return lambda d: u64(xxh64(d).intdigest())
        h64 = xxh64()

        def running_xxh64(d):
            h64.update(d)
            return u64(h64.intdigest())
        return running_xxh64
    if kind == "xxh128":
        order = "little" if endian == "<" else "big"
        if reseed:
            return lambda d: xxh128(d).intdigest().to_bytes(16, order)
        h128 = xxh128()

        def running_xxh128(d):
            h128.update(d)
            return h128.intdigest().to_bytes(16, order)
        return running_xxh128
    raise FormatError("unknown checksum kind %r" % kind)


# --- checksum lists: GNU "<hex>  name" and BSD "ALGO (name) = <hex>" ----------
# GNU (md5sum, sha*sum, b2sum, b3sum): "<hex>  name" (text) or "<hex> *name"
# (binary); BSD `md5 -r` writes "<hex> name".  --tag writes "ALGO (name) = <hex>"
# with ALGO one of MD5 SHA1 SHA224 SHA256 SHA384 SHA512 BLAKE2b BLAKE2b-<bits>
# (b2sum -l) SHA3-<bits> (cksum -a sha3).  A name holding "\", LF or CR is
# written with "\\", "\n", "\r" and the whole line then starts with "\".

SumEntry = namedtuple("SumEntry", "algo hexdigest name line")

_HEX_LEN = {"md5": 32, "sha1": 40, "sha224": 56, "sha256": 64, "sha384": 96,
            "sha512": 128, "blake2b": 128, "blake3": 64}
_BY_LEN = {32: "md5", 40: "sha1", 56: "sha224", 64: "sha256", 96: "sha384", 128: "sha512"}
_HINT_RE = re.compile(r"(?:^|[._-])(md5|sha1|sha224|sha256|sha384|sha512|b2|blake2b?|b3|blake3)"
                      r"(?:sums?)?(?:\.txt|\.asc)?$", re.I)
_HINT_ALIAS = {"b2": "blake2b", "blake2": "blake2b", "b3": "blake3"}
_TAGS = dict({t: t.lower() for t in ("MD5", "SHA1", "SHA224", "SHA256", "SHA384", "SHA512",
                                     "BLAKE2b", "BLAKE3")}, **{"BLAKE2b-512": "blake2b"})
_TAGS.update(("SHA3-%d" % b, "sha3_%d" % b) for b in (224, 256, 384, 512))
_TAGS.update(("BLAKE2b-%d" % b, "blake2b-%d" % b) for b in range(8, 512, 8))
_TAG_RE = re.compile(rb"([A-Za-z0-9-]+) \((.*)\) = ([0-9A-Fa-f]+)$", re.S)
_GNU_RE = re.compile(rb"([0-9A-Fa-f]+)( [ *]| )?(.*)$", re.S)
_GOOD_ESCAPES = re.compile(rb"(?:[^\\]|\\[\\nr])*", re.S)
_ESCAPES = {b"\\\\": b"\\", b"\\n": b"\n", b"\\r": b"\r"}


def hex_len(algo):
    """Hex digits of an algorithm's digest: 'blake2b-256' -> 64, 'sha3_384' -> 96."""
    m = re.match(r"(?:blake2b-|sha3_)(\d+)$", algo)
    return int(m.group(1)) // 4 if m else _HEX_LEN.get(algo)


def _sum_line(s, hint):
    """(algo, hex digest, name bytes) of one line, or a str saying what is wrong."""
    escaped = s.startswith(b"\\")
    s = s[1:] if escaped else s
    tag = _TAG_RE.match(s)
    if tag:
        tag_name, fname, digest = tag.group(1).decode("ascii"), tag.group(2), tag.group(3)
        algo = _TAGS.get(tag_name)
        if algo is None:
            return "unknown algorithm " + tag_name
        if hex_len(algo) != len(digest):
            return "%s digest with %d hex digits" % (algo, len(digest))
    else:
        g = _GNU_RE.match(s)
        if not g or (g.group(2) is None and g.group(3)):
            return "not a checksum line"
        digest, fname, n = g.group(1), g.group(3), len(g.group(1))
        if hint == "blake2b" and n != 128:          # b2sum -l <bits>
            algo = "blake2b-%d" % (n * 4) if n % 2 == 0 and n < 128 else None
        else:
            algo = (hint if hex_len(hint) == n else None) if hint else _BY_LEN.get(n)
        if algo is None:
            return "%d hex digits fit no %s digest" % (n, hint or "known")
    if escaped:
        if not _GOOD_ESCAPES.fullmatch(fname):
            return "bad backslash escape in the file name"
        fname = re.sub(rb"\\[\\nr]", lambda m: _ESCAPES[m.group(0)], fname)
    return algo, digest.decode("ascii").lower(), fname


def parse_sums(source, algo=None, name=None):
    """Read a checksum list or sidecar; return (entries, bad).

    source: a path, or the content itself (bytes, or str holding a newline).
    algo: the algorithm of untagged lines; default from the file name (.sha256,
    MD5SUMS, .b2 ...), else from the digest length (64 hex digits: sha256).
    name: what a bare hash (a line with no file name) applies to; default the
    sidecar's name less its suffix (disk.img.sha256 -> disk.img), else None.
    entries: SumEntry(algo, hexdigest lower-case, name, line number) with algo
    a hashlib name, 'blake2b-<bits>' or 'blake3'; bad: (line number, reason)."""
    if isinstance(source, bytes) or (isinstance(source, str) and "\n" in source):
        data = source.encode("utf-8", "surrogateescape") if isinstance(source, str) else source
        base = ""
    else:
        base = os.path.basename(os.fspath(source))
        try:
            if os.path.getsize(source) > 64 * MiB:
                raise FormatError("%s is too large for a checksum list" % base)
            with io.open(source, "rb") as f:
                data = f.read()
        except OSError as e:
            raise FormatError("cannot read %s: %s" % (base, e.strerror or e))
    m = _HINT_RE.search(base)
    hint = algo or (m and _HINT_ALIAS.get(m.group(1).lower(), m.group(1).lower()))
    if name is None and m and m.start() > 0:
        name = base[:m.start()]
    entries, bad = [], []
    for no, line in enumerate(data.split(b"\n"), 1):
        s = (line[:-1] if line.endswith(b"\r") else line).lstrip(b" \t")
        if no == 1 and s.startswith(b"\xef\xbb\xbf"):         # a UTF-8 byte-order mark
            s = s[3:]
        if not s.strip() or s.startswith(b"#"):
            continue
        got = _sum_line(s, hint)
        if isinstance(got, str):
            bad.append((no, got))
        else:
            entries.append(SumEntry(got[0], got[1], os.fsdecode(got[2]) if got[2] else name, no))
    return entries, bad


# --- parallel hashing ---------------------------------------------------------

def new_hash(algo):
    """A hash object for an algorithm name from parse_sums, or None if unavailable."""
    if algo == "blake3":
        mod = optional_module("blake3")
        return mod.blake3() if mod is not None else None
    if algo.startswith("blake2b-"):
        return hashlib.blake2b(digest_size=int(algo[8:]) // 8)
    try:
        return hashlib.new(algo)
    except (ValueError, TypeError):
        return None


class Hashers:
    """Feed the same chunks to several hashes on up to `threads` worker threads.

    Each worker owns some of the hashes and a queue of `depth` chunks; update()
    returns once every queue has room, so the caller reads the next chunk while
    the last is hashed (hashlib drops the GIL for buffers over 2 KiB).  With
    depth=1 at most 3 chunks are alive: hashed, queued, being read.  A chunk
    must not change after update(): pass bytes, not a reused buffer.
    threads=0 hashes in the caller.  Algorithms that cannot be computed here are
    left out and named in .missing with what to install."""

    def __init__(self, algos, threads=2, depth=1):
        self.hashes, self.missing, self._error = {}, {}, None
        for a in dict.fromkeys(algos):
            h = new_hash(a)
            if h is not None:
                self.hashes[a] = h
            elif a == "blake3":
                self.missing[a] = "blake3 needs the Python package 'blake3' (pip install blake3)"
            else:
                self.missing[a] = "%s is not in this Python's hashlib" % a
        objs = list(self.hashes.values())
        n = min(threads, len(objs))
        self._inline = objs if n == 0 else ()
        self._queues = [queue.Queue(depth) for _ in range(n)]
        self._threads = [threading.Thread(target=self._work, args=(q, objs[i::n]), daemon=True)
                         for i, q in enumerate(self._queues)]
        for t in self._threads:
            t.start()

    def _work(self, q, lane):
        for chunk in iter(q.get, None):
            if self._error is None:
                try:
                    for h in lane:
                        h.update(chunk)
                except Exception as e:  # raised again in the caller's thread
                    self._error = e

    def update(self, chunk):
        if self._error is not None:
            raise self._error
        for h in self._inline:
            h.update(chunk)
        for q in self._queues:
            q.put(chunk)

    def close(self):
        """Wait for the queued chunks and stop the workers (may be called again)."""
        for q in self._queues:
            q.put(None)
        for t in self._threads:
            t.join()
        self._queues, self._threads = [], []

    def hexdigests(self):
        """{algo: lower-case hex} once every chunk fed so far is hashed."""
        self.close()
        if self._error is not None:
            raise self._error
        return {a: h.hexdigest() for a, h in self.hashes.items()}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --- PAR 2.0 (Parchive) recovery sets -----------------------------------------
# A .par2 file is a run of packets, 4-byte aligned, integers little-endian:
#   magic "PAR2\0PKT" | u64 length of the whole packet (multiple of 4, >= 64) |
#   MD5 of the bytes from the set ID to the end | 16-byte recovery set ID |
#   16-byte type | body.
# Main "PAR 2.0\0Main\0\0\0\0": u64 slice size (multiple of 4), u32 count of
#   recovery-set files, their 16-byte file IDs, then non-recovery-set file IDs.
# FileDesc "PAR 2.0\0FileDesc": file ID, MD5 of the file, MD5 of its first
#   16 KiB, u64 length, name (NUL-padded to a multiple of 4).
# IFSC "PAR 2.0\0IFSC\0\0\0\0": file ID, then per slice MD5 + u32 CRC32 (zlib's);
#   the last slice is zero-padded to the slice size for both.
# RecvSlic "PAR 2.0\0RecvSlic": u32 exponent + one slice of recovery data.
# Creator "PAR 2.0\0Creator\0": client name.  Packets repeat across the files
# (name.par2, name.vol000+01.par2 ...), in any order; damaged ones are skipped.

_PAR2_MAGIC = b"PAR2\0PKT"
_PKT_HEAD = struct.Struct("<8sQ16s16s16s")
_MAIN, _DESC = b"PAR 2.0\0Main\0\0\0\0", b"PAR 2.0\0FileDesc"
_IFSC, _RECV = b"PAR 2.0\0IFSC\0\0\0\0", b"PAR 2.0\0RecvSlic"
_CREATOR = b"PAR 2.0\0Creator\0"
_PKT_MAX = 4 * MiB        # larger packets other than recovery slices are passed over
_VOL_RE = re.compile(r"(?:\.vol\d+[-+]\d+)?\.par2$", re.I)

Par2File = namedtuple("Par2File", "file_id md5 md5_16k length name")
Par2Result = namedtuple("Par2Result", "name length seen length_ok md5_ok slices damaged "
                                      "recovery_slices repairable ok")


def par2_files(path):
    """The .par2 files of the set for `path` (an image, or one of the .par2 files)."""
    folder, base = os.path.split(os.path.abspath(path))
    m = _VOL_RE.search(base)
    stems = [base[:m.start()]] if m else [base, os.path.splitext(base)[0]]
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    for stem in stems:
        found = [n for n in names if n.startswith(stem) and _VOL_RE.fullmatch(n[len(stem):])]
        if found:
            found.sort(key=lambda n: len(n) != len(stem) + 5)    # the index file first
            return [os.path.join(folder, n) for n in found]
    return []


def _packets(mm, verify_recovery, damaged):
    """Yield (set ID, type, body, length) of each intact packet in a mapped file.

    A recovery slice yields only its 4-byte exponent as body; its data is not
    read unless verify_recovery.  damaged[0] counts the packets that fail."""
    size = len(mm)
    pos = mm.find(_PAR2_MAGIC)
    while 0 <= pos <= size - _PKT_HEAD.size:
        _, length, md5, set_id, ptype = _PKT_HEAD.unpack_from(mm, pos)
        end, ok = pos + length, False
        if 64 <= length <= size - pos and length % 4 == 0:
            if ptype == _RECV and length >= 68:
                body, ok = mm[pos + 64:pos + 68], True
                if verify_recovery:
                    h = hashlib.md5()
                    for at in range(pos + 32, end, CHUNK):
                        h.update(mm[at:min(at + CHUNK, end)])
                    ok = h.digest() == md5
            elif length - 64 <= _PKT_MAX:
                body = mm[pos + 64:end]
                ok = hashlib.md5(mm[pos + 32:end]).digest() == md5
            else:
                ok = None   # huge and of no use here: pass over it, not counted
        if ok:
            yield set_id, ptype, body, length
            pos = mm.find(_PAR2_MAGIC, end)
        else:
            damaged[0] += ok is False
            pos = mm.find(_PAR2_MAGIC, pos + 1)


class Par2Set:
    """One PAR 2.0 recovery set as read from all its files (see Par2Set.open).

    .slice_size, .recovery_ids / .other_ids (file IDs of the recovery and
    non-recovery sets), .files {file ID: Par2File}, .slices {file ID: IFSC body},
    .recovery_slices (distinct exponents of well-sized recovery packets),
    .creator, .damaged_packets, .problems (strings), .paths (files read)."""

    def __init__(self, paths, packets, mains, damaged):
        self.paths, self.damaged_packets, self.problems = paths, damaged, []
        self.set_id = max(mains, key=mains.get)      # the set with most Main copies
        self.creator, descs, self.slices, exps = None, {}, {}, {}
        for (set_id, ptype, _), (body, length) in packets.items():
            if set_id != self.set_id:
                continue
            if ptype == _MAIN:
                self._main(body)
            elif ptype == _DESC and len(body) >= 56:
                fid, md5, md5_16k, size = struct.unpack_from("<16s16s16sQ", body)
                name = body[56:].rstrip(b"\0").decode("utf-8", "surrogateescape")
                descs[fid] = Par2File(fid, md5, md5_16k, size, name)
            elif ptype == _IFSC and (len(body) - 16) % 20 == 0:
                self.slices[body[:16]] = body
            elif ptype == _RECV:
                exps[body] = length
            elif ptype == _CREATOR:
                self.creator = body.rstrip(b"\0").decode("ascii", "replace")
        ids = self.recovery_ids + self.other_ids
        self.files = {i: descs[i] for i in ids if i in descs}
        if len(self.files) < len(ids):
            self.problems.append("%d file(s) of the set have no intact File Description packet"
                                 % (len(ids) - len(self.files)))
        self.recovery_slices = sum(n == 68 + self.slice_size for n in exps.values())
        if len(exps) > self.recovery_slices:
            self.problems.append("%d recovery packets of the wrong size"
                                 % (len(exps) - self.recovery_slices))

    def _main(self, body):
        if len(body) < 12 or (len(body) - 12) % 16:
            raise FormatError("par2 Main packet of %d bytes" % len(body))
        size, count = struct.unpack_from("<QI", body)
        if size == 0 or size % 4:
            raise FormatError("par2 slice size %d is not a positive multiple of 4" % size)
        ids = [body[i:i + 16] for i in range(12, len(body), 16)]
        if count > len(ids):
            raise FormatError("par2 Main packet lists %d files but holds %d IDs"
                              % (count, len(ids)))
        self.slice_size, self.recovery_ids, self.other_ids = size, ids[:count], ids[count:]

    @classmethod
    def open(cls, path, verify_recovery=False):
        """Read the set beside an image (disk.img -> disk.img.par2, disk.img.vol*.par2)
        or the set of a given .par2 file, keeping one intact copy of each packet.
        verify_recovery=True also MD5-checks the recovery slices' data (reads it)."""
        paths = par2_files(path)
        if not paths:
            raise FormatError("no .par2 files for %s" % os.path.basename(path))
        packets, mains, damaged = {}, {}, [0]
        for p in paths:
            try:
                with io.open(p, "rb") as f:
                    if os.fstat(f.fileno()).st_size < _PKT_HEAD.size:
                        continue
                    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                        for set_id, ptype, body, n in _packets(mm, verify_recovery, damaged):
                            # one copy each: of Main, Creator; of FileDesc, IFSC per file
                            # ID; of RecvSlic per exponent
                            key = body[:16] if ptype in (_DESC, _IFSC) else \
                                body[:4] if ptype == _RECV else b""
                            packets.setdefault((set_id, ptype, key), (body, n))
                            mains[set_id] = mains.get(set_id, 0) + (ptype == _MAIN)
            except (OSError, ValueError, OverflowError) as e:
                raise FormatError("cannot read %s: %s" % (os.path.basename(p), e))
        if not any(mains.values()):
            raise FormatError("no intact PAR 2.0 Main packet in %s"
                              % ", ".join(os.path.basename(p) for p in paths))
        return cls(paths, packets, mains, damaged[0])

    def find(self, name):
        """The Par2File for a file name: the same name, else the same basename, else
        the only file of a one-file set."""
        files, base = list(self.files.values()), os.path.basename(name)
        for same in (lambda f: f.name == name, lambda f: f.name.rsplit("/", 1)[-1] == base):
            hits = [f for f in files if same(f)]
            if len(hits) == 1:
                return hits[0]
        if len(files) == 1 and len(self.recovery_ids) + len(self.other_ids) == 1:
            return files[0]
        raise FormatError("%s is not in the par2 set (it has %s)"
                          % (base, ", ".join(f.name for f in files) or "no readable names"))


def _slice_sums(pieces, pad):
    """(MD5, CRC-32) of one par2 slice: its pieces, then `pad` zero bytes."""
    h, crc = hashlib.md5(), 0
    for piece in pieces:
        h.update(piece)
        crc = zlib.crc32(piece, crc)
    while pad > 0:
        z = _ZEROS[:min(pad, len(_ZEROS))]
        h.update(z)
        crc = zlib.crc32(z, crc)
        pad -= len(z)
    return h.digest(), crc


class Par2Check:
    """Check one file of a Par2Set: update() with its bytes in order, then finish().

    Slices are independent, so their MD5 and CRC-32 are taken on `threads`
    worker threads side by side (hashlib and zlib drop the GIL), a few slices
    in flight at most; threads=0 does them in the caller.  The whole-file MD5
    is only taken when the set has no slice checksums for the file."""

    def __init__(self, par2set, file_name, threads=2):
        self.set, self.file = par2set, par2set.find(file_name)
        self._count = -(-self.file.length // par2set.slice_size)
        body = par2set.slices.get(self.file.file_id)
        self._sums = None if body is None else list(struct.iter_unpack("<16sI", body[16:]))
        if self._sums is not None and len(self._sums) != self._count:
            raise FormatError("par2 has %d slice checksums for %s, whose length needs %d"
                              % (len(self._sums), self.file.name, self._count))
        self._md5 = Hashers(["md5"] if self._sums is None else [], min(threads, 1))
        self._pool = None
        if threads and self._sums is not None:
            from concurrent.futures import ThreadPoolExecutor
            self._pool = ThreadPoolExecutor(threads)
        self._threads = max(threads, 1)
        self._pieces, self._fill, self._index, self.seen = [], 0, 0, 0
        self._pending, self._damaged = [], []

    def update(self, data):
        """Feed the next bytes of the file (any size; bytes, not a reused buffer)."""
        self._md5.update(data)
        view, size, o = memoryview(data).cast("B"), self.set.slice_size, 0
        while o < len(view):
            piece = view[o:o + size - self._fill]
            self._pieces.append(piece)
            self._fill += len(piece)
            o += len(piece)
            if self._fill == size:
                self._end_slice(0)
        self.seen += len(view)

    def _end_slice(self, pad):
        i, pieces = self._index, self._pieces
        self._pieces, self._fill, self._index = [], 0, i + 1
        if self._sums is None or i >= self._count:
            return
        if self._pool is None:
            self._settle(i, _slice_sums(pieces, pad))
            return
        self._pending.append((i, self._pool.submit(_slice_sums, pieces, pad)))
        while len(self._pending) > 2 * self._threads:      # bounds the memory held
            j, future = self._pending.pop(0)
            self._settle(j, future.result())

    def _settle(self, i, sums):
        if sums != self._sums[i]:
            self._damaged.append(i)

    def finish(self):
        """The Par2Result: damaged slices as (index, start, end) byte ranges [start, end)
        of the original file (None without slice checksums), the length and MD5 verdicts,
        the recovery slices in the set, and whether `par2 r` could repair it
        (damaged slices <= recovery slices; None when that cannot be told)."""
        if self._fill:      # the last slice counts as zero-padded to the slice size
            self._end_slice(self.set.slice_size - self._fill)
        for j, future in self._pending:
            self._settle(j, future.result())
        self._pending = []
        self.close()
        digests = self._md5.hexdigests()
        md5_ok = digests["md5"] == self.file.md5.hex() if "md5" in digests else None
        length, size, damaged = self.file.length, self.set.slice_size, None
        if self._sums is not None:
            bad = sorted(self._damaged) + list(range(self._index, self._count))   # missing tail
            damaged = [(i, i * size, min(i * size + size, length)) for i in bad]
        ok = md5_ok is not False and self.seen == length and not damaged
        repairable = True if ok else None if damaged is None else \
            self.file.file_id in self.set.recovery_ids and len(damaged) <= self.set.recovery_slices
        return Par2Result(self.file.name, length, self.seen, self.seen == length, md5_ok,
                          self._count, damaged, self.set.recovery_slices, repairable, ok)

    def close(self):
        """Stop the workers (finish() does this too)."""
        self._md5.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


# ===========================================================================
# Image formats
# ===========================================================================
#
# Every reader parses its headers from the front of the (decompressed) stream
# when constructed, and then `scan()` reads the rest once, in order: it hands
# the partition's data to a sink (sink.write(partition_offset, bytes), in
# increasing offsets; unused blocks are simply not written) and every fault
# it finds to report(Problem).  verify = scan into nothing; extract = scan
# into a file.

class Problem:
    """One fault found in an image: where in the image, and what it spoils."""

    def __init__(self, kind, message, image_offset=None, byte_range=None, block_range=None,
                 unit="partition"):
        self.kind = kind                  # 'checksum', 'truncated', 'structure', ...
        self.message = message
        self.image_offset = image_offset
        self.byte_range = byte_range      # (first, end) bytes of the partition (or unit)
        self.block_range = block_range    # (first, last) block numbers
        self.unit = unit

    def __str__(self):
        parts = [self.message]
        if self.image_offset is not None:
            parts.append("at image offset %d" % self.image_offset)
        if self.byte_range is not None:
            parts.append("%s bytes %d-%d" % (self.unit, self.byte_range[0], self.byte_range[1] - 1))
        if self.block_range is not None:
            parts.append("blocks %d-%d" % self.block_range)
        return ", ".join(parts)


def _byte_runs_table():
    """For each byte value, its runs of set bits (LSB = first block) as (offset, length)."""
    table = []
    for b in range(256):
        runs, bit = [], 0
        while bit < 8:
            if b >> bit & 1:
                start = bit
                while bit < 8 and b >> bit & 1:
                    bit += 1
                runs.append((start, bit - start))
            else:
                bit += 1
        table.append(tuple(runs))
    return table


_BYTE_RUNS = _byte_runs_table()
_BIT_RUN_RE = re.compile(rb"\x00+|\xff+|[\x01-\xfe]")


def bit_runs(bitmap, nbits):
    """Runs (first block, count) of set bits in an LSB-first bitmap, below nbits.

    Whole 0x00/0xFF bytes are matched in C by the regex; only bytes that mix
    used and free blocks are looked up one by one."""
    cur_start = cur_end = 0
    for m in _BIT_RUN_RE.finditer(bitmap):
        value = bitmap[m.start()]
        if value == 0:
            continue
        base = m.start() * 8
        pieces = ((base, (m.end() - m.start()) * 8),) if value == 0xFF else \
            [(base + o, n) for o, n in _BYTE_RUNS[value]]
        for start, count in pieces:
            if start == cur_end and cur_end > cur_start:
                cur_end += count
                continue
            if cur_end > cur_start:
                yield cur_start, cur_end - cur_start
            cur_start, cur_end = start, start + count
        if cur_start >= nbits:
            return
    cur_end = min(cur_end, nbits)
    if cur_end > cur_start:
        yield cur_start, cur_end - cur_start


def _clip_runs(runs, nbits):
    for start, count in runs:
        if start >= nbits:
            return
        yield start, min(count, nbits - start)


def bit_runs_clipped(bitmap, nbits):
    return _clip_runs(bit_runs(bitmap, nbits), nbits)


_BYTE_RUN_RE = re.compile(rb"\x01+")


def byte_runs(bytemap):
    """Runs (first block, count) of 0x01 bytes in a byte-per-block map."""
    for m in _BYTE_RUN_RE.finditer(bytemap):
        yield m.start(), m.end() - m.start()


class SpanCursor:
    """Walks the used-block runs in order, handing out spans of used blocks."""

    def __init__(self, runs):
        self.runs = iter(runs)
        self.start = self.left = 0

    def take(self, n):
        """Spans (first block, count) covering the next n used blocks (fewer at the end)."""
        spans = []
        while n > 0:
            if not self.left:
                nxt = next(self.runs, None)
                if nxt is None:
                    break
                self.start, self.left = nxt
            k = min(n, self.left)
            spans.append((self.start, k))
            self.start += k
            self.left -= k
            n -= k
        return spans


def span_block(spans, k):
    """Block number of the k-th block covered by spans."""
    for start, count in spans:
        if k < count:
            return start + k
        k -= count
    return None


def emit_spans(sink, spans, payload, bs):
    """Write payload (the blocks of spans, back to back) to the sink, in
    pieces that copy nothing (the whole payload when it is one run)."""
    if len(spans) == 1 and spans[0][1] * bs == len(payload):
        sink.write(spans[0][0] * bs, payload)
        return
    view, pos = memoryview(payload), 0
    for start, count in spans:
        n = count * bs
        sink.write(start * bs, view[pos:pos + n])
        pos += n


def read_fully(stream, n, what):
    """Read n bytes; from a stream of unknown length in CHUNK pieces, so that
    memory follows the data actually there, not what a header claims."""
    if n <= CHUNK or (stream.size is not None and n <= stream.size):
        data = stream.read(n)
    else:
        parts, left = [], n
        while left:
            part = stream.read(min(left, CHUNK))
            if not part:
                break
            parts.append(part)
            left -= len(part)
        data = b"".join(parts)
    if len(data) < n:
        raise FormatError("image is truncated inside the %s (%d of %d bytes)" % (what, len(data), n))
    return data


class Image:
    """What every format reader offers (see the section comment)."""

    format = None

    def __init__(self, stream, container, name):
        self.stream = stream
        self.container = container
        self.name = name
        self.filesystem = None
        self.size = None
        self.block_size = None
        self.total_blocks = None
        self.used_blocks = None
        self.checksum = "none"
        self.header_problems = []     # found while opening; reported by scan()
        self.notes = []               # oddities the real tools accept too; shown by info
        self.extra = {}

    def info(self):
        d = {"format": self.format, "filesystem": self.filesystem, "size": self.size,
             "block_size": self.block_size, "used_blocks": self.used_blocks,
             "total_blocks": self.total_blocks, "checksum": self.checksum,
             "compression": self.container.get("compression"),
             "pieces": self.container.get("pieces")}
        d.update(self.extra)
        return d

    def scan(self, sink, report, progress):
        raise NotImplementedError

    def scan_all(self, sink, report, progress=None):
        """scan(), then the container's own verdict: a stream that broke off
        raises its error once the good data has been handed over."""
        self.scan(sink, report, progress)
        failed = self.stream.failure()
        if failed is not None:
            raise failed

    def coverage(self):
        """(how much of the data a clean scan vouches for: 'full', 'partial' or
        'none'; in words)."""
        return "none", "no checksums: nothing verified"

    def paths(self):
        """The files this image is read from: every split piece and volume."""
        if self.name == "-":
            return []
        return split_pieces(self.name) + volume_paths(self.name)[1:]

    def _progress(self, progress):
        if progress is not None:
            progress.update_to(self.stream.consumed())


def check_sizes(block_size, total_blocks, device_size, what):
    """Refuse absurd header values before anything is allocated."""
    if not 1 <= block_size <= 1 << 26:
        raise FormatError("%s: absurd block size %d" % (what, block_size))
    if total_blocks > 1 << 42 or total_blocks * block_size > 1 << 62:
        raise FormatError("%s: absurd block count %d" % (what, total_blocks))
    if device_size > 1 << 62:
        raise FormatError("%s: absurd device size %d" % (what, device_size))


# --- partclone -------------------------------------------------------------

PARTCLONE_CHECKSUMS = {   # mode on disk -> (name, size of the stored value)
    0x00: ("none", 0),
    0x20: ("crc32", 4),
    0x30: ("xxh64", 8),
    0x31: ("xxh128", 16),
}


class PartcloneImage(Image):
    """partclone image formats 0001 and 0002."""

    format = "partclone"
    MAGIC = b"partclone-image"
    V2_HEADER = 110
    V1_HEADER = 4160

    def __init__(self, stream, container, name):
        Image.__init__(self, stream, container, name)
        head = read_fully(stream, 36, "partclone header")
        version = head[30:34]
        if version == b"0002":
            self._open_v2(head + read_fully(stream, self.V2_HEADER - 36, "partclone header"))
        elif version == b"0001":
            self._open_v1(head + read_fully(stream, self.V1_HEADER - 36, "partclone header"))
        else:
            raise FormatError("unsupported partclone image version %r" % cstr(version))

    def _open_v2(self, h):
        if h[34:36] == b"\xde\xc0":
            e = "<"
        elif h[34:36] == b"\xc0\xde":
            e = ">"
        else:
            raise FormatError("partclone header has no valid endian marker")
        self.endian = e
        fs = cstr(h[36:52])
        device_size, total, used, _used_bitmap, bs = struct.unpack_from(e + "QQQQI", h, 52)
        _feature, _image_version, cpu_bits, mode, csize, bpc, reseed, bitmap_mode = \
            struct.unpack_from(e + "IHHHHIBB", h, 88)
        (stored_crc,) = struct.unpack_from(e + "I", h, 106)
        check_sizes(bs, total, device_size, "partclone header")
        if crc32_partclone(h[:106]) != stored_crc:
            self.header_problems.append(Problem("structure", "partclone header CRC mismatch",
                                                image_offset=106))
        if mode not in PARTCLONE_CHECKSUMS:
            raise FormatError("partclone header has unknown checksum mode %#x" % mode)
        name, size = PARTCLONE_CHECKSUMS[mode]
        if size and csize != size:
            raise FormatError("partclone header: checksum size %d does not fit %s" % (csize, name))
        if size and not 1 <= bpc <= 1 << 30:
            raise FormatError("partclone header: absurd blocks per checksum %d" % bpc)
        if bitmap_mode != 1:
            raise FormatError("partclone bitmap mode %d is not supported" % bitmap_mode)
        if used > total:
            raise FormatError("partclone header: %d used blocks of %d" % (used, total))
        self.filesystem, self.block_size, self.total_blocks = fs, bs, total
        self.size = device_size
        self.header_used = used
        self.checksum, self.csum_size = name, size
        self.bpc = bpc if size else 0
        self.reseed = bool(reseed)
        self.digest_kind = name
        nbytes = (total + 7) // 8
        self._check_room(self.V2_HEADER + nbytes + 4, "bitmap")
        self.bitmap = read_fully(self.stream, nbytes, "bitmap")
        (bitmap_crc,) = struct.unpack(e + "I", read_fully(self.stream, 4, "bitmap"))
        if crc32_partclone(self.bitmap) != bitmap_crc:
            self.header_problems.append(Problem("structure", "partclone bitmap CRC mismatch",
                                                image_offset=self.V2_HEADER + nbytes))
        self.data_start = self.V2_HEADER + nbytes + 4
        self.used_blocks = self._bitmap_used()
        self.runs = lambda: bit_runs_clipped(self.bitmap, self.total_blocks)
        self.extra = {"image_version": "0002", "tool_version": cstr(h[16:30]),
                      "blocks_per_checksum": self.bpc or None,
                      "checksum_size": size, "reseed": self.reseed if size else None,
                      "endian": "little" if e == "<" else "big", "cpu_bits": cpu_bits,
                      "header_used_blocks": used}

    def _bitmap_used(self):
        tail = self.total_blocks % 8
        used = popcount(memoryview(self.bitmap)[:self.total_blocks // 8])
        if tail:
            used += bin(self.bitmap[-1] & ((1 << tail) - 1)).count("1")
        if used != self.header_used:
            # partclone itself goes by the bitmap (partclone.btrfs writes such images)
            self.notes.append("the bitmap marks %d blocks used, the header says %d"
                              % (used, self.header_used))
        return used

    def _open_v1(self, h):
        fs = cstr(h[15:30])
        bs, device_size, total, used = struct.unpack_from("<iQQQ", h, 36)
        check_sizes(bs, total, device_size, "partclone header")
        if used > total:
            raise FormatError("partclone header: %d used blocks of %d" % (used, total))
        self.endian = "<"
        self.filesystem, self.block_size, self.total_blocks = fs, bs, total
        self.size = device_size
        self._check_room(self.V1_HEADER + total + 8, "bitmap")
        self.bitmap = read_fully(self.stream, total, "bitmap")
        if read_fully(self.stream, 8, "bitmap") != b"BiTmAgIc":
            raise FormatError("partclone 0001 bitmap does not end in its magic")
        self.data_start = self.V1_HEADER + total + 8
        stray = len(self.bitmap) - self.bitmap.count(0) - self.bitmap.count(1)
        if stray:
            raise FormatError("partclone 0001 bitmap holds %d bytes that are neither 0 nor 1" % stray)
        self.used_blocks = self.bitmap.count(1)
        if self.used_blocks != used:
            self.notes.append("the bitmap marks %d blocks used, the header says %d"
                              % (self.used_blocks, used))
        self.runs = lambda: byte_runs(self.bitmap)
        self.csum_size = self._v1_field_size()
        self.checksum, self.bpc, self.reseed = "crc32", 1, False
        self.digest_kind = "crc32-v1"
        self.extra = {"image_version": "0001", "tool_version": None, "blocks_per_checksum": 1,
                      "checksum_size": self.csum_size, "reseed": False, "endian": "little",
                      "header_used_blocks": used}

    def _v1_field_size(self):
        """0001 images store each CRC in 4 or 8 bytes (the writer's `unsigned long`)."""
        bs, used = self.block_size, self.used_blocks
        if self.stream.size is not None:
            room = self.stream.size - self.data_start
            for size in (4, 8):
                if room == used * (bs + size):
                    return size
        if not used or not hasattr(self.stream, "peek"):
            return 4
        n = min(used, 2)
        for size in (4, 8):
            head = self.stream.peek(n * (bs + size))
            digest = make_digest("crc32-v1", False, field_size=size)
            ok = len(head) == n * (bs + size)
            for i in range(n):
                o = i * (bs + size)
                if not ok or digest(head[o:o + bs]) != head[o + bs:o + bs + size]:
                    ok = False
            if ok:
                return size
        return 4

    def _check_room(self, need, what):
        if self.stream.size is not None and need > self.stream.size:
            raise FormatError("image is truncated: the %s needs %d bytes, the file has %d"
                              % (what, need, self.stream.size))

    def coverage(self):
        if not self.csum_size:
            return "none", ("no data checksums (saved with -a0): the structure was read, "
                            "the data is not verified")
        if self.digest_kind == "crc32-v1":
            return "partial", ("checksums verified, but format 0001 checksums cover the first "
                               "byte of each block only")
        return "full", "checksums verified (%s)" % self.checksum

    def image_length(self):
        """Expected length of the whole image file."""
        groups = -(-self.used_blocks // self.bpc) if self.csum_size else 0
        return self.data_start + self.used_blocks * self.block_size + groups * self.csum_size

    def scan(self, sink, report, progress=None):
        for p in self.header_problems:
            report(p)
        bs, cs, used = self.block_size, self.csum_size, self.used_blocks
        bpc = self.bpc if cs else 0
        digest = make_digest(self.digest_kind, self.reseed, self.endian, cs) if cs else None
        if bpc:
            stride = bpc * bs + cs
            chunk_blocks = bpc * max(1, CHUNK // stride)
        else:
            chunk_blocks = max(1, CHUNK // bs)
        cursor = SpanCursor(self.runs())
        done, offset = 0, self.data_start
        want_data = sink.wants_data
        while done < used:
            nb = min(chunk_blocks, used - done)
            ngroups = -(-nb // bpc) if bpc else 0
            nbytes = nb * bs + ngroups * cs
            buf = self.stream.read(nbytes)
            spans = cursor.take(nb)
            if len(buf) < nbytes:
                self._truncated(sink, report, buf, spans, done, offset, digest)
                return
            if bpc:
                mv = memoryview(buf)
                datas = []
                for g in range(ngroups):
                    o = g * stride
                    dl = min(bpc, nb - g * bpc) * bs
                    d = mv[o:o + dl]
                    if digest(d) != mv[o + dl:o + dl + cs]:
                        self._bad_group(report, spans, g * bpc, dl // bs, offset + o)
                    if want_data:
                        datas.append(d)
                payload = b"".join(datas) if want_data else None
            else:
                payload = buf
            if want_data:
                emit_spans(sink, spans, payload, bs)
            done += nb
            offset += nbytes
            self._progress(progress)
        rest = self.stream.read(1)
        if rest:
            report(Problem("structure", "data continues after the last block", image_offset=offset))

    def _bad_group(self, report, spans, first, count, image_offset):
        bs = self.block_size
        b0, b1 = span_block(spans, first), span_block(spans, first + count - 1)
        report(Problem("checksum", "checksum mismatch", image_offset=image_offset,
                       byte_range=(b0 * bs, min((b1 + 1) * bs, self.size)), block_range=(b0, b1)))

    def _truncated(self, sink, report, buf, spans, done, offset, digest):
        """The image ends early: keep the complete blocks, report the missing ones."""
        bs, cs, bpc = self.block_size, self.csum_size, self.bpc if self.csum_size else 0
        stride = bpc * bs + cs if bpc else bs
        complete = (len(buf) // stride) * (bpc or 1) if bpc else len(buf) // bs
        if bpc:
            groups = len(buf) // stride
            datas = []
            for g in range(groups):
                d = buf[g * stride:g * stride + bpc * bs]
                if digest(d) != buf[g * stride + bpc * bs:(g + 1) * stride]:
                    self._bad_group(report, spans, g * bpc, bpc, offset + g * stride)
                datas.append(d)
            payload = b"".join(datas)
        else:
            payload = buf[:complete * bs]
        if sink.wants_data and complete:
            emit_spans(sink, SpanCursor(spans).take(complete), payload, bs)
        missing = self.used_blocks - done - complete
        first = span_block(spans, complete)
        report(Problem("truncated", "image is truncated: %d used blocks are missing" % missing,
                       image_offset=offset + (complete // (bpc or 1)) * stride if bpc else
                       offset + complete * bs,
                       byte_range=(first * bs, self.size), block_range=(first, self.total_blocks - 1)))


# --- ntfsclone -------------------------------------------------------------
#
# A 56-byte header (10.x; pre-10 images start their data at byte 46), then a
# command stream: 0x00 + s64 count skips clusters, 0x01 + one cluster writes
# the next.  There are no checksums; verify checks structure and counts.
# 10.1 always ends with a record for cluster nr_clusters, the backup boot
# sector, which is shorter than a cluster when the device ends inside it.

class NtfscloneImage(Image):
    """ntfsclone --save-image images (10.0, 10.1 and older)."""

    format = "ntfsclone"
    MAGIC = b"\0ntfsclone-image"

    def __init__(self, stream, container, name):
        Image.__init__(self, stream, container, name)
        h = read_fully(stream, 50, "ntfsclone header")
        major, minor = h[16], h[17]
        if major > 10:
            raise FormatError("ntfsclone image version %d.%d is newer than this reader" % (major, minor))
        cs, device_size, nr_clusters, inuse = struct.unpack_from("<IQqQ", h, 18)
        if major >= 10:
            (offset,) = struct.unpack_from("<I", h, 46)
            if not 50 <= offset <= 1 << 16:
                raise FormatError("ntfsclone header: absurd data offset %d" % offset)
            read_fully(stream, offset - 50, "ntfsclone header")
        else:
            offset = 46
            stream_head = h[46:]            # pre-10 data starts inside what we read
            stream = _Prepend(stream, stream_head)
            self.stream = stream
        if cs & (cs - 1) or not 256 <= cs <= 1 << 26:
            raise FormatError("ntfsclone header: absurd cluster size %d" % cs)
        if nr_clusters < 0:
            raise FormatError("ntfsclone header: negative cluster count")
        check_sizes(cs, nr_clusters, device_size, "ntfsclone header")
        if inuse > nr_clusters + 1:
            raise FormatError("ntfsclone header: %d clusters in use of %d" % (inuse, nr_clusters))
        self.filesystem = "NTFS"
        self.block_size, self.total_blocks, self.used_blocks = cs, nr_clusters, inuse
        self.size = device_size
        self.data_start = offset
        self.version = (major, minor)
        self.extra = {"image_version": "%d.%d" % (major, minor), "tool_version": None}

    def coverage(self):
        return "none", ("ntfsclone images carry no checksums: the record structure was read, "
                        "the data is not verified")

    def scan(self, sink, report, progress=None):
        """Walk the command stream; runs of consecutive clusters are found with
        a strided slice (C speed) instead of one Python step per cluster."""
        cs, nr, size = self.block_size, self.total_blocks, self.size
        rec = cs + 1
        # clusters below `full` always carry cs bytes; the one at the device's end may be short
        full = max(0, -(-size // cs) - 1)
        end_pos = nr + 1 if self.version >= (10, 1) else nr
        buf, p, base = b"", 0, self.data_start     # base: image offset of buf[0]
        pos, nexts, eof, reordered = 0, 0, False, False
        want = sink.wants_data
        record = getattr(sink, "record", None)      # the index pass of mount
        monotonic = getattr(sink, "sequential", False)
        while pos < end_pos or (pos == end_pos and not eof and self.version < (10, 1)):
            if len(buf) - p < rec + 9 and not eof:
                more = self.stream.read(CHUNK)
                eof = not more
                base += p
                buf, p = buf[p:] + more, 0
                self._progress(progress)
                continue
            if p >= len(buf):
                break
            cmd = buf[p]
            if cmd == 1:
                if pos >= full:                     # the last, possibly short, cluster
                    n = size - pos * cs
                    if n <= 0 or pos > nr:
                        report(Problem("structure", "cluster record beyond the device end",
                                       image_offset=base + p, block_range=(pos, pos)))
                        return
                    n = min(n, cs)
                    if len(buf) - p < 1 + n:
                        break
                    if record:
                        record(pos, 1, base + p)
                    if want:
                        sink.write(pos * cs, buf[p + 1:p + 1 + n])
                    p += 1 + n
                    pos += 1
                    nexts += 1
                    continue
                avail = min((len(buf) - p) // rec, full - pos)
                if not avail:
                    break
                strided = buf[p:p + avail * rec:rec]
                k = len(strided) - len(strided.lstrip(b"\x01"))
                if record and k:
                    record(pos, k, base + p)
                if want:
                    payload = b"".join([buf[q + 1:q + rec] for q in range(p, p + k * rec, rec)])
                    sink.write(pos * cs, payload)
                p += k * rec
                pos += k
                nexts += k
            elif cmd == 0:
                if len(buf) - p < 9:
                    break
                (count,) = struct.unpack_from("<q", buf, p + 1)
                if count == 0 or not 0 <= pos + count <= nr:
                    report(Problem("structure", "invalid gap of %d clusters at cluster %d" % (count, pos),
                                   image_offset=base + p))
                    return
                if count < 0:
                    reordered = True
                if count < 0 and monotonic:
                    raise OutputError("this ntfsclone image stores clusters out of order "
                                      "(a metadata image); extract it to a file or device, not a stream")
                pos += count
                p += 9
            else:
                report(Problem("structure", "invalid command byte %#x" % cmd, image_offset=base + p))
                return
        offset = base + p
        if pos < end_pos and not (pos == nr and self.version >= (10, 1) and p >= len(buf) and eof):
            report(Problem("truncated", "image is truncated at cluster %d of %d" % (pos, nr),
                           image_offset=offset, byte_range=(pos * cs, size),
                           block_range=(pos, max(pos, nr - 1))))
            return
        if pos == nr and self.version >= (10, 1):
            report(Problem("structure", "the record of the backup boot sector is missing",
                           image_offset=offset))
        if pos == nr + 1:
            nexts -= 1                      # the backup boot sector is not counted in use
        if nexts != self.used_blocks and not reordered:   # metadata images differ by design
            report(Problem("structure", "image holds %d clusters but the header says %d in use"
                           % (nexts, self.used_blocks)))
        if len(buf) > p or self.stream.read(1):
            report(Problem("structure", "data continues after the last cluster", image_offset=offset))
        self._progress(progress)


class _Prepend(Source):
    """A stream with some bytes put back in front of it."""

    def __init__(self, inner, head):
        self.inner, self.head = inner, head
        self.input_size, self.size = inner.input_size, inner.size

    def read(self, n):
        if self.head:
            data, self.head = self.head[:n], self.head[n:]
            return data + self.inner.read(n - len(data)) if len(data) < n else data
        return self.inner.read(n)

    def consumed(self):
        return self.inner.consumed()

    def close(self):
        self.inner.close()


# --- partimage -------------------------------------------------------------
#
# Every volume file (NAME.000, NAME.001 ...; each may be gzip or bzip2
# compressed as a whole) starts with a 512-byte volume header.  Without those
# headers the volumes join into one logical stream:
#   main header (16384) + sum, MBR backups, 10 empty EXT records,
#   local header (16384) + sum, bitmap, info block (16384) + sum,
#   data: used blocks with a 16-byte CHK record after every 64 KiB of data,
#   tail magic + main tail (16384) holding a 64-bit sum of every byte before it.
# Each part is announced by an ASCII magic.  Header "CRCs" are sums of signed
# bytes; CHK records hold a standard CRC-32.

PI_VOLUME_HEADER = 512
PI_HEADER = 16384
PI_CHECK_EVERY = 65536
PI_CHK = struct.Struct("<4sIQ")
PI_COMPRESSION = {0: None, 1: "gzip", 2: "bzip2", 3: "lzo"}


def signed_byte_sum(data):
    """partimage's header check: the sum of the bytes taken as signed chars."""
    high = len(data) - len(bytes(data).translate(None, _HIGH_BYTES))
    return (sum(data) - 256 * high) & M32


_HIGH_BYTES = bytes(range(128, 256))


class PartimageVolumes(Source):
    """The logical partimage stream: volumes joined without their headers."""

    MAGIC = b"PaRtImAgE-VoLuMe"

    def __init__(self, first, path):
        self.cur = first
        self.path = path
        self.number = 0
        self.sum = 0                 # running unsigned byte sum (for the tail check)
        self.summing = True
        self.input_done = 0
        self.input_size, self.volume_count = self._volumes_size(path)
        self.size = None
        self.missing = None
        head = self._volume_header(first, 0)
        self.ident = head[100:108]
        self.version = cstr(head[32:96])

    @staticmethod
    def _volumes_size(path):
        """(total bytes, number) of the volume files present from this one on."""
        if path == "-":
            return None, 1
        m = re.match(r"^(.*)\.(\d{3})$", path)
        if not m:
            return os.path.getsize(path), 1
        total, i = 0, int(m.group(2))
        while os.path.exists("%s.%03d" % (m.group(1), i)):
            total += os.path.getsize("%s.%03d" % (m.group(1), i))
            i += 1
        return total, i - int(m.group(2))

    def _volume_header(self, stream, number):
        head = stream.read(PI_VOLUME_HEADER)
        if len(head) < PI_VOLUME_HEADER or not head.startswith(self.MAGIC):
            raise FormatError("partimage volume %d has no valid volume header" % number)
        (vol,) = struct.unpack_from("<I", head, 96)
        if vol != number:
            raise FormatError("partimage volume %d says it is volume %d" % (number, vol))
        if number and head[100:108] != self.ident:
            raise FormatError("partimage volume %d belongs to another image set" % number)
        return head

    def _next_volume(self):
        m = re.match(r"^(.*)\.(\d{3})$", self.path) if self.path != "-" else None
        if not m:
            return False
        nxt = "%s.%03d" % (m.group(1), int(m.group(2)) + self.number + 1)
        if not os.path.exists(nxt):
            self.missing = nxt
            return False
        self.input_done += self.cur.consumed()
        self.cur.close()
        self.cur, _container = open_stream(nxt)
        self.number += 1
        self._volume_header(self.cur, self.number)
        return True

    def read(self, n):
        parts, want = [], n
        while want > 0:
            data = self.cur.read(want)
            if data:
                parts.append(data)
                want -= len(data)
            elif not self._next_volume():
                break
        data = b"".join(parts) if len(parts) != 1 else parts[0]
        if self.summing:
            self.sum += sum(data)
        return data

    def consumed(self):
        return self.input_done + self.cur.consumed()

    def failure(self):
        return self.cur.failure()

    def close(self):
        self.cur.close()


class PartimageImage(Image):
    """partimage 0.6 images (format string 0.6.0/0.6.1), single or multi-volume."""

    format = "partimage"
    MAGIC = PartimageVolumes.MAGIC

    def __init__(self, stream, container, name):
        vols = PartimageVolumes(stream, name)
        Image.__init__(self, vols, container, name)
        self.offset = 0                       # offset in the logical stream
        main = self._take(PI_HEADER, "main header")
        self._header_sum(main, "main header")
        (compression, flags) = struct.unpack_from("<II", main, 9540)
        (part_size,) = struct.unpack_from("<Q", main, 9592)
        mbr_count, mbr_size, encrypt = struct.unpack_from("<III", main, 9792)
        if encrypt:
            raise FormatError("encrypted partimage images are not supported")
        if mbr_count > 1024 or (mbr_count and mbr_size != 2048):
            raise FormatError("partimage main header: absurd MBR backup count/size %d/%d"
                              % (mbr_count, mbr_size))
        self._magic(b"MAGIC-BEGIN-MBRBACKUP")
        for i in range(mbr_count):
            mbr = self._take(mbr_size, "MBR backup")
            if signed_byte_sum(mbr[:512]) != struct.unpack_from("<I", mbr, 512)[0]:
                self.header_problems.append(Problem("structure", "MBR backup %d sum mismatch" % i,
                                                    image_offset=self.offset - mbr_size))
        for i in range(10):
            self._magic(b"MAGIC-BEGIN-EXT%03d" % i)
            (n,) = struct.unpack("<I", self._take(4, "extension record"))
            if n > 64 * MiB:
                raise FormatError("partimage extension record %d is absurdly long" % i)
            self._take(n, "extension record")
        self._magic(b"MAGIC-BEGIN-LOCALHEADER")
        local = self._take(PI_HEADER, "local header")
        self._header_sum(local, "local header")
        bs, used, total, bitmap_size = struct.unpack_from("<QQQQ", local, 0)
        check_sizes(bs, total, part_size, "partimage local header")
        if used > total or not (total + 7) // 8 <= bitmap_size <= (total + 7) // 8 + 4096:
            raise FormatError("partimage local header: inconsistent block counts")
        self._magic(b"MAGIC-BEGIN-BITMAP")
        self.bitmap_offset = self.offset
        self.bitmap = self._take(bitmap_size, "bitmap")
        self._magic(b"MAGIC-BEGIN-INFO")
        self._header_sum(self._take(PI_HEADER, "info block"), "info block")
        self._magic(b"MAGIC-BEGIN-DATABLOCKS")
        self.data_start = self.offset
        self.filesystem = cstr(main[0:512])
        self.size = part_size
        self.block_size, self.total_blocks = bs, total
        self.used_blocks = popcount(memoryview(self.bitmap)[:total // 8]) + \
            (bin(self.bitmap[total // 8] & ((1 << (total % 8)) - 1)).count("1") if total % 8 else 0)
        if self.used_blocks != used:
            self.notes.append("the bitmap marks %d blocks used, the header says %d"
                              % (self.used_blocks, used))
        self.checksum = "crc32"
        self.image_compression = PI_COMPRESSION.get(compression, compression)
        self.extra = {"image_version": vols.version, "tool_version": cstr(main[9728:9792]),
                      "blocks_per_checksum": PI_CHECK_EVERY // bs if PI_CHECK_EVERY % bs == 0 else None,
                      "checksum_every_bytes": PI_CHECK_EVERY, "label": cstr(local[40:104]),
                      "original_device": cstr(main[4608:5120]),
                      "header_compression": self.image_compression}
        container["pieces"] = vols.volume_count

    def runs(self):
        return bit_runs_clipped(self.bitmap, self.total_blocks)

    def coverage(self):
        return "full", "checksums verified (CRC-32 every 64 KiB, and the sum over the whole image)"

    def _take(self, n, what):
        data = self.stream.read(n)
        if len(data) < n:
            hint = " (volume %s is missing)" % self.stream.missing if self.stream.missing else ""
            raise FormatError("partimage image is truncated inside the %s%s" % (what, hint))
        self.offset += n
        return data

    def _magic(self, magic):
        got = self._take(len(magic), magic.decode())
        if got != magic:
            raise FormatError("partimage stream: expected %s at logical offset %d"
                              % (magic.decode(), self.offset - len(magic)))

    def _header_sum(self, data, what):
        (stored,) = struct.unpack("<I", self._take(4, what))
        if signed_byte_sum(data) != stored:
            self.header_problems.append(Problem("structure", "partimage %s sum mismatch" % what,
                                                image_offset=self.offset - 4))

    def scan(self, sink, report, progress=None):
        for p in self.header_problems:
            report(p)
        bs = self.block_size
        total_data = self.used_blocks * bs
        nchk = total_data // PI_CHECK_EVERY
        tail_bytes = total_data - nchk * PI_CHECK_EVERY     # after the last CHK, unchecked
        cursor = SpanCursor(self.runs())
        want = sink.wants_data
        stride = PI_CHECK_EVERY + PI_CHK.size
        per_chunk = max(1, CHUNK // stride)
        done_data = 0                 # block data bytes consumed
        pending = b""                 # data of a block cut by a chunk boundary
        chunks = [(first, min(per_chunk, nchk - first)) for first in range(0, nchk, per_chunk)]
        if tail_bytes:
            chunks.append((nchk, 0))
        for first, groups in chunks:
            nbytes = groups * stride if groups else tail_bytes
            image_offset = self.offset
            buf = self.stream.read(nbytes)
            short = len(buf) < nbytes
            if short:                  # keep the whole groups that are there
                groups = len(buf) // stride if groups else 0
                nbytes = groups * stride
                buf = buf[:nbytes]
            self.offset += nbytes
            mv = memoryview(buf)
            datas = []
            for g in range(groups):
                o = g * stride
                d = mv[o:o + PI_CHECK_EVERY]
                magic, crc, _pos = PI_CHK.unpack_from(buf, o + PI_CHECK_EVERY)
                if magic != b"CHK\0" or crc != zlib.crc32(d):
                    self._bad(report, "CHK record mismatch" if magic == b"CHK\0" else
                              "CHK record missing", image_offset + o,
                              done_data + g * PI_CHECK_EVERY)
                if want:
                    datas.append(d)
            if want:
                payload = pending + (b"".join(datas) if groups else buf)
                nblocks = len(payload) // bs
                emit_spans(sink, cursor.take(nblocks), payload, bs)
                pending = payload[nblocks * bs:]
            done_data += groups * PI_CHECK_EVERY if groups or short else tail_bytes
            self._progress(progress)
            if short:
                hint = " (volume %s is missing)" % self.stream.missing if self.stream.missing else ""
                lost = self._select(done_data // bs)    # what follows is lost, to the end
                report(Problem("truncated", "image is truncated%s: %d of %d used blocks present"
                               % (hint, done_data // bs, self.used_blocks),
                               image_offset=self.offset,
                               byte_range=(lost * bs, self.size),
                               block_range=(lost, self.total_blocks - 1)))
                return
        self.stream.summing = False
        tail_magic = self.stream.read(16)
        self.stream.sum += sum(tail_magic)
        tail = self.stream.read(PI_HEADER)
        if tail_magic != b"MAGIC-BEGIN-TAIL" or len(tail) < 12:
            hint = " (volume %s is missing)" % self.stream.missing if self.stream.missing else ""
            report(Problem("truncated", "partimage tail is missing%s" % hint, image_offset=self.offset))
            return
        stored_sum, last_volume = struct.unpack_from("<QI", tail, 0)
        if stored_sum != self.stream.sum & 0xFFFFFFFFFFFFFFFF:
            report(Problem("checksum", "partimage tail sum mismatch (covers the whole image)",
                           image_offset=self.offset + 16))
        if last_volume != self.stream.number:
            report(Problem("structure", "tail names volume %d as the last, but %d was the last read"
                           % (last_volume, self.stream.number)))
        if self.stream.read(1):
            report(Problem("structure", "data continues after the tail"))

    def _bad(self, report, what, image_offset, data_offset):
        bs = self.block_size
        u0 = data_offset // bs
        u1 = (data_offset + PI_CHECK_EVERY - 1) // bs
        b0, b1 = self._select(u0), self._select(u1)
        report(Problem("checksum", what, image_offset=image_offset,
                       byte_range=(b0 * bs, min((b1 + 1) * bs, self.size)), block_range=(b0, b1)))

    def _select(self, k):
        """Block number of the k-th used block (a walk; only used on errors)."""
        for start, count in self.runs():
            if k < count:
                return start + k
            k -= count
        return self.total_blocks - 1


# --- raw -------------------------------------------------------------------

class RawImage(Image):
    """A plain partition or disk image (dd): the stream is the partition."""

    format = "raw"

    def coverage(self):
        codec = self.container.get("compression")
        if codec:
            return "partial", ("no checksums of its own; the %s stream's own checks passed"
                               % codec)
        return "none", "no checksums: nothing verified"

    def __init__(self, stream, container, name):
        Image.__init__(self, stream, container, name)
        self.size = stream.size if not container.get("compression") else None

    def scan(self, sink, report, progress=None):
        offset = 0
        while True:
            data = self.stream.read(CHUNK)
            if not data:
                break
            if sink.wants_data:
                sink.write(offset, data)
            offset += len(data)
            self._progress(progress)
        if self.size is None:
            self.size = offset
        elif offset != self.size:
            report(Problem("truncated", "raw image shrank while being read", image_offset=offset))


# Magic at offset 0 of the decompressed stream -> reader.  Raw is a claim, not
# a fallback: a stream with none of these magics is taken as a raw image only
# when it holds a partition table or a file system, when its name says dd
# (Clonezilla's dd-img, dd-ptcl-img), or when the user says --format raw.
FORMATS = [
    (PartcloneImage.MAGIC, PartcloneImage),
    (NtfscloneImage.MAGIC, NtfscloneImage),
    (PartimageImage.MAGIC, PartimageImage),
]
RAW_NAME_RE = re.compile(r"(^|[.-])dd(-ptcl)?-img([.]|$)")


def detect_image(stream, container, path, fmt=None):
    """The reader for the format at the front of a peekable stream."""
    try:
        head = stream.peek(PROBE_BYTES)
        if fmt == "raw":
            if not head:
                raise FormatError("%s is empty: not a recognized image" % path)
            return RawImage(stream, container, path)
        for magic, reader in FORMATS:
            if head.startswith(magic):
                return reader(stream, container, path)
        if not head:
            raise FormatError("%s is empty: not a recognized image" % path)
        if RAW_NAME_RE.search(os.path.basename(path)) or probe_filesystem(head) or \
                read_partition_table(lambda n, off: head[off:off + n], None):
            return RawImage(stream, container, path)
        raise FormatError("%s is not a recognized image%s" % (path, _unrecognized_hint(head)))
    except BaseException:
        stream.close()
        raise


def _unrecognized_hint(head):
    """What a file with no known magic might be, for the error message."""
    for magic, reader in FORMATS:
        near = sum(a == b for a, b in zip(head[:len(magic)], magic))
        if near >= len(magic) // 2 or (magic.strip(b"\0") in head[:4096]):
            return (": it looks like a %s image with a damaged header (use --format raw if it "
                    "really is a dd image)" % reader.format)
    return (": no partclone, partimage or ntfsclone header, no partition table and no known "
            "file system (use --format raw if it really is a dd image of unknown content)")


def open_image(path, fmt=None):
    """Open IMAGE and return the reader for its format."""
    stream, container = open_stream(path)
    return detect_image(stream, container, path, fmt)


# ===========================================================================
# File systems, partition tables and whole disks
# ===========================================================================
#
# What is inside a partition is told by superblock magic (FS_PROBES: where the
# magic sits, the name blkid gives it, and how to read the file system's own
# size).  A whole disk is told by its table:
#   MBR   LBA 0: boot code, four 16-byte entries at 446 (boot flag, CHS, type,
#         LBA start, sector count, little-endian), 55 AA at 510.  An extended
#         partition (type 05/0F/85) starts a chain of EBRs: each holds the
#         logical partition (start relative to that EBR) and a link to the next
#         EBR (start relative to the extended partition).  Logical partitions
#         are numbered from 5 in chain order, as the kernel does.
#   GPT   a protective MBR (type EE), the header at LBA 1 ("EFI PART", CRC-32 of
#         its header_size bytes with the CRC field zeroed), the entry array it
#         points to (128-byte entries: type GUID, unique GUID, first and last
#         LBA inclusive, attributes, UTF-16LE name; CRC-32 in the header), and
#         the same again backwards at the disk's end (the backup header at the
#         last LBA, its entries before it).  LBA means 512 or 4096 bytes: the
#         header is looked for at byte 512 and at byte 4096.  An MBR that lists
#         other partitions beside the EE entry is a hybrid MBR.
# A table is checked before it is trusted: entries past the disk's end or
# overlapping others are reported and left out of what is served.

PROBE_BYTES = 0x11000            # enough for every magic below (btrfs at 0x10040)


def _u16(b, o, e="<"):
    return struct.unpack_from(e + "H", b, o)[0]


def _u32(b, o, e="<"):
    return struct.unpack_from(e + "I", b, o)[0]


def _u64(b, o, e="<"):
    return struct.unpack_from(e + "Q", b, o)[0]


def _fs_ext(b):
    incompat, ro_compat = _u32(b, 1024 + 96), _u32(b, 1024 + 100)
    compat = _u32(b, 1024 + 92)
    blocks = _u32(b, 1024 + 4) | ((_u32(b, 1024 + 0x150) << 32) if incompat & 0x80 else 0)
    bs = 1024 << min(_u32(b, 1024 + 24), 16)
    if incompat & 0x2C0 or incompat & ~0x1E or ro_compat & ~0x3:   # extents, 64bit, flex_bg ...
        name = "ext4"
    else:
        name = "ext3" if compat & 0x4 else "ext2"
    return name, blocks * bs, None


def _fs_fat(b):
    if b[510:512] != b"\x55\xaa":
        return None
    bps, spc, reserved, nfats = _u16(b, 11), b[13], _u16(b, 14), b[16]
    if bps not in (512, 1024, 2048, 4096) or not spc or spc & (spc - 1) or not reserved \
            or nfats not in (1, 2):
        return None
    total = _u16(b, 19) or _u32(b, 32)
    fat_size = _u16(b, 22) or _u32(b, 36)
    root = (_u16(b, 17) * 32 + bps - 1) // bps
    clusters = (total - reserved - nfats * fat_size - root) // spc if total else 0
    kind = "FAT12" if clusters < 4085 else "FAT16" if clusters < 65525 else "FAT32"
    return "vfat", total * bps, kind


def _fs_swap(b):
    for page in (4096, 8192, 16384, 65536):
        if b[page - 10:page] in (b"SWAPSPACE2", b"SWAP-SPACE") and len(b) >= page:
            last = _u32(b, 1024 + 4)
            return "swap", (last + 1) * page, "page size %d" % page
    return None


def _fs_lvm(b):
    for sector in range(4):
        o = sector * 512
        if b[o:o + 8] == b"LABELONE" and b[o + 24:o + 32] == b"LVM2 001":
            return "LVM2_member", None, None
    return None


def _fs_minix(b):
    magic = _u16(b, 1024 + 16)
    if magic in (0x137F, 0x138F, 0x2468, 0x2478) and _u16(b, 1024 + 2):   # v1, v2 (+ 30-char)
        return "minix", None, "v1" if magic < 0x2000 else "v2"
    if _u16(b, 1024 + 24) == 0x4D5A:
        return "minix", None, "v3"
    return None


def _fs_udf_or_iso(b):
    udf = any(b[o + 1:o + 6] in (b"NSR02", b"NSR03") for o in range(32768, 0x10000, 2048))
    if udf:
        return "udf", None, None
    if b[0x8001:0x8006] == b"CD001":
        return "iso9660", _u32(b, 0x8000 + 80) * _u16(b, 0x8000 + 128), None
    return None


# offset, magic, name or function(head) -> (name, size in bytes or None, detail) or None
FS_PROBES = [
    (0, b"LUKS\xba\xbe", lambda b: ("crypto_LUKS", None, "LUKS%d" % _u16(b, 6, ">"))),
    (3, b"-FVE-FS-", lambda b: ("BitLocker", None, None)),
    (3, b"NTFS    ", lambda b: ("ntfs", _u64(b, 0x28) * _u16(b, 11), None)),
    (3, b"EXFAT   ", lambda b: ("exfat", _u64(b, 72) << b[108], None)),
    (0, b"XFSB", lambda b: ("xfs", _u64(b, 8, ">") * _u32(b, 4, ">"), None)),
    (0x10040, b"_BHRfS_M", lambda b: ("btrfs", _u64(b, 0x10070), None)),
    (1080, b"\x53\xef", _fs_ext),
    (1024, b"\x10\x20\xf5\xf2", lambda b: ("f2fs", None, None)),
    (1024, b"\xe2\xe1\xf5\xe0", lambda b: ("erofs", None, None)),
    (1024, b"H+", lambda b: ("hfsplus", _u32(b, 1068, ">") * _u32(b, 1064, ">"), None)),
    (1024, b"HX", lambda b: ("hfsplus", _u32(b, 1068, ">") * _u32(b, 1064, ">"), None)),
    (32, b"NXSB", lambda b: ("apfs", None, None)),
    (0, b"hsqs", lambda b: ("squashfs", _u64(b, 40), None)),
    (32768, b"JFS1", lambda b: ("jfs", None, None)),
    (None, None, _fs_minix),
    (65588, b"ReIsEr", lambda b: ("reiserfs", None, None)),
    (None, None, _fs_udf_or_iso),
    (None, None, _fs_swap),
    (None, None, _fs_lvm),
    (54, b"FAT", _fs_fat),
    (82, b"FAT32   ", _fs_fat),
    (None, None, _fs_fat),
]


class FsInfo:
    """What a superblock says: name (as blkid names it), size, a detail."""

    def __init__(self, name, size=None, detail=None):
        self.name, self.size, self.detail = name, size, detail

    def __str__(self):
        return self.name + (" (%s)" % self.detail if self.detail else "")


def probe_filesystem(head):
    """The file system whose superblock starts `head` (bytes from the start of
    a partition, PROBE_BYTES of them when there are), or None."""
    for offset, magic, what in FS_PROBES:
        if offset is not None and head[offset:offset + len(magic)] != magic:
            continue
        try:
            found = what(head)
        except (struct.error, IndexError, ValueError):
            found = None
        if found:
            return FsInfo(*found)
    return None


def detect_filesystem(part, errors=None):
    """The file system name inside a readable partition (for mount), or None;
    why reading failed goes to errors (a list) when given."""
    try:
        fs = probe_filesystem(part.read(0, PROBE_BYTES))
    except (OSError, VimageError) as e:     # a damaged chunk, or --verify-reads found one
        if errors is not None:
            why = e.strerror if isinstance(e, OSError) and e.strerror else e
            errors.append("reading its first %s failed: %s" % (human(PROBE_BYTES), why))
        return None
    return fs.name if fs else None


class TableEntry:
    """One partition of a table, in bytes."""

    def __init__(self, number, start, size, ptype, kind="primary", name=None, uuid=None,
                 bootable=False, attrs=0):
        self.number, self.start, self.size, self.type = number, start, size, ptype
        self.kind, self.name, self.uuid, self.bootable, self.attrs = kind, name, uuid, bootable, attrs
        self.problem = None          # why it is not served (outside the disk, overlap)
        self.filesystem = None       # FsInfo, when probed

    def info(self):
        d = {"number": self.number, "start": self.start, "size": self.size, "type": self.type,
             "kind": self.kind, "name": self.name, "uuid": self.uuid, "bootable": self.bootable,
             "filesystem": self.filesystem.name if self.filesystem else None,
             "filesystem_detail": self.filesystem.detail if self.filesystem else None,
             "filesystem_size": self.filesystem.size if self.filesystem else None}
        if self.problem:
            d["problem"] = self.problem
        return d


class PartitionTable:
    """An MBR or GPT partition table read from a disk (see the section comment)."""

    def __init__(self, label, sector_size, disk_size):
        self.label, self.sector_size, self.disk_size = label, sector_size, disk_size
        self.entries, self.problems, self.notes = [], [], []
        self.id = None
        self.hybrid = []             # MBR entries beside the EE one (hybrid MBR)
        self.first_lba = self.last_lba = None

    def usable(self):
        """Entries that hold data and are sound (not the extended container)."""
        return [e for e in self.entries if e.kind != "extended" and not e.problem]

    def info(self):
        d = {"label": self.label, "sector_size": self.sector_size, "disk_size": self.disk_size,
             "id": self.id, "partitions": [e.info() for e in self.entries]}
        if self.label == "gpt":
            d["first_lba"], d["last_lba"] = self.first_lba, self.last_lba
        if self.hybrid:
            d["hybrid_mbr"] = [{"slot": n, "type": t, "start": s, "size": z}
                               for n, t, s, z in self.hybrid]
        if self.problems:
            d["problems"] = list(self.problems)
        return d

    def check_bounds(self):
        """Report (and stop serving) entries outside the disk or overlapping."""
        placed = []
        for e in self.entries:
            if e.size <= 0:
                e.problem = "empty"
            elif self.disk_size is not None and e.start + e.size > self.disk_size:
                e.problem = "ends at byte %d, past the disk's end (%d)" % (e.start + e.size,
                                                                         self.disk_size)
            if e.problem:
                self.problems.append("partition %d %s" % (e.number, e.problem))
                continue
            if e.kind == "extended":
                continue
            for other in placed:
                if e.start < other.start + other.size and other.start < e.start + e.size:
                    e.problem = "overlaps partition %d" % other.number
                    self.problems.append("partition %d %s" % (e.number, e.problem))
                    break
            else:
                placed.append(e)


MBR_EXTENDED = (0x05, 0x0F, 0x85)


def _mbr_entries(sector):
    """The four MBR slots: (slot, boot flag, type, LBA start, sectors)."""
    return [(i + 1, sector[446 + 16 * i], sector[446 + 16 * i + 4])
            + struct.unpack_from("<II", sector, 446 + 16 * i + 8) for i in range(4)]


def _looks_like_mbr(sector):
    """55 AA and four sane slots, and not a FAT/NTFS boot sector (which ends
    in 55 AA too)."""
    if len(sector) < 512 or sector[510:512] != b"\x55\xaa":
        return False
    if sector[3:11] in (b"NTFS    ", b"EXFAT   ") or _fs_fat(sector):
        return False
    slots = _mbr_entries(sector)
    if any(flag not in (0, 0x80) for _n, flag, _t, _s, _c in slots):
        return False
    return any(t and c for _n, _f, t, _s, c in slots)


def _guid(raw):
    """A GUID as text: the first three fields are little-endian."""
    a, b, c = struct.unpack_from("<IHH", raw)
    return "%08X-%04X-%04X-%s-%s" % (a, b, c, raw[8:10].hex().upper(), raw[10:16].hex().upper())


GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
GPT_TYPES = {       # a few well-known type GUIDs, for info
    "C12A7328-F81F-11D2-BA4B-00A0C93EC93B": "EFI System",
    "21686148-6449-6E6F-744E-656564454649": "BIOS boot",
    "0FC63DAF-8483-4772-8E79-3D69D8477DE4": "Linux filesystem",
    "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F": "Linux swap",
    "E6D6D379-F507-44C2-A23C-238F2A3DF928": "Linux LVM",
    "A19D880F-05FC-4D3B-A006-743F0F84911E": "Linux RAID",
    "CA7D7CCB-63ED-4C53-861C-1742536059CC": "Linux LUKS",
    "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709": "Linux root (x86-64)",
    "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7": "Microsoft basic data",
    "E3C9E316-0B5C-4DB8-817D-F92DF00215AE": "Microsoft reserved",
    "DE94BBA4-06D1-4D40-A16A-BFD50179D6AC": "Windows recovery",
    "48465300-0000-11AA-AA11-00306543ECAC": "Apple HFS+",
}


def _gpt_header(raw, sector_size, where):
    """Parse and check one GPT header; (fields dict, problems)."""
    (sig, _rev, hsize, hcrc, _res, my_lba, alt_lba, first, last, disk_guid, entries_lba,
     count, esize, ecrc) = GPT_HEADER.unpack_from(raw)
    problems = []
    if sig != b"EFI PART":
        return None, ["no GPT header at %s" % where]
    if not 92 <= hsize <= sector_size:
        return None, ["GPT header at %s has an absurd size %d" % (where, hsize)]
    body = bytearray(raw[:hsize])
    body[16:20] = b"\0\0\0\0"
    if zlib.crc32(body) != hcrc:
        problems.append("GPT header at %s: CRC mismatch" % where)
    if not 0 < count <= 65536 or esize < 128 or esize % 8 or esize > 4096:
        return None, problems + ["GPT header at %s: absurd entry count/size %d/%d"
                                 % (where, count, esize)]
    return {"my_lba": my_lba, "alt_lba": alt_lba, "first": first, "last": last,
            "guid": _guid(disk_guid), "entries_lba": entries_lba, "count": count,
            "esize": esize, "ecrc": ecrc}, problems


def read_partition_table(pread, disk_size):
    """The partition table of a disk, or None.  pread(n, offset) returns the
    disk's bytes (short past the end); disk_size may be None (a stream)."""
    head = pread(8192, 0)
    if len(head) < 512:
        return None
    mbr = head[:512]
    gpt_at = [ss for ss in (512, 4096) if head[ss:ss + 8] == b"EFI PART"]
    if gpt_at and (mbr[510:512] == b"\x55\xaa" or not mbr.strip(b"\0")):
        return _read_gpt(pread, head, gpt_at[0], disk_size)
    if not _looks_like_mbr(mbr):
        # a GPT whose primary header is gone: its backup at the last LBA
        if disk_size and mbr[510:512] == b"\x55\xaa" and \
                any(t == 0xEE for _n, _f, t, _s, _c in _mbr_entries(mbr)):
            for ss in (512, 4096):
                if pread(8, disk_size - ss) == b"EFI PART":
                    return _read_gpt(pread, head, ss, disk_size)
        return None
    slots = _mbr_entries(mbr)
    if any(t == 0xEE for _n, _f, t, _s, _c in slots):
        return _read_gpt(pread, head, 512, disk_size)
    return _read_mbr(pread, mbr, slots, disk_size)


def _read_mbr(pread, mbr, slots, disk_size):
    ss = _mbr_sector_size(pread, slots, disk_size)
    table = PartitionTable("dos", ss, disk_size)
    table.id = "0x%08x" % _u32(mbr, 440)
    for n, flag, ptype, start, count in slots:
        if not ptype or not count:
            continue
        kind = "extended" if ptype in MBR_EXTENDED else "primary"
        table.entries.append(TableEntry(n, start * ss, count * ss, "%x" % ptype, kind,
                                        bootable=flag == 0x80))
    for ext in [e for e in table.entries if e.kind == "extended"][:1]:
        _read_ebr_chain(pread, table, ext)
    table.check_bounds()
    return table


def _mbr_sector_size(pread, slots, disk_size):
    """512 unless the partitions only make sense in 4096-byte sectors (a 4Kn
    disk): their file systems are found there and not at 512-byte offsets."""
    def hits(ss):
        found = 0
        for _n, _f, ptype, start, count in slots:
            if ptype and count and ptype not in MBR_EXTENDED:
                if disk_size is not None and (start + count) * ss > disk_size:
                    return -1
                found += probe_filesystem(pread(PROBE_BYTES, start * ss)) is not None
        return found
    small = hits(512)
    return 4096 if small <= 0 and hits(4096) > 0 else 512


def _read_ebr_chain(pread, table, ext):
    """The logical partitions of an extended partition, numbered from 5."""
    ss, seen, number = table.sector_size, set(), 5
    ebr = ext.start
    while ebr is not None:
        if ebr in seen or len(seen) >= 256:
            table.problems.append("the EBR chain loops or is absurdly long at byte %d" % ebr)
            return
        seen.add(ebr)
        if not ext.start <= ebr < ext.start + ext.size:
            table.problems.append("an EBR link points outside the extended partition "
                                  "(byte %d)" % ebr)
            return
        sector = pread(512, ebr)
        if len(sector) < 512 or sector[510:512] != b"\x55\xaa":
            table.problems.append("no EBR at byte %d (the chain is broken)" % ebr)
            return
        slots = _mbr_entries(sector)
        nxt = None
        for slot, flag, ptype, start, count in slots[:2]:
            if not ptype or not count:
                continue
            if ptype in MBR_EXTENDED:
                nxt = ext.start + start * ss
            else:
                e = TableEntry(number, ebr + start * ss, count * ss, "%x" % ptype, "logical",
                               bootable=flag == 0x80)
                e.ebr = ebr
                if not (ext.start <= e.start and e.start + e.size <= ext.start + ext.size):
                    e.problem = "lies outside its extended partition"
                table.entries.append(e)
                number += 1
        ebr = nxt


def _read_gpt(pread, head, ss, disk_size):
    table = PartitionTable("gpt", ss, disk_size)
    primary, problems = _gpt_header(pread(ss, ss), ss, "LBA 1")
    table.problems += problems
    backup = None
    alt = primary["alt_lba"] if primary else (disk_size // ss - 1 if disk_size else None)
    if alt is not None and disk_size is not None and (alt + 1) * ss <= disk_size:
        raw = pread(ss, alt * ss)
        if len(raw) == ss:
            backup, problems = _gpt_header(raw, ss, "LBA %d (backup)" % alt)
            table.problems += problems
    elif primary and disk_size is not None:
        table.problems.append("the backup GPT header's LBA %d lies past the disk's end" % alt)
    if disk_size is None and primary:
        table.notes.append("backup GPT not checked: the disk's size is unknown until read")
    chosen, entries, good = None, None, False
    for hdr, where in ((primary, "primary"), (backup, "backup")):
        if hdr is None:
            continue
        raw = pread(hdr["count"] * hdr["esize"], hdr["entries_lba"] * ss)
        if len(raw) < hdr["count"] * hdr["esize"]:
            table.problems.append("the %s GPT entry array is cut off by the disk's end" % where)
            continue
        ok = zlib.crc32(raw) == hdr["ecrc"]
        if not ok:
            table.problems.append("the %s GPT entry array does not match its CRC" % where)
        if chosen is None or (ok and not good):
            if chosen is not None:
                table.notes.append("partitions read from the backup GPT")
            chosen, entries, good = hdr, raw, ok
    if primary and backup:
        for key in ("guid", "count", "esize", "ecrc", "first", "last"):
            if primary[key] != backup[key]:
                table.problems.append("the primary and backup GPT headers differ in %s" % key)
                break
    if chosen is None:
        table.problems.append("no readable GPT header")
        return table
    table.id, table.first_lba, table.last_lba = chosen["guid"], chosen["first"], chosen["last"]
    if disk_size is None and chosen is primary and primary["alt_lba"]:
        table.disk_size = (primary["alt_lba"] + 1) * ss      # what the GPT says
        table.notes.append("disk size taken from the GPT (the backup header's place)")
    for i in range(chosen["count"]):
        raw = entries[i * chosen["esize"]:(i + 1) * chosen["esize"]]
        if not raw[:16].strip(b"\0"):
            continue
        first, last, attrs = struct.unpack_from("<QQQ", raw, 32)
        name = raw[56:128].decode("utf-16-le", "replace").split("\0", 1)[0]
        e = TableEntry(i + 1, first * ss, (last - first + 1) * ss if last >= first else 0,
                       _guid(raw[:16]), name=name, uuid=_guid(raw[16:32]), attrs=attrs)
        if first < chosen["first"] or last > chosen["last"]:
            e.problem = "lies outside the GPT's usable LBAs %d-%d" % (chosen["first"], chosen["last"])
        table.entries.append(e)
    for n, _flag, ptype, start, count in _mbr_entries(head[:512]):
        if ptype and ptype != 0xEE and count:
            table.hybrid.append((n, "%x" % ptype, start * ss, count * ss))
    table.check_bounds()
    return table


# ===========================================================================
# Backups: what an input holds
# ===========================================================================
#
# Whatever the user names opens to a Backup: a list of members, each a
# partition, a disk or a volume that becomes one virtual file.  A member can
#   scan(sink, report, progress)   hand its bytes over in order (verify, extract)
#   reader(ctx)                    random access (mount, the Python API)
#   info(), describe()
# A single partition image is a backup of one partition; a raw disk image is
# its disk plus a slice per partition of its table; a Clonezilla directory is
# its disks and partition images; a sparsebak/Wyng archive one volume as of a
# session.  Every command serves that list once.

class OpenContext:
    """Options and shared state while members are opened for random access:
    readers several members share (a disk and its slices) are made once."""

    def __init__(self, index_bits=DEFAULT_INDEX_BITS, verify_reads=False, quiet=False,
                 progress=None, **copts):
        self.index_bits, self.verify_reads, self.quiet = index_bits, verify_reads, quiet
        self.copts = copts
        self.progress = progress
        self.shared = {}
        self.lock = threading.Lock()
        self.closers = []

    def share(self, key, make):
        with self.lock:
            slot = self.shared.get(key)
            if slot is None:
                slot = self.shared[key] = [threading.Lock(), None]
        with slot[0]:                       # made once, even by threads side by side
            if slot[1] is None:
                slot[1] = make()
        return slot[1]

    def open_all(self, members):
        """Every member's reader; the partition images' passes (decompression
        and indexing) run side by side, one per core, with one progress display."""
        images = [m for m in members if isinstance(m, ImageMember)]
        if len(images) > 1 and self.progress is None:
            shared = SharedProgress(sum(m.input_size() for m in images), "index", self.quiet)
            self.copts["progress"] = lambda total, desc: shared.part()
        else:
            shared = None
        try:
            workers = min(len(images), os.cpu_count() or 1, 4)
            if workers > 1:
                from concurrent.futures import ThreadPoolExecutor
                with ThreadPoolExecutor(workers) as pool:
                    for future in [pool.submit(m.open, self) for m in images]:
                        future.result()
            return OrderedDict((m.name, m.open(self)) for m in members)
        finally:
            if shared is not None:
                shared.close()
                self.copts.pop("progress", None)

    def close(self, remove=True):
        while self.closers:
            try:
                self.closers.pop()(remove)
            except (OSError, VimageError):
                pass


class Member:
    """A partition, disk or volume of a backup (see the section comment)."""

    kind = "partition"
    number = None
    start = None                 # byte offset in its disk, when it lies in one
    filesystem = None
    has_checksums = False

    def __init__(self, name, size=None):
        self.name, self.size = name, size

    def paths(self):
        return []

    def info(self):
        return {"name": self.name, "kind": self.kind, "number": self.number, "start": self.start,
                "size": self.size, "filesystem": self.filesystem}

    def describe(self):
        return "%s %s, %s" % (self.kind, self.name, human(self.size))

    def scan(self, sink, report, progress=None):
        raise NotImplementedError

    def reader(self, ctx):
        raise NotImplementedError

    def open(self, ctx):
        """The member's reader, made once for everything that reads it (a disk
        and its own virtual file share a partition's reader)."""
        return ctx.share(("member", id(self)), lambda: self.reader(ctx))

    def input_size(self):
        """Bytes a scan reads from disk (for progress over several members)."""
        return sum(os.path.getsize(p) for p in self.paths())

    def extents(self, ctx):
        """(offset, length) runs of used data, in order (default: all of it)."""
        size = self.size if self.size is not None else self.open(ctx).size
        return iter([(0, size)] if size else [])


class ImageMember(Member):
    """A partition image file (partclone, ntfsclone, partimage or raw),
    compressed or split or not."""

    def __init__(self, path, name=None, image=None, fmt=None):
        self.path, self.fmt = path, fmt
        self._image = image
        if image is None:
            image = self._open()
            try:
                self._set(image)
            finally:
                image.stream.close()
        else:
            self._set(image)
        Member.__init__(self, name or virtual_name(path), self.size)

    def _set(self, image):
        self.header = image.info()
        self.size, self.filesystem = image.size, image.filesystem
        if image.format == "raw" and hasattr(image.stream, "peek"):
            fs = probe_filesystem(image.stream.peek(PROBE_BYTES))
            self.filesystem = fs.name if fs else None
        self.format, self.checksum = image.format, image.checksum
        self.has_checksums = image.checksum != "none"
        self.notes = list(image.notes)
        self.header_problems = list(image.header_problems)
        self.one_line = describe(image)

    def _open(self):
        stream, container = open_stream(self.path)
        return detect_image(stream, container, self.path, self.fmt)

    def open_image(self):
        """A reader at the start of the data (the one detection opened, once)."""
        image, self._image = self._image, None
        return image if image is not None else self._open()

    def paths(self):
        if self.path == "-":
            return []
        return split_pieces(self.path) + volume_paths(self.path)[1:]

    def info(self):
        d = dict(self.header)
        d.update({"name": self.name, "kind": self.kind, "image": os.path.basename(self.path)})
        return d

    def describe(self):
        return self.one_line

    def scan(self, sink, report, progress=None):
        image = self.open_image()
        try:
            image.scan_all(sink, report, progress)
            if self.size is None:
                self.size = image.size
        finally:
            image.stream.close()
        return image

    def reader(self, ctx):
        image, part, close = open_partition(self.path, ctx.index_bits, ctx.verify_reads,
                                            ctx.quiet, fmt=self.fmt, **ctx.copts)
        ctx.closers.append(close)
        self.size = part.size
        return part

    def extents(self, ctx):
        part = self.open(ctx)
        if isinstance(part, BlockPartition):
            bs, size = part.bs, part.size
            runs = ((s * bs, n * bs) for s, n in part.image.runs())
        elif isinstance(part, NtfsPartition):
            bs, size = part.cs, part.size
            runs = ((s * bs, n * bs) for s, n in zip(part.index.starts, part.index.counts))
        else:
            return Member.extents(self, ctx)
        return merge_extents(runs, size)


def merge_extents(runs, size):
    """Sorted (offset, length) runs joined where they touch, cut at size."""
    cur_start = cur_end = None
    for start, length in runs:
        end = min(start + length, size)
        if end <= start:
            continue
        if cur_end is not None and start <= cur_end:
            cur_end = max(cur_end, end)
            continue
        if cur_end is not None:
            yield cur_start, cur_end - cur_start
        cur_start, cur_end = start, end
    if cur_end is not None:
        yield cur_start, cur_end - cur_start


class SliceMember(Member):
    """A partition inside a disk member (a raw disk image's partition table)."""

    def __init__(self, disk, entry, name):
        Member.__init__(self, name, entry.size)
        self.disk, self.entry = disk, entry
        self.number, self.start = entry.number, entry.start
        self.filesystem = entry.filesystem.name if entry.filesystem else None

    def paths(self):
        return self.disk.paths()

    def info(self):
        d = self.entry.info()
        d["name"] = self.name
        return d

    def describe(self):
        e = self.entry
        return "partition %d: %s at byte %d, %s%s%s" % (
            e.number, human(e.size), e.start, type_name(self.disk.table, e.type),
            ", " + str(e.filesystem) if e.filesystem else "",
            ', "%s"' % e.name if e.name else "")

    def scan(self, sink, report, progress=None):
        self.disk.scan(SliceSink(sink, self.start, self.size), report, progress)

    def reader(self, ctx):
        return SliceReader(self.disk.open(ctx), self.start, self.size)

    def input_size(self):
        return self.disk.input_size()


def type_name(table, ptype):
    if table is not None and table.label == "gpt":
        return GPT_TYPES.get(ptype, ptype)
    return "type %s" % ptype


class SliceSink:
    """Passes on the bytes of [start, start+size) of what is written to it,
    shifted to 0 (a partition cut out of a disk's scan)."""

    def __init__(self, sink, start, size):
        self.sink, self.start, self.end = sink, start, start + size
        self.wants_data = sink.wants_data
        self.sequential = getattr(sink, "sequential", False)

    def write(self, offset, data):
        a, b = max(offset, self.start), min(offset + len(data), self.end)
        if b > a:
            self.sink.write(a - self.start, memoryview(data)[a - offset:b - offset])

    def finish(self, size):
        self.sink.finish(size)


class ShiftSink:
    """Writes what it is given `base` bytes further on (a partition placed in a disk)."""

    def __init__(self, sink, base, size=None):
        self.sink, self.base, self.size = sink, base, size
        self.wants_data = sink.wants_data
        self.sequential = getattr(sink, "sequential", False)

    def write(self, offset, data):
        if self.size is not None and offset + len(data) > self.size:
            data = memoryview(data)[:max(0, self.size - offset)]
        if len(data):
            self.sink.write(self.base + offset, data)


class SliceReader(ReadIntoMixin):
    """Random access to [start, start+size) of another reader."""

    def __init__(self, parent, start, size):
        self.parent, self.start, self.size = parent, start, size
        self.how = getattr(parent, "how", "")

    def readinto(self, offset, out):
        self.parent.readinto(self.start + offset, out)


class Backup:
    """What an input holds: members (disks first), and its own checks."""

    format = None
    noun = "partitions"          # what verify counts

    def __init__(self, path, members):
        self.path, self.members = path, members
        self.checked, self.unchecked, self.notes = [], [], []

    def disks(self):
        return [m for m in self.members if m.kind == "disk"]

    def partitions(self):
        return [m for m in self.members if m.kind != "disk"]

    def default_member(self):
        """What extract writes when no --partition is named."""
        disks = self.disks()
        if len(disks) == 1:
            return disks[0]
        if len(self.members) == 1:
            return self.members[0]
        raise VimageError("%s holds %s; name one with --partition (%s)"
                          % (self.path, "several disks" if disks else "several partitions",
                             ", ".join(m.name for m in self.members)))

    def member(self, which):
        """A member by name or partition number."""
        for m in self.members:
            if which in (m.name, str(m.number)) or (m.number is not None and
                                                     which == "part%d" % m.number):
                return m
        raise VimageError("%s has no partition %s (it has: %s)"
                          % (self.path, which, ", ".join(
                              m.name if m.number is None else "%s (%d)" % (m.name, m.number)
                              for m in self.members)))

    def info(self):
        raise NotImplementedError

    def verify_members(self):
        """The members whose scans cover everything (a disk's slices need no scan)."""
        return self.members

    def checks(self, report_to, say):
        """Checks of the backup as a whole, after the scans (sums files, tables);
        report_to(member name or None) gives the report function."""

    def taps(self):
        """{file: FileTap} for what checks() will want of whole files: taken
        from the reads the scans make anyway, so each file is read once."""
        return {}

    def paths(self):
        seen = []
        for m in self.members:
            for p in m.paths():
                if p not in seen:
                    seen.append(p)
        return seen

    def close(self):
        for m in self.members:
            image = getattr(m, "_image", None)
            if image is not None:
                image.stream.close()
                m._image = None


SIDECAR_EXTS = ("md5", "sha1", "sha224", "sha256", "sha384", "sha512", "b2", "b3")
SUMS_LIST_RE = re.compile(r"(?i)^(md5|sha1|sha224|sha256|sha384|sha512|b2|b3)sums?(\.txt)?$")


class SidecarChecks:
    """What people keep beside a plain image file, checked by verify from the
    same read as the image: sidecars (disk.img.sha256, disk.img.md5sum ...),
    lists in the same folder that name it (SHA256SUMS, MD5SUMS, GNU or BSD
    lines; a split set piece by piece), and par2 sets (disk.img.par2,
    disk.img.vol*.par2).  The hashes are of the files as stored."""

    def _sidecars(self):
        """[(SumEntry, list file name, image path)] naming the image's files."""
        if getattr(self, "_sums", None) is not None:
            return self._sums
        self._sums = []
        files = {os.path.basename(p): p for p in self.paths()}
        if not files:
            return self._sums
        folder = os.path.dirname(next(iter(files.values()))) or "."
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            return self._sums
        for n in names:
            sidecar = any(n.lower() in ("%s.%s" % (f.lower(), e), "%s.%ssum" % (f.lower(), e))
                          for f in files for e in SIDECAR_EXTS)
            if not (sidecar or SUMS_LIST_RE.match(n)):
                continue
            try:
                entries, _bad = parse_sums(os.path.join(folder, n))
            except FormatError as e:
                self.unchecked.append(str(e))
                continue
            for e in entries:
                if e.name is not None and os.path.basename(e.name) in files:
                    self._sums.append((e, n, files[os.path.basename(e.name)]))
        return self._sums

    def taps(self):
        wants = {}
        for e, _n, path in self._sidecars():
            wants.setdefault(path, set()).add(e.algo)
        taps = {}
        for path in self.paths():
            par2 = None
            if par2_files(path):
                try:
                    par2 = Par2Check(Par2Set.open(path), os.path.basename(path))
                except FormatError as e:
                    self.unchecked.append("par2 set of %s: %s" % (os.path.basename(path), e))
            if par2 is not None or path in wants:
                taps[path] = FileTap(path, wants.get(path, ()), par2)
        return taps

    def checks(self, report_to, say):
        report = report_to(None)
        whole = set()                    # files vouched for as a whole
        for e, listed_in, path in self._sidecars():
            got = file_digest(path, e.algo)
            name = os.path.basename(path)
            if got is None:
                self.unchecked.append("%s of %s in %s (%s)" % (
                    e.algo.upper(), name, listed_in, "pip install blake3" if e.algo == "blake3"
                    else "cannot be computed here"))
            elif got != e.hexdigest:
                report(Problem("checksum", "%s does not match its %s in %s (line %d)"
                               % (name, e.algo.upper(), listed_in, e.line)))
            else:
                self.checked.append("%s of %s matches %s" % (e.algo.upper(), name, listed_in))
                whole.add(path)
        for path in self.paths():
            tap = FILE_TAPS.get(os.path.realpath(path))
            result = tap.par2_result() if tap is not None and tap.par2 is not None else None
            if result is None:
                continue
            name, par2 = os.path.basename(path), os.path.basename(par2_files(path)[0])
            for i, start, end in result.damaged or ():
                report(Problem("checksum", "par2: slice %d of %s is damaged" % (i, name),
                               byte_range=(start, end), unit="file"))
            if not result.length_ok:
                report(Problem("truncated" if result.seen < result.length else "structure",
                               "par2: %s holds %d bytes, the set says %d"
                               % (name, result.seen, result.length)))
            if result.ok:
                self.checked.append("par2: all %d slices of %s intact (%d recovery slices in "
                                    "%s)" % (result.slices, name, result.recovery_slices, par2))
                whole.add(path)
            elif result.repairable:
                self.notes.append("par2: %d damaged slice(s) of %s, %d recovery slices present: "
                                  "repairable with 'par2 r %s'"
                                  % (len(result.damaged or ()), name, result.recovery_slices,
                                     par2_files(path)[0]))
            else:
                self.notes.append("par2: %d damaged slice(s) of %s but only %d recovery slices: "
                                  "par2 cannot repair it" % (len(result.damaged or ()), name,
                                                             result.recovery_slices))
        self.covers_all = bool(whole) and whole >= set(self.paths())


class ImageBackup(SidecarChecks, Backup):
    """One partition image (or a raw image of a bare file system)."""

    def __init__(self, member):
        Backup.__init__(self, member.path, [member])
        self.format = member.format

    def info(self):
        return self.members[0].header


class RawDiskBackup(SidecarChecks, Backup):
    """A raw (dd) image of a whole disk: the disk, and a slice per partition."""

    format = "raw"

    def __init__(self, disk, table):
        self.disk, self.table = disk, table
        disk.kind, disk.table = "disk", table
        members = [disk]
        base = disk.name
        for e in table.usable():
            members.append(SliceMember(disk, e, "%s-part%d" % (base, e.number)))
        Backup.__init__(self, disk.path, members)

    def info(self):
        d = dict(self.disk.header)
        d.update({"table": self.table.label, "sector_size": self.table.sector_size,
                  "disk_size": self.table.disk_size if self.disk.size is None else self.disk.size,
                  "disk_id": self.table.id,
                  "partitions": [e.info() for e in self.table.entries]})
        for key in ("hybrid_mbr", "problems", "first_lba", "last_lba"):
            value = self.table.info().get(key)
            if value is not None:
                d[key] = value
        if self.table.notes:
            d["table_notes"] = list(self.table.notes)
        return d

    def verify_members(self):
        return [self.disk]

    def describe(self):
        t, d = self.table, self.disk
        size = d.size if d.size is not None else t.disk_size
        parts = ["raw disk image, %s partition table, %d-byte sectors, %s" % (
            "GPT" if t.label == "gpt" else "MBR", t.sector_size, human(size)),
            "%d partitions" % len(t.usable())]
        comp = d.header.get("compression")
        if comp:
            parts.append("%s-compressed" % comp)
        if d.header.get("pieces", 1) > 1:
            parts.append("%d pieces" % d.header["pieces"])
        if t.problems:
            parts.append("%d table problems" % len(t.problems))
        return ", ".join(parts)


def disk_pread(member):
    """pread(n, offset) over a raw image's bytes for reading its table: the
    files themselves when plain; a decoder run forward when compressed (EBRs
    and superblocks lie at increasing offsets); only the already peeked head
    for stdin."""
    if member.path == "-":
        head = member._image.stream.peek(PROBE_BYTES)
        return lambda n, off: head[off:off + n], (lambda: None)
    files = FileSource(split_pieces(member.path))
    if not member.header.get("compression"):
        return files.pread, files.close
    files.close()
    return ForwardReader(member.path).pread, lambda: None


class ForwardReader:
    """pread over a compressed stream by decoding forward (restarting for an
    offset behind it), within a budget: table reading and file system probes
    of a compressed disk must not decode it all."""

    BUDGET = 1 << 30

    def __init__(self, path):
        self.path = path
        self.stream = None
        self.pos = 0
        self.decoded = 0
        self.head = b""

    def pread(self, n, offset):
        if offset + n <= len(self.head):
            return self.head[offset:offset + n]
        if self.stream is None or offset < self.pos:
            if self.stream is not None:
                self.stream.close()
            self.stream, _c = open_stream(self.path)
            self.pos = 0
            if not self.head:
                self.head = self.stream.read(MiB)
                self.pos = len(self.head)
                if offset + n <= len(self.head):
                    return self.head[offset:offset + n]
            else:
                self.stream.read(len(self.head))
                self.pos = len(self.head)
        while self.pos < offset:
            if self.decoded > self.BUDGET:
                return b""
            skip = self.stream.read(min(CHUNK, offset - self.pos))
            if not skip:
                return b""
            self.pos += len(skip)
            self.decoded += len(skip)
        data = self.stream.read(n)
        self.pos += len(data)
        return data


def open_backup(path, fmt=None, **options):
    """What the input holds: a Backup (see the section comment)."""
    if path != "-" and os.path.isdir(path):
        for detect in BACKUP_SETS:
            backup = detect(path, **options)
            if backup is not None:
                return backup
        raise FormatError("%s is a directory that holds no backup vimage knows (a Clonezilla "
                          "image directory or a sparsebak/Wyng archive)" % path)
    stream, container = open_stream(path)
    image = detect_image(stream, container, path, fmt)
    member = ImageMember(path, image=image, fmt=fmt)
    if isinstance(image, RawImage):
        return raw_backup(member)
    return ImageBackup(member)


def raw_backup(member):
    """A raw image: a disk with a partition table, or a bare file system."""
    pread, close = disk_pread(member)
    try:
        table = read_partition_table(pread, member.size)
        if table is None:
            fs = probe_filesystem(pread(PROBE_BYTES, 0))
            if fs is not None:
                member.filesystem = fs.name
                member.header.update({"filesystem": fs.name, "filesystem_detail": fs.detail,
                                      "filesystem_size": fs.size})
                if member.size is None and fs.size:
                    member.header["size_from_filesystem"] = fs.size
            return ImageBackup(member)
        for e in table.entries:
            if e.kind != "extended" and not e.problem:
                e.filesystem = probe_filesystem(pread(PROBE_BYTES, e.start))
        return RawDiskBackup(member, table)
    finally:
        close()


BACKUP_SETS = []        # directory detectors, filled in by the backup-set sections below


# ===========================================================================
# Backup sets: Clonezilla and Rescuezilla image directories
# ===========================================================================
#
# An image directory holds, for each saved disk D and partition P:
#   disk, parts            the names of the disks (savedisk only) and partitions
#   D-pt.sf                `sfdisk -d` dump: label, sector size, every partition
#   D-pt.parted            `parted unit s print`: the only place with the disk size
#   D-mbr                  LBA 0 (boot code, disk signature, table)
#   D-hidden-data-after-mbr  LBA 1 up to the first partition (MBR disks, -j2)
#   D-gpt-1st, D-gpt-2nd   LBA 0-33, and the LAST 32 sectors (LBA N-33, the first
#                          sector of the backup entries, is not saved: it equals
#                          LBA 2); D-gpt.gdisk the same as `sgdisk -b`
#   P-ebr                  the first EBR of an extended partition
#   swappt-P.info          UUID and LABEL of a swap partition (re-made by mkswap)
#   P.<fs>-ptcl-img.<codec>[.aa ...], P.ntfs-img.aa, P.aa (partimage),
#   P.dd-img.aa            the partition images, split into pieces
#   MD5SUMS SHA1SUMS B2SUMS B3SUMS   `<hex>  <name>` of every top-level file
# A restore (`ocs-sr restoredisk`) onto a zeroed disk writes the table from
# D-pt.sf with sfdisk (EBRs included: each logical partition's EBR one grain,
# 1 MiB, before it, the first at the extended partition's start, with CHS
# fields of the disk's geometry), the boot code of D-mbr over LBA 0 and of
# P-ebr over the first EBR, the hidden data at LBA 1 (-j2), every image at
# its partition, a fresh swap header on swap partitions, zeros elsewhere:
# that is the virtual disk, assembled on the fly.

CZ_COMPRESSION = ("gz", "bz2", "xz", "lzma", "lzip", "lz", "lzo", "lz4", "lrz", "zst", "zstd",
                  "uncomp")
CZ_IMAGE_RE = re.compile(r"^(?:(?P<fs>[A-Za-z0-9+_]+)-ptcl-img(?:\.(?P<comp>%s))?|"
                         r"(?P<old>[A-Za-z0-9+_]+)-img)(?:\.(?P<split>[a-z]{2,3}))?$"
                         % "|".join(CZ_COMPRESSION))
CZ_MARKERS = ("clonezilla-img", "parts", "disk")
CZ_EXTENDED = ("5", "f", "85")


def cz_read(path, binary=False):
    try:
        with io.open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data if binary else data.decode("utf-8", "replace")


def parse_sfdisk_dump(text, problems=None):
    """An `sfdisk -d` dump: (headers, [partition dicts]) with start/size in
    sectors; new (label:, type=) and pre-2.26 (Id=) forms.  Lines that do
    not parse are named in `problems` and left out."""
    headers, parts = {}, []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("/dev/") or " : " in line:
            dev, _sep, rest = line.partition(":")
            p = {"device": dev.strip(), "bootable": False}
            for field in rest.split(","):
                key, eq, value = field.strip().partition("=")
                key = key.strip().lower()
                if not eq:
                    if key == "bootable":
                        p["bootable"] = True
                    continue
                value = value.strip().strip('"')
                if key in ("start", "size"):
                    p[key] = int(value) if value.isdigit() and len(value) <= 19 else None
                elif key in ("type", "id"):
                    p["type"] = value.lower() if len(value) <= 2 else value.upper()
                else:
                    p[key] = value
            if p.get("start") is None or p.get("size") is None or \
                    not re.match(r"^[0-9a-f]{1,2}$|^[0-9A-F-]{36}$", p.get("type", "")):
                if problems is not None:
                    problems.append("a partition line that does not parse: %r" % line[:80])
            elif p["size"] and p["type"] != "0":
                parts.append(p)
        else:
            key, _sep, value = line.partition(":")
            headers[key.strip()] = value.strip()
    return headers, parts


def cz_number(device):
    m = re.search(r"(\d+)$", device)
    return int(m.group(1)) if m else None


def chs(lba, heads, sectors):
    """The 3-byte CHS field of an MBR entry, as fdisk fills it."""
    c, rest = divmod(lba, heads * sectors)
    h, s = divmod(rest, sectors)
    if c > 1023:
        c, h, s = 1023, heads - 1, sectors - 1
    return bytes([h, (s + 1) | (c >> 2 & 0xC0), c & 0xFF])


def mbr_entry(boot, ptype, start, count, geometry):
    return (bytes([0x80 if boot else 0]) + chs(start, *geometry) + bytes([ptype]) +
            chs(start + count - 1, *geometry) + struct.pack("<II", start, count))


def geometry_of(mbr):
    """Heads and sectors per track that the CHS fields of a saved MBR were
    written with (255/63 when they do not tell)."""
    mbr = mbr[:512].ljust(512, b"\0")
    slots = [(mbr[446 + 16 * i:462 + 16 * i]) for i in range(4)]
    for heads, sectors in ((255, 63), (64, 32), (128, 32), (16, 63), (240, 63), (32, 32)):
        ok = False
        for e in slots:
            start, count = struct.unpack_from("<II", e, 8)
            if not e[4] or not count:
                continue
            if e[1:4] != chs(start, heads, sectors):
                break
            ok = True
        else:
            if ok:
                return heads, sectors
    return 255, 63


def swap_header(size, uuid, label, page=4096):
    """The first page mkswap writes: version 1, last page, UUID, label, magic."""
    hdr = bytearray(page)
    struct.pack_into("<III", hdr, 1024, 1, size // page - 1, 0)
    try:
        import uuid as uuidlib
        hdr[1036:1052] = uuidlib.UUID(uuid).bytes if uuid else bytes(16)
    except ValueError:
        pass
    hdr[1052:1068] = label.encode("utf-8")[:16].ljust(16, b"\0")
    hdr[page - 10:page] = b"SWAPSPACE2"
    return bytes(hdr)


class AssembledMember(Member):
    """A disk made of pieces: literal bytes (tables, boot code, hidden data)
    and partition members placed at their offsets; zeros elsewhere."""

    kind = "disk"

    def __init__(self, name, size, pieces):
        Member.__init__(self, name, size)
        self.pieces = sorted(pieces, key=lambda p: p[0])     # (offset, length, bytes or Member)

    def paths(self):
        out = []
        for _o, _n, src in self.pieces:
            if isinstance(src, Member):
                out += src.paths()
        return out

    def input_size(self):
        return sum(src.input_size() for _o, _n, src in self.pieces if isinstance(src, Member))

    def scan(self, sink, report, progress=None):
        done = 0
        for offset, length, src in self.pieces:
            if isinstance(src, Member):
                src.scan(ShiftSink(sink, offset, length), report,
                         OffsetProgress(progress, done) if progress else None)
                done += src.input_size()
            elif sink.wants_data and src.strip(b"\0"):
                sink.write(offset, src[:length])
        return None

    def reader(self, ctx):
        parts = [(o, n, src.open(ctx) if isinstance(src, Member) else src)
                 for o, n, src in self.pieces]
        return ComposedReader(self.size, parts)

    def extents(self, ctx):
        def runs():
            for offset, length, src in self.pieces:
                if isinstance(src, Member):
                    for o, n in src.extents(ctx):
                        if o < length:
                            yield offset + o, min(n, length - o)
                elif src.strip(b"\0"):
                    yield offset, len(src)
        return merge_extents(runs(), self.size)


class ComposedReader(ReadIntoMixin):
    """Random access to a disk assembled from pieces (see AssembledMember)."""

    def __init__(self, size, pieces):
        self.size, self.pieces = size, pieces
        self.starts = [o for o, _n, _s in pieces]
        self.how = "; ".join(p.how for _o, _n, p in pieces if getattr(p, "how", ""))

    def readinto(self, offset, out):
        end, pos = offset + len(out), offset
        i = max(0, bisect.bisect_right(self.starts, offset) - 1)
        while pos < end:
            if i >= len(self.pieces) or self.pieces[i][0] >= end:
                zero_fill(out[pos - offset:])
                return
            start, length, src = self.pieces[i]
            if start + length <= pos:
                i += 1
                continue
            if start > pos:
                zero_fill(out[pos - offset:start - offset])
                pos = start
            b = min(end, start + length)
            dst = out[pos - offset:b - offset]
            if isinstance(src, (bytes, bytearray)):
                piece = src[pos - start:b - start]
                dst[:len(piece)] = piece
                if len(piece) < len(dst):
                    zero_fill(dst[len(piece):])
            else:
                have = max(0, min(b, start + src.size) - pos)   # an image shorter than its partition
                if have:
                    src.readinto(pos - start, dst[:have])
                if have < len(dst):
                    zero_fill(dst[have:])
            pos = b
            i += 1


class ClonezillaBackup(Backup):
    """A Clonezilla or Rescuezilla image directory (see the section comment)."""

    format = "clonezilla"

    def __init__(self, path, fmt=None):
        self.dir = path
        self.names = sorted(os.listdir(path))
        self.fmt = fmt
        self.problems = []                 # found while reading the directory
        self.disk_names = (cz_read(os.path.join(path, "disk")) or "").split()
        self.part_names = (cz_read(os.path.join(path, "parts")) or "").split()
        self.tables = {}                   # disk -> (headers, partitions, size, sector size)
        for name in self.names:
            if name.endswith("-pt.sf"):
                self._read_table(name[:-len("-pt.sf")])
        members, self.entries = [], []
        for part in self._partition_names():
            self.entries.append(self._entry(part))
        self.entries.sort(key=lambda e: (e.get("disk") or "~", e.get("start", 1 << 62), e["name"]))
        parts = [e["member"] for e in self.entries if e.get("member")]
        for disk in self.disk_names:
            members.append(self._disk(disk))
        Backup.__init__(self, path, members + parts)

    # --- what the directory says ------------------------------------------
    def _read_table(self, disk):
        text = cz_read(os.path.join(self.dir, disk + "-pt.sf")) or ""
        problems = []
        headers, parts = parse_sfdisk_dump(text, problems)
        self.problems += ["%s-pt.sf: %s" % (disk, p) for p in problems]
        ss = headers.get("sector-size", "512")
        parted = cz_read(os.path.join(self.dir, disk + "-pt.parted")) or ""
        m = re.search(r"^Sector size \(logical/physical\): (\d+)B", parted, re.M)
        if m:
            ss = m.group(1)
        ss = int(ss) if ss in ("512", "1024", "2048", "4096") else 512
        m = re.search(r"^Disk /dev/\S+: (\d{1,19})s\s*$", parted, re.M)
        size = int(m.group(1)) * ss if m else None
        if size is not None and not 0 < size < 1 << 62:
            self.problems.append("%s-pt.parted gives an absurd disk size (%d)" % (disk, size))
            size = None
        if size is None and headers.get("label") == "gpt":
            g = cz_read(os.path.join(self.dir, disk + "-gpt-1st"), True)
            if g and g[512:520] == b"EFI PART":
                size = (struct.unpack_from("<Q", g, 512 + 32)[0] + 1) * ss
        if size is None and parts:
            size = max(p["start"] + p["size"] for p in parts) * ss
        limit = (1 << 32) if headers.get("label") != "gpt" else (1 << 62) // ss
        for p in list(parts):
            end = (p["start"] + p["size"]) * ss
            if p["start"] + p["size"] > limit or (size is not None and end > size) or \
                    not p["start"]:
                self.problems.append("%s-pt.sf: %s lies outside the disk (sectors %d-%d)"
                                     % (disk, p["device"], p["start"], p["start"] + p["size"] - 1))
                parts.remove(p)
        if size is not None and size >= 1 << 62:
            size = None
        if not text.strip():
            self.problems.append("%s-pt.sf is empty: the save could not read the partition "
                                 "table, so disk %s cannot be laid out" % (disk, disk))
        self.tables[disk] = (headers, parts, size, ss)

    def _partition_names(self):
        names = list(self.part_names)
        for disk, (_h, parts, _s, _ss) in self.tables.items():
            for p in parts:
                dev = p["device"][5:].replace("/", "-") if p["device"].startswith("/dev/") \
                    else p["device"]
                if dev not in names:
                    names.append(dev)         # swap and extended are not in `parts`
        for name in self.names:               # LVM volumes and strays with an image
            m = re.match(r"^(.+?)\.([A-Za-z0-9+_]+-ptcl-img|[A-Za-z0-9+_]+-img)", name)
            if m and m.group(1) not in names:
                names.append(m.group(1))
        return names

    def _place(self, part):
        """(disk, sfdisk line) of a partition, when a table lists it."""
        for disk, (_h, parts, _s, _ss) in self.tables.items():
            for p in parts:
                dev = p["device"][5:].replace("/", "-") if p["device"].startswith("/dev/") \
                    else p["device"]
                if dev == part:
                    return disk, p
        return None, None

    def _image_file(self, part):
        """The first piece of a partition's image, and what its name says."""
        prefix = part + "."
        for name in self.names:
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix):]
            if re.match(r"^a{2,3}$", rest):                       # partimage: sda1.aa
                return name, {"fs": None, "comp": None, "legacy": "partimage"}
            m = CZ_IMAGE_RE.match(rest)
            if m and (m.group("split") is None or set(m.group("split")) == {"a"}):
                return name, {"fs": m.group("fs") or m.group("old"), "comp": m.group("comp"),
                              "legacy": m.group("old")}
        return None, None

    def _entry(self, part):
        disk, line = self._place(part)
        e = {"name": part, "disk": disk, "line": line, "member": None, "reason": None}
        ss = self.tables[disk][3] if disk else 512
        if line:
            e["start"], e["size"] = line["start"] * ss, line["size"] * ss
            e["number"], e["type"] = cz_number(line["device"]), line.get("type")
        image, named = self._image_file(part)
        e["file"], e["named"] = image, named
        if image is None:
            e["reason"] = self._no_image_reason(part, line)
            return e
        try:
            fmt = "raw" if named and named["fs"] in ("dd",) else None
            m = ImageMember(os.path.join(self.dir, image), name=part, fmt=fmt)
        except VimageError as err:
            e["reason"] = "image unreadable: %s" % err
            e["error"] = err
            return e
        m.number, m.start = e.get("number"), e.get("start")
        m.files_dir = part
        e["member"] = m
        return e

    def _no_image_reason(self, part, line):
        ptype = (line or {}).get("type", "")
        if ptype in CZ_EXTENDED:
            return "extended partition (only its first EBR is saved)"
        if ptype in ("82", "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F") or \
                os.path.exists(os.path.join(self.dir, "swappt-%s.info" % part)):
            return "swap (re-made by mkswap on restore)"
        lvm = cz_read(os.path.join(self.dir, "lvm_vg_dev.list")) or ""
        if re.search(r"/dev/%s(\s|$)" % re.escape(part), lvm):
            return "LVM physical volume (its logical volumes are imaged instead)"
        if part in self.part_names:
            return "listed in parts, but no image file was found"
        return "not saved"

    # --- the virtual disk -------------------------------------------------
    def _disk(self, disk):
        if disk not in self.tables:
            raise FormatError("%s: disk %s has no %s-pt.sf" % (self.dir, disk, disk))
        headers, lines, size, ss = self.tables[disk]
        if not size:
            raise FormatError("%s: the size of disk %s is unknown (empty %s-pt.parted and "
                              "%s-pt.sf)" % (self.dir, disk, disk, disk))
        pieces = []
        mbr = cz_read(os.path.join(self.dir, disk + "-mbr"), True) or bytes(512)
        if headers.get("label") == "gpt":
            pieces += self._gpt_pieces(disk, mbr, size, ss)
        else:
            pieces += self._mbr_pieces(disk, mbr, headers, lines, ss)
        for e in self.entries:
            if e["disk"] != disk or "start" not in e:
                continue
            if e["member"] is not None:
                pieces.append((e["start"], e["size"], e["member"]))
            elif e["reason"] and e["reason"].startswith("swap"):
                info = cz_read(os.path.join(self.dir, "swappt-%s.info" % e["name"])) or ""
                kv = dict(re.findall(r'^(\w+)="?([^"\n]*)"?', info, re.M))
                pieces.append((e["start"], 4096, swap_header(e["size"], kv.get("UUID"),
                                                             kv.get("LABEL", ""))))
        pieces = self._no_overlaps(disk, pieces)
        return AssembledMember(disk, size, pieces)

    def _no_overlaps(self, disk, pieces):
        pieces.sort(key=lambda p: p[0])
        out = []
        for p in pieces:
            if out and p[0] < out[-1][0] + out[-1][1]:
                self.problems.append("%s: pieces overlap at byte %d" % (disk, p[0]))
                continue
            out.append(p)
        return out

    def _mbr_pieces(self, disk, mbr, headers, lines, ss):
        geometry = geometry_of(mbr)
        table = bytearray(mbr[:512].ljust(512, b"\0"))
        primaries = [p for p in lines if cz_number(p["device"]) and cz_number(p["device"]) <= 4]
        want = bytearray(64)
        for p in primaries:
            slot = cz_number(p["device"]) - 1
            want[16 * slot:16 * slot + 16] = mbr_entry(p["bootable"], int(p["type"], 16),
                                                       p["start"], p["size"], geometry)
        saved = _mbr_entries(bytes(table))
        if [(t, s, c) for _n, _f, t, s, c in saved] != \
                [(want[16 * i + 4], struct.unpack_from("<I", want, 16 * i + 8)[0],
                  struct.unpack_from("<I", want, 16 * i + 12)[0]) for i in range(4)]:
            table[446:510] = want               # the saved MBR disagrees with pt.sf: sfdisk's
        if headers.get("label-id", "").startswith("0x"):
            struct.pack_into("<I", table, 440, int(headers["label-id"], 16))
        table[510:512] = b"\x55\xaa"
        pieces = [(0, ss, bytes(table[:ss]) if ss == 512 else bytes(table).ljust(ss, b"\0"))]
        hidden = cz_read(os.path.join(self.dir, disk + "-hidden-data-after-mbr"), True)
        first = min([p["start"] for p in lines] or [0])
        if hidden and first > 1:
            pieces.append((ss, min(len(hidden), (first - 1) * ss), hidden[:(first - 1) * ss]))
        ext = next((p for p in primaries if p["type"] in CZ_EXTENDED), None)
        logicals = sorted((p for p in lines if (cz_number(p["device"]) or 0) > 4),
                          key=lambda p: p["start"])
        if ext is not None:
            pieces += self._ebr_pieces(disk, ext, logicals, headers, ss, geometry)
        return pieces

    def _ebr_pieces(self, disk, ext, logicals, headers, ss, geometry):
        """The EBR chain sfdisk writes (see the section comment)."""
        grain = int(headers.get("grain", str(MiB)) or MiB) // ss
        ebrs = []
        for i, p in enumerate(logicals):
            ebrs.append(ext["start"] if i == 0 else max(p["start"] - grain,
                                                         logicals[i - 1]["start"] +
                                                         logicals[i - 1]["size"]))
        pieces = []
        ext_dev = ext["device"][5:].replace("/", "-") if ext["device"].startswith("/dev/") \
            else ext["device"]
        boot = cz_read(os.path.join(self.dir, ext_dev + "-ebr"), True) or b""
        for i, p in enumerate(logicals):
            sector = bytearray(512)
            if i == 0:
                sector[:446] = boot[:446].ljust(446, b"\0")
            sector[446:462] = mbr_entry(p["bootable"], int(p["type"], 16), p["start"],
                                        p["size"], geometry)
            struct.pack_into("<I", sector, 446 + 8, p["start"] - ebrs[i])
            if i + 1 < len(logicals):
                nxt = logicals[i + 1]
                link = mbr_entry(False, 5, ebrs[i + 1], nxt["start"] + nxt["size"] - ebrs[i + 1],
                                 geometry)
                sector[462:478] = link
                struct.pack_into("<I", sector, 462 + 8, ebrs[i + 1] - ext["start"])
            sector[510:512] = b"\x55\xaa"
            pieces.append((ebrs[i] * ss, ss, bytes(sector).ljust(ss, b"\0")))
        return pieces

    def _gpt_pieces(self, disk, mbr, size, ss):
        first = cz_read(os.path.join(self.dir, disk + "-gpt-1st"), True)
        second = cz_read(os.path.join(self.dir, disk + "-gpt-2nd"), True)
        gdisk = cz_read(os.path.join(self.dir, disk + "-gpt.gdisk"), True)
        if first is None and gdisk is not None and len(gdisk) >= 1536:
            first = gdisk[:512] + gdisk[512:1024] + gdisk[1536:]
        if first is None:
            raise FormatError("%s: GPT disk %s has neither %s-gpt-1st nor %s-gpt.gdisk"
                              % (self.dir, disk, disk, disk))
        lba0 = mbr[:446] + first[446:512] if len(mbr) >= 446 else first[:512]
        pieces = [(0, len(first), lba0 + first[512:])]
        n = size // ss
        if second is not None and len(second) == 32 * 512 and ss == 512:
            # the save skipped LBA N-33, the first sector of the backup entries
            pieces.append(((n - 33) * ss, 33 * ss, first[1024:1536] + second))
        elif second is not None:
            pieces.append((size - len(second), len(second), second))
        elif gdisk is not None and len(gdisk) >= 1536:
            entries = gdisk[1536:]
            pieces.append((size - ss - len(entries), len(entries) + ss, entries + gdisk[1024:1536]))
        else:
            self.problems.append("%s: no backup GPT was saved; the virtual disk has none"
                                 % disk)
        return pieces

    # --- what commands see --------------------------------------------------
    def describe(self):
        parts = self.partitions()
        text = "%s image directory, %s, %d partition images" % (
            self.saved_by()[0], ", ".join("disk %s %s" % (d.name, human(d.size))
                                          for d in self.disks()) or "no disk (saveparts)",
            len(parts))
        comps = sorted({m.header.get("compression") or "uncompressed" for m in parts})
        return text + (" (%s)" % ", ".join(comps) if comps else "")

    def saved_by(self):
        """(tool and version, when, command)."""
        head = cz_read(os.path.join(self.dir, "clonezilla-img")) or ""
        first = head.splitlines()[0] if head else ""
        m = re.search(r"saved by (Clonezilla|Rescuezilla) at (.+?)\.?\s*$", first)
        tool = m.group(1) if m else "Clonezilla"
        when = m.group(2) if m else None
        pkgs = cz_read(os.path.join(self.dir, "Info-packages.txt")) or ""
        if "Rescuezilla" in pkgs:
            tool = "Rescuezilla"
        v = re.search(r"\b%s-(\d[\w.+~-]*)" % tool.lower(), pkgs)
        if v:
            tool += " " + v.group(1)
        cmd = (cz_read(os.path.join(self.dir, "Info-saved-by-cmd.txt")) or "").strip() or None
        return tool, when, cmd

    def default_member(self):
        disks = self.disks()
        if not disks:
            raise VimageError("%s was saved with saveparts: it holds no disk, only partitions; "
                              "name one with --partition (%s)"
                              % (self.dir, ", ".join(m.name for m in self.partitions())))
        return Backup.default_member(self)

    def verify_members(self):
        return self.partitions()

    def checks(self, report_to, say):
        cz_checks(self, report_to, say)

    def taps(self):
        wants = {}
        for sums in SUMS_FILES:
            text = cz_read(os.path.join(self.dir, sums))
            for line in (text or "").splitlines():
                parts = line.strip().split(None, 1)
                if len(parts) == 2 and new_hash(SUMS_ALGOS[sums]) is not None:
                    wants.setdefault(os.path.join(self.dir, parts[1].lstrip("*")),
                                     set()).add(SUMS_ALGOS[sums])
        return {path: FileTap(path, algos) for path, algos in wants.items()}

    def info(self):
        tool, when, cmd = self.saved_by()
        disks = []
        for d in self.disk_names or sorted(self.tables):
            headers, _lines, size, ss = self.tables.get(d, ({}, [], None, 512))
            disks.append({"name": d, "size": size, "label": headers.get("label"),
                          "sector_size": ss, "id": headers.get("label-id"),
                          "saved_as_disk": d in self.disk_names})
        parts = []
        for e in self.entries:
            m = e["member"]
            named = e["named"] or {}
            parts.append({
                "name": e["name"], "disk": e["disk"], "number": e.get("number"),
                "start": e.get("start"), "size": e.get("size"), "type": e.get("type"),
                "filesystem": (named.get("fs") if named.get("fs") not in (None, "dd") else None)
                or (m.filesystem if m else None),
                "image": e["file"], "format": m.format if m else None,
                "compression": m.header.get("compression") if m else named.get("comp"),
                "pieces": m.header.get("pieces") if m else None,
                "checksum": m.checksum if m else None,
                "image_size": m.size if m else None, "reason": e["reason"]})
        d = {"format": "clonezilla", "path": self.dir, "saved_by": tool, "saved_at": when,
             "command": cmd, "partitions": parts,
             "checksum_files": [n for n in SUMS_FILES if n in self.names]}
        if len(disks) == 1 and self.disk_names:
            d["disk"] = disks[0]
        else:
            d["disks"] = disks
        if not self.disk_names:
            d["note"] = "saved with saveparts: no disk to assemble"
        if self.problems:
            d["problems"] = list(self.problems)
        return d


SUMS_FILES = ("MD5SUMS", "SHA1SUMS", "B2SUMS", "B3SUMS")


def detect_clonezilla(path, fmt=None, **_options):
    names = os.listdir(path)
    if not (any(n in names for n in CZ_MARKERS) or
            any("-ptcl-img" in n or n.endswith("-pt.sf") for n in names)):
        return None
    for enc in ("ecryptfs.info", "gocryptfs.info"):
        if enc in names:
            raise FormatError("%s is an encrypted Clonezilla image (%s): every file in it is "
                              "ciphertext; decrypt it with Clonezilla first" % (path, enc))
    if "00-pseudo-img-note.txt" in names:
        raise FormatError("%s is a Clonezilla pseudo image (made for a multicast or "
                          "BitTorrent restore from a device): it holds no data" % path)
    return ClonezillaBackup(path, fmt)


BACKUP_SETS.insert(0, detect_clonezilla)


SUMS_ALGOS = {"MD5SUMS": "md5", "SHA1SUMS": "sha1", "B2SUMS": "blake2b", "B3SUMS": "blake3"}


def cz_checks(backup, report_to, say):
    """verify of an image directory beyond its partition images: the sums
    files, the saved tables against each other and against the images."""
    for problem in backup.problems:
        report_to(None)(Problem("structure", problem))
    for e in backup.entries:
        if e.get("error") is not None:
            report_to(e["name"])(Problem("missing", str(e["error"])))
    _cz_table_checks(backup, report_to(None))
    _cz_sums_checks(backup, report_to(None))


def _cz_table_checks(backup, report):
    for disk, (headers, lines, size, ss) in sorted(backup.tables.items()):
        if headers.get("label") == "gpt":
            for name, hdr_at, entries_at in (("-gpt-1st", 512, 1024), ("-gpt.gdisk", 512, 1536),
                                             ("-gpt.gdisk", 1024, 1536)):
                raw = cz_read(os.path.join(backup.dir, disk + name), True)
                if raw is None or len(raw) < hdr_at + 92:
                    continue
                hdr, problems = _gpt_header(raw[hdr_at:hdr_at + 512], 512, disk + name)
                for p in problems:
                    report(Problem("checksum" if "CRC" in p else "structure", p))
                if hdr and len(raw) >= entries_at + hdr["count"] * hdr["esize"] and \
                        zlib.crc32(raw[entries_at:entries_at + hdr["count"] * hdr["esize"]]) \
                        != hdr["ecrc"]:
                    report(Problem("checksum", "%s%s: the GPT entry array does not match its CRC"
                                   % (disk, name)))
            backup.checked.append("GPT header and entry CRCs of %s" % disk)
        for e in backup.entries:
            m = e["member"]
            if e["disk"] != disk or m is None or m.size is None or "size" not in e:
                continue
            if m.size > e["size"]:
                report(Problem("structure", "%s: the image holds %d bytes, but %s-pt.sf gives "
                               "the partition %d" % (e["name"], m.size, disk, e["size"])))
        if lines:
            backup.checked.append("%s-pt.sf partition sizes against the images" % disk)


def _cz_sums_checks(backup, report):
    listed = set()
    for sums in SUMS_FILES:
        text = cz_read(os.path.join(backup.dir, sums))
        if text is None:
            continue
        algo = SUMS_ALGOS[sums]
        if new_hash(algo) is None:
            backup.unchecked.append("%s (BLAKE3): the Python package 'blake3' is not installed "
                                    "(pip install blake3)" % sums)
            continue
        bad = n = 0
        for lineno, line in enumerate(text.splitlines(), 1):
            parts = line.strip().split(None, 1)
            if len(parts) != 2:
                continue
            want, name = parts[0].lower(), parts[1].lstrip("*")
            listed.add(name)
            n += 1
            got = file_digest(os.path.join(backup.dir, name), algo)
            if got is None:
                report(Problem("missing", "%s line %d: %s is missing" % (sums, lineno, name)))
                bad += 1
            elif got != want:
                report(Problem("checksum", "%s line %d: %s does not match its %s"
                               % (sums, lineno, name, algo.upper())))
                bad += 1
        backup.checked.append("%d files against %s" % (n, sums))
    if listed:
        for e in backup.entries:
            m = e["member"]
            for p in (m.paths() if m else []):
                if os.path.basename(p) not in listed:
                    report(Problem("structure", "%s is in no checksum file (an extra piece?)"
                                   % os.path.basename(p)))


def file_digest(path, algo):
    """Hex digest of a whole file: from the hashes its scan already took
    (FILE_TAPS), else by reading it now.  None when it cannot be read."""
    tap = FILE_TAPS.get(os.path.realpath(path))
    if tap is not None:
        digest = tap.hexdigest(algo)
        if digest is not None:
            return digest
    h = new_hash(algo)
    try:
        with io.open(path, "rb") as f:
            while True:
                data = f.read(CHUNK)
                if not data:
                    break
                h.update(data)
    except OSError:
        return None
    return h.hexdigest()


# ===========================================================================
# Backup sets: sparsebak and Wyng archives
# ===========================================================================
#
# sparsebak (2018) and Wyng keep a volume as sessions of fixed-size chunks:
#   <volume>/S_YYYYmmdd-HHMMSS/           one folder per backup run
#       0000000000040000                  2018: flat, bare 16-hex byte address
#       000000000/x0000000000040000       later: bucket (first 9 hex) + x-name
#       info, manifest (manifest.z)       key = value lines; "digest x<addr>"
# The first session holds every address, later ones the chunks that changed.
# A chunk file is raw, xz, gzip, zlib, bz2 or zstd (told apart by magic); a
# zero-length file or a "0" manifest line is a chunk of zeros.  The volume as
# of session S: for every address the chunk of the newest session <= S that
# has it, zeros where none has it (never shifted), cut to S's volsize.  Chunk
# size: info:chunksize, archive.ini, else 256 KiB (2018).  Manifest digests
# are sha256 or BLAKE2b-256 of the stored (compressed) bytes, hex or, in
# Wyng's format 3, URL-safe base64.  Format 3 ("[WYNG03]" archive.ini) also
# compresses its metadata and chains it by hash: archive.ini [volumes] ->
# Vol_x/volinfo -> S_x/info -> manifest.z, and info:mfcs is the CRC-32 of
# the merged manifest text up to that session.

SESSION_RE = re.compile(r"^S_(\d{8}-\d{6})$")
CHUNK_FILE_RE = re.compile(r"^x?([0-9a-f]{16})$")
BUCKET_RE = re.compile(r"^[0-9a-f]{9}$")
CHUNK_DEFAULT = 256 * 1024


def _zlib_magic(b):
    return len(b) > 1 and b[0] == 0x78 and (b[0] << 8 | b[1]) % 31 == 0


# first bytes -> (name, decompress(data, max_length))
CHUNK_CODECS = [
    (lambda b: b[:2] == b"\x1f\x8b", "gzip",
     lambda d, n: zlib.decompressobj(31).decompress(d, n)),
    (lambda b: b[:6] == b"\xfd7zXZ\x00", "xz",
     lambda d, n: lzma.LZMADecompressor().decompress(d, n)),
    (lambda b: b[:3] == b"BZh", "bz2", lambda d, n: bz2.BZ2Decompressor().decompress(d, n)),
    (lambda b: b[:4] == b"\x28\xb5\x2f\xfd", "zstd", lambda d, n: _zstd_decompress(d)[:n]),
    (_zlib_magic, "zlib", lambda d, n: zlib.decompressobj().decompress(d, n)),
]


def decode_chunk(stored, expect):
    """The decoded bytes of a stored chunk (`expect` bytes long): by magic,
    else raw when it already has that length."""
    for match, name, decode in CHUNK_CODECS:
        if match(stored):
            try:
                out = decode(stored, expect + 1)
            except MissingDependency:
                raise
            except Exception as e:
                if len(stored) == expect:
                    return stored
                raise ContainerError("%s chunk is corrupt: %s" % (name, e))
            if len(out) == expect or len(stored) != expect:
                return out
            break
    return stored


def decode_meta(raw):
    """A metadata file of format 3 (compressed with the archive's codec) as text."""
    for match, _name, decode in CHUNK_CODECS:
        if match(raw):
            try:
                raw = decode(raw, 1 << 26)
            except MissingDependency:
                raise
            except Exception as e:
                raise FormatError("archive metadata is corrupt: %s" % e)
            break
    return raw.decode("utf-8", "replace")


def keyvals(text):
    """key = value lines (first one wins; 'tag' lines collected)."""
    d, tags = {}, []
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if key == "tag":
            tags.append(value)
        else:
            d.setdefault(key, value)
    d["tags"] = tags
    return d


def _b64_digest(digest):
    import base64
    return base64.urlsafe_b64encode(digest).decode()


HASHES = {"sha256": lambda: __import__("hashlib").sha256(),
          "blake2b": lambda: __import__("hashlib").blake2b(digest_size=32)}


class ChunkSession:
    """One session folder: its metadata and the chunks it stores."""

    def __init__(self, volume, name, path):
        self.volume, self.name, self.path = volume, name, path
        m = SESSION_RE.match(name)
        self.time = m.group(1) if m else name
        self.info = {}
        if os.path.exists(os.path.join(path, "info")):
            with io.open(os.path.join(path, "info"), "rb") as f:
                self.info_raw = f.read()
            self.info = keyvals(decode_meta(self.info_raw))
        self.manifest_file = next((os.path.join(path, n) for n in ("manifest.z", "manifest", "hashes")
                                   if os.path.exists(os.path.join(path, n))), None)
        self._chunks = None

    def volsize(self):
        v = self.info.get("volsize") or self.info.get("size")
        return int(v) if v and v.isdigit() else None

    def chunk_path(self, addr):
        name = "%016x" % addr
        bucketed = os.path.join(self.path, name[:9], "x" + name)
        if os.path.exists(bucketed):
            return bucketed
        for flat in (os.path.join(self.path, name), os.path.join(self.path, "x" + name)):
            if os.path.exists(flat):
                return flat
        return bucketed

    def _tar(self):
        """{address: (offset, size)} of the chunks of a tar session (--tarfile:
        S_x/S_x.tar, members named .../S_x-tmp/<bucket>/x<addr>), or None."""
        if not hasattr(self, "_tar_index"):
            self._tar_index = None
            tars = [n for n in os.listdir(self.path) if n.endswith(".tar")]
            if tars:
                import tarfile
                self.tar_path = os.path.join(self.path, tars[0])
                index = {}
                try:
                    with tarfile.open(self.tar_path) as tf:
                        for member in tf:
                            m = CHUNK_FILE_RE.match(os.path.basename(member.name))
                            if m and member.isfile():
                                index[int(m.group(1), 16)] = (member.offset_data, member.size)
                except (tarfile.TarError, OSError) as e:
                    raise FormatError("%s: %s" % (self.tar_path, e))
                self._tar_index = index
        return self._tar_index

    def stored(self, addr):
        """The stored (compressed) bytes of the chunk at addr."""
        tar = self._tar()
        try:
            if tar is not None:
                if addr not in tar:
                    raise OSError(errno.ENOENT, "No such file or directory")
                offset, size = tar[addr]
                with io.open(self.tar_path, "rb") as f:
                    f.seek(offset)
                    return f.read(size)
            with io.open(self.chunk_path(addr), "rb") as f:
                return f.read()
        except OSError as e:
            raise ContainerError("%s: chunk x%016x: %s" % (self.name, addr, e.strerror))

    def stored_size(self, addr):
        tar = self._tar()
        if tar is not None:
            return tar.get(addr, (0, 0))[1]
        try:
            return os.path.getsize(self.chunk_path(addr))
        except OSError:
            return 0

    def chunks(self):
        """{address: digest, 0 for a zero chunk, or None for a data chunk of
        unknown digest (no manifest)}."""
        if self._chunks is None:
            self._chunks = self._from_manifest() if self.manifest_file else self._from_files()
        return self._chunks

    def _from_files(self):
        tar = self._tar()
        if tar is not None:
            return {addr: 0 if size == 0 else None for addr, (_o, size) in tar.items()}
        found = {}
        for entry in os.listdir(self.path):
            full = os.path.join(self.path, entry)
            if BUCKET_RE.match(entry) and os.path.isdir(full):
                for name in os.listdir(full):
                    m = CHUNK_FILE_RE.match(name)
                    if m:
                        found[int(m.group(1), 16)] = (0 if os.path.getsize(os.path.join(full, name))
                                                      == 0 else None)
            else:
                m = CHUNK_FILE_RE.match(entry)
                if m and os.path.isfile(full):
                    found[int(m.group(1), 16)] = 0 if os.path.getsize(full) == 0 else None
        return found

    def _from_manifest(self):
        with io.open(self.manifest_file, "rb") as f:
            self.manifest_raw = f.read()
        found = {}
        for n, line in enumerate(decode_meta(self.manifest_raw).splitlines(), 1):
            tokens = line.split()
            if not tokens:
                continue
            addr = digest = None
            for t in tokens:            # told apart by shape: the column order changed
                m = CHUNK_FILE_RE.match(t)
                if m and addr is None:
                    addr = int(m.group(1), 16)
                else:
                    digest = 0 if t == "0" else t
            if addr is None or digest is None or len(tokens) != 2:
                raise FormatError("%s line %d is not a manifest line: %r"
                                  % (self.manifest_file, n, line[:80]))
            found[addr] = digest
        return found


class ChunkVolume:
    """A volume folder: its sessions, oldest first, and how to read them."""

    def __init__(self, path, name, archive=None):
        self.path, self.name, self.archive = path, name, archive
        self.volinfo = {}
        vi = os.path.join(path, "volinfo")
        if os.path.exists(vi):
            with io.open(vi, "rb") as f:
                self.volinfo_raw = f.read()
            self.volinfo = keyvals(decode_meta(self.volinfo_raw))
            self.name = self.volinfo.get("name") or name
        self.sessions, self.unfinished = [], []
        for entry in sorted(os.listdir(path)):
            full = os.path.join(path, entry)
            if SESSION_RE.match(entry) and os.path.isdir(full):
                self.sessions.append(ChunkSession(self, entry, full))
            elif entry.startswith("S_") and entry.endswith("-tmp"):
                self.unfinished.append(entry)
        if not self.sessions:
            raise FormatError("%s holds no finished session%s" % (
                path, " (only unfinished ones: %s)" % ", ".join(self.unfinished)
                if self.unfinished else ""))
        self.sessions.sort(key=lambda s: (int(s.info.get("sequence", "0") or 0)
                                          if str(s.info.get("sequence", "0")).isdigit() else 0,
                                          s.name))
        self.chunk_size = self._chunk_size()
        self.hashtype = (archive.hashtype if archive else None) or \
            ("sha256" if any(s.manifest_file for s in self.sessions) else None)

    def _chunk_size(self):
        for s in self.sessions:
            v = s.info.get("chunksize")
            if v and v.isdigit():
                return int(v)
        if self.archive and self.archive.chunk_size:
            return self.archive.chunk_size
        return CHUNK_DEFAULT

    def session(self, which):
        if not which:
            return self.sessions[-1]
        want = which if which.startswith("S_") else "S_" + which
        for s in self.sessions:
            if s.name == want:
                return s
        raise VimageError("%s has no session %s (it has: %s)" % (
            self.name, which, ", ".join(s.name for s in self.sessions)))

    def merged(self, session):
        """{address: (session, digest or 0)} as of `session`, and its size."""
        view = {}
        for s in self.sessions:
            for addr, digest in s.chunks().items():
                view[addr] = (s, digest)
            if s is session:
                break
        size = session.volsize()
        if size is None:                     # 2018 flat layouts record no size
            if not view:
                return view, 0
            top = max(view)
            s, digest = view[top]
            size = top + (self.chunk_size if digest == 0 else
                          len(decode_chunk(self._stored(s, top), self.chunk_size)))
        C = self.chunk_size
        last = (size - 1) - ((size - 1) % C) if size else -1
        return {a: v for a, v in view.items() if a <= last}, size

    @staticmethod
    def _stored(session, addr):
        return session.stored(addr)


class ChunkArchive:
    """What archive.ini says (absent for the 2018 layouts)."""

    def __init__(self, path):
        self.path = path
        self.format = "sparsebak"
        self.chunk_size = self.hashtype = self.compression = None
        self.v3 = False
        self.volumes_ini = {}
        ini = os.path.join(path, "archive.ini")
        if not os.path.exists(ini):
            return
        with io.open(ini, "rb") as f:
            raw = f.read()
        self.raw = raw
        import configparser
        cp = configparser.ConfigParser(interpolation=None)
        if raw.startswith(b"[WYNG"):
            head = raw.split(b"\n", 2)
            if head[0] != b"[WYNG03]":
                raise FormatError("%s: Wyng archive format %s is not one vimage knows"
                                  % (ini, head[0].decode("latin-1", "replace")))
            ci = head[1].decode("latin-1").partition("=")[2].strip() if len(head) > 1 else "?"
            if ci != "00" or os.path.exists(os.path.join(path, "archive.salt")):
                raise FormatError(
                    "Wyng archive %s is encrypted (ci = %s); vimage reads only unencrypted "
                    "archives. Restore the volume with 'wyng receive VOL --dest=file:%s "
                    "--save-to=OUT' and open OUT" % (path, ci, os.path.abspath(path)))
            try:
                text = gzip_decompress(head[2]).decode("utf-8")
            except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
                raise FormatError("%s: the archive settings are corrupt (%s)" % (ini, e))
            self.v3 = True
            self.format = "wyng"
        else:
            text = raw.decode("utf-8", "replace")
        try:
            cp.read_string(text)
        except configparser.Error as e:
            raise FormatError("%s is not a readable archive.ini: %s" % (ini, str(e).splitlines()[0]))
        var = cp["var"] if cp.has_section("var") else {}
        if var.get("chunksize", "").isdigit():
            self.chunk_size = int(var["chunksize"])
        self.hashtype = var.get("hashtype") or "sha256"
        self.compression = var.get("compression")
        if var.get("format_ver") or self.v3:
            self.format = "wyng"
        if cp.has_section("volumes"):
            self.volumes_ini = dict(cp["volumes"])

    def volume_dirs(self):
        """(folder, name) of every volume beside archive.ini."""
        out = []
        for entry in sorted(os.listdir(self.path)):
            full = os.path.join(self.path, entry)
            if os.path.isdir(full) and (os.path.exists(os.path.join(full, "volinfo")) or
                                        any(SESSION_RE.match(e) for e in os.listdir(full))):
                out.append((full, entry))
        return out


def gzip_decompress(data):
    return zlib.decompressobj(31).decompress(data)


def _has_sessions(path):
    """Whether path holds session folders (finished or not): a volume folder."""
    try:
        return any(SESSION_RE.match(e[:-4] if e.endswith("-tmp") else e) and
                   os.path.isdir(os.path.join(path, e)) for e in os.listdir(path))
    except OSError:
        return False


def detect_chunk_archive(path, volume=None, session=None, all_sessions=False, **_options):
    """A sparsebak/Wyng archive folder, volume folder, or one session folder."""
    shown = path
    path = os.path.abspath(path)      # chunks are opened as they are read, after a mount's chdir
    chosen = session
    base = os.path.basename(path)
    if SESSION_RE.match(base) and _has_sessions(os.path.dirname(path)):
        vol_dir, chosen = os.path.dirname(path), chosen or base     # a session folder
    elif _has_sessions(path):
        vol_dir = path
    elif os.path.exists(os.path.join(path, "archive.ini")):
        vol_dir = None
    else:
        pools = [os.path.join(path, e) for e in sorted(os.listdir(path))
                 if _has_sessions(os.path.join(path, e))]
        if not pools:
            return None
        vol_dir = None
    archive_dir = path if vol_dir is None else os.path.dirname(vol_dir)
    archive = ChunkArchive(archive_dir)
    if vol_dir is None:
        candidates = archive.volume_dirs() if os.path.exists(
            os.path.join(archive_dir, "archive.ini")) else \
            [(os.path.join(path, e), e) for e in sorted(os.listdir(path))
             if _has_sessions(os.path.join(path, e))]
        volumes = [ChunkVolume(p, n, archive) for p, n in candidates]
        if not volumes:
            raise FormatError("%s holds no volume" % path)
        if volume:
            pick = [v for v in volumes if volume in (v.name, os.path.basename(v.path))]
            if not pick:
                raise VimageError("%s has no volume %s (it has: %s)" % (
                    path, volume, ", ".join(v.name for v in volumes)))
            vol = pick[0]
        elif len(volumes) == 1:
            vol = volumes[0]
        else:
            raise VimageError("%s holds several volumes; choose one with --volume (%s)"
                              % (path, ", ".join(v.name for v in volumes)))
    else:
        vol = ChunkVolume(vol_dir, os.path.basename(vol_dir),
                          archive if archive.chunk_size or archive.v3 else None)
        volumes = [vol]
    return ChunkBackup(shown, archive, volumes, vol, vol.session(chosen), all_sessions)


class ChunkMember(Member):
    """A volume as of one session: one virtual file."""

    kind = "volume"

    def __init__(self, volume, session):
        self.volume, self.session = volume, session
        self.view, size = volume.merged(session)
        Member.__init__(self, volume.name.replace("/", "-"), size)
        self.has_checksums = bool(volume.hashtype)

    def paths(self):
        """The files the volume is read from (for access rights and overwrite checks)."""
        return [s.path for s in self.volume.sessions]

    def input_size(self):
        total = 0
        for addr, (s, digest) in self.view.items():
            if digest != 0:
                try:
                    total += s.stored_size(addr)
                except OSError:
                    pass
        return total

    def info(self):
        return {"name": self.name, "kind": self.kind, "size": self.size,
                "session": self.session.name}

    def describe(self):
        return "volume %s as of %s, %s, %d-byte chunks" % (
            self.volume.name, self.session.name, human(self.size), self.volume.chunk_size)

    def expect(self, addr):
        return min(self.volume.chunk_size, self.size - addr)

    def chunk(self, addr, check=True):
        """The decoded bytes of the chunk at addr (None for a zero chunk)."""
        s, digest = self.view[addr]
        if digest == 0:
            return None
        stored = self.volume._stored(s, addr)
        if not stored and digest is None:
            return None
        if check and digest:
            h = HASHES.get(self.volume.hashtype, HASHES["sha256"])()
            h.update(stored)
            got = h.hexdigest() if len(digest) == 2 * h.digest_size else _b64_digest(h.digest())
            if got != digest:
                raise ChecksumError("%s: chunk x%016x: %s digest mismatch"
                                    % (s.name, addr, self.volume.hashtype))
        expect = self.expect(addr)
        try:
            data = decode_chunk(stored, expect)
        except ContainerError as e:
            raise ContainerError("%s: chunk x%016x: %s" % (s.name, addr, e))
        if len(data) != expect:
            raise ContainerError("%s: chunk x%016x decodes to %d bytes, not %d"
                                 % (s.name, addr, len(data), expect))
        return data

    def coverage_words(self):
        if self.volume.hashtype:
            return "full", "every chunk checked against its %s manifest digest" % self.volume.hashtype
        return "partial", "no manifests: only the chunks' own codec checks and lengths"

    def scan(self, sink, report, progress=None):
        done = 0
        for addr in sorted(self.view):
            s = self.view[addr][0]
            try:
                data = self.chunk(addr)
            except VimageError as e:
                report(Problem("checksum" if isinstance(e, ChecksumError) else "damaged", str(e),
                               byte_range=(addr, addr + self.expect(addr)), unit="volume"))
                continue
            if data is not None:
                if sink.wants_data:
                    sink.write(addr, data)
                try:
                    done += s.stored_size(addr)
                except OSError:
                    pass
                if progress is not None:
                    progress.update_to(done)
        return _Covered(*self.coverage_words())

    def reader(self, ctx):
        return ChunkReader(self)

    def extents(self, ctx):
        return merge_extents(((a, self.expect(a)) for a in sorted(self.view)
                              if self.view[a][1] != 0), self.size)


class _Covered:
    """What a scan that is not an image's vouches for (see Image.coverage)."""

    def __init__(self, level, words):
        self.level, self.words = level, words

    def coverage(self):
        return self.level, self.words


class ChunkReader(ReadIntoMixin):
    """Random access to a volume: the merged view is the index; decoded chunks
    are kept in an LRU."""

    def __init__(self, member):
        self.member, self.size = member, member.size
        self.C = member.volume.chunk_size
        self.lru = ChunkLRU(LRU_BYTES)
        self.how = "%d chunks of %d bytes from %d sessions" % (
            len(member.view), self.C, len(member.volume.sessions))

    def readinto(self, offset, out):
        end = offset + len(out)
        C, pos = self.C, offset
        while pos < end:
            addr = pos - pos % C
            take = min(addr + C, end) - pos
            dst = out[pos - offset:pos - offset + take]
            if addr not in self.member.view:
                zero_fill(dst)
            else:
                data = self.lru.get(addr)
                if data is None:
                    try:
                        data = self.member.chunk(addr) or b""
                    except VimageError as e:
                        raise OSError(errno.EIO, str(e))
                    self.lru.put(addr, data)
                k = pos - addr
                piece = data[k:k + take]
                dst[:len(piece)] = piece
                if len(piece) < take:
                    zero_fill(dst[len(piece):])
            pos += take


class ChunkBackup(Backup):
    """A sparsebak/Wyng archive: the chosen volume as of the chosen session."""

    def __init__(self, path, archive, volumes, volume, session, all_sessions=False):
        self.archive, self.volumes, self.volume, self.session = archive, volumes, volume, session
        self.format = archive.format
        self.all_sessions = all_sessions
        self.noun = "sessions" if all_sessions else "volumes"
        Backup.__init__(self, path, [ChunkMember(volume, session)])

    def describe(self):
        v = self.volume
        return "%s archive, volume %s, session %s of %d, %s, %d-byte chunks" % (
            self.format, v.name, self.session.name, len(v.sessions), human(self.members[0].size),
            v.chunk_size)

    def verify_members(self):
        if not self.all_sessions:
            return self.members
        members = [ChunkMember(self.volume, s) for s in self.volume.sessions]
        for m in members:
            m.name = "%s@%s" % (m.name, m.session.name)
        return members

    def info(self):
        vols = []
        for v in self.volumes:
            sessions = []
            for s in v.sessions:
                chunks = s.chunks()
                zeros = sum(1 for d in chunks.values() if d == 0)
                sessions.append({"name": s.name, "time": s.time, "size": s.volsize(),
                                 "chunks_stored": len(chunks) - zeros, "zero_chunks": zeros,
                                 "previous": s.info.get("previous"), "tags": s.info.get("tags")
                                 or None})
            vols.append({"name": v.name, "folder": os.path.basename(v.path),
                         "chunk_size": v.chunk_size, "hash": v.hashtype, "sessions": sessions,
                         "unfinished_sessions": v.unfinished})
        m = self.members[0]
        return {"format": self.format, "path": self.path, "volume": self.volume.name,
                "session": self.session.name, "size": m.size,
                "chunk_size": self.volume.chunk_size, "compression": self.archive.compression
                or sorted({_chunk_codec(s, a) for a, (s, d) in list(m.view.items())[:64]
                           if d != 0} - {None}) or None,
                "hash": self.volume.hashtype, "volumes": vols}

    def checks(self, report_to, say):
        if not self.archive.v3:
            return
        for problem in v3_chain_problems(self.archive, self.volume):
            report_to(None)(Problem("checksum", problem))
        self.checked.append("the format-3 metadata hash chain")


def _chunk_codec(session, addr):
    try:
        head = session.stored(addr)[:8]
    except VimageError:
        return None
    return next((name for match, name, _d in CHUNK_CODECS if match(head)), "raw" if head else None)


def v3_chain_problems(archive, volume):
    """Wyng format 3: archive.ini -> volinfo -> info -> manifest.z, and mfcs."""
    import hashlib

    def b64(data):
        return _b64_digest(hashlib.blake2b(data, digest_size=32).digest())
    problems = []
    key = os.path.basename(volume.path)
    if archive.volumes_ini.get(key.lower(), archive.volumes_ini.get(key)) != b64(volume.volinfo_raw):
        problems.append("%s/volinfo does not match its hash in archive.ini" % key)
    merged = {}
    for s in volume.sessions:
        want = volume.volinfo.get(s.name)
        if want is None or want != b64(s.info_raw):
            problems.append("%s/info does not match its hash in volinfo" % s.name)
        if s.manifest_file:
            s.chunks()
            if s.info.get("manifesthash") not in ("0", b64(s.manifest_raw)):
                problems.append("%s/manifest.z does not match its hash in info" % s.name)
        for addr, digest in s.chunks().items():
            merged[addr] = digest
        size = s.volsize()
        if s.info.get("mfcs", "").isdigit() and size:
            C = volume.chunk_size
            last = (size - 1) - ((size - 1) % C)
            text = "".join("%s x%016x\n" % (merged[a], a) for a in sorted(merged) if a <= last)
            if zlib.crc32(text.encode()) != int(s.info["mfcs"]):
                problems.append("%s: the merged manifest does not match info:mfcs" % s.name)
    return problems


BACKUP_SETS.append(detect_chunk_archive)


# ===========================================================================
# Random access into compressed images (for mount)
# ===========================================================================
#
# One sequential pass over the compressed file records seek points: places
# where decoding can start afresh, each with the decompressed offset it
# yields.  A read then decodes only from the nearest point before it; an LRU
# keeps the decoded chunks that file systems read again.  Per codec:
#   gzip   new members; after pigz's sync flushes a raw inflater primed with
#          the last 32 KiB of output (zdict) - savable; elsewhere an in-memory
#          copy of the inflater (zlib's decompressobj().copy()) - not savable
#   bzip2  every block: it starts at a 48-bit magic at any bit offset and is
#          decoded alone as a one-block stream built around it
#   xz     every block listed in the stream index, decoded as a one-block stream
#   zstd   every frame, and blocks inside a frame restarted with the window
#          before them as a dictionary, checked against checksums of the output
#   lz4    every independent block
# A stream without restart points (one xz block, dependent lz4 blocks, lzma,
# lzip, lzop, a zstd --long window that never restarts) is decompressed into
# a cache file instead.

GZIP_SPACING = 4 * MiB           # decompressed bytes between gzip seek points
ZLIB_POINT_COST = 48 * 1024      # memory of one in-memory inflater copy (window + state)
LRU_BYTES = 64 * MiB


class ChunkLRU:
    """Decoded chunks by seek point number, least recently used dropped first."""

    def __init__(self, budget):
        from collections import OrderedDict, namedtuple
        self.budget, self.used, self.items = budget, 0, OrderedDict()
        self.lock = threading.Lock()

    def get(self, key):
        with self.lock:
            value = self.items.get(key)
            if value is not None:
                self.items.move_to_end(key)
            return value

    def put(self, key, value):
        with self.lock:
            old = self.items.get(key)
            if old is not None:
                if len(old) >= len(value):
                    return
                self.used -= len(old)          # a longer decode of the same chunk
            self.items[key] = value
            self.items.move_to_end(key)
            self.used += len(value)
            while self.used > self.budget and len(self.items) > 1:
                _k, old = self.items.popitem(last=False)
                self.used -= len(old)


class SeekIndex:
    """Seek points: decompressed offsets (array) and what each needs to decode."""

    def __init__(self):
        self.offsets = array("Q")
        self.points = []

    def add(self, out_offset, point):
        self.offsets.append(out_offset)
        self.points.append(point)

    def __len__(self):
        return len(self.points)


def _varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(buf, pos):
    n = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ContainerError("xz index is corrupt")
        b = buf[pos]
        n |= (b & 0x7F) << shift
        pos += 1
        shift += 7
        if not b & 0x80:
            return n, pos


class SeekAccess:
    """What the seek-point readers share: the files, the pass's progress, and
    points that can be saved to disk."""

    out_pos = in_pos = 0          # progress of the pass

    def __init__(self, files):
        self.files = files

    def plan(self):
        """'points' when the stream has restart points, else 'cache'."""
        return "points"

    AHEAD = 3                     # points decoded ahead in the pass, side by side

    def run(self, index):
        """The pass for codecs whose points are known before decoding (from
        listed(): point, input offset after it, decoded length or None).  The
        points are independent, so they are decoded side by side on the cores
        (the codecs drop the GIL) and handed over in order."""
        from concurrent.futures import ThreadPoolExecutor
        workers = max(1, min(2, os.cpu_count() or 1))
        with ThreadPoolExecutor(workers) as pool:
            for out in self._run_listed(index, pool):
                yield out

    def _run_listed(self, index, pool):
        out_pos, pending = 0, []
        listed = iter(self.listed())
        while True:
            while len(pending) < self.AHEAD:
                item = next(listed, None)
                if item is None:
                    break
                point, in_end, length = item
                pending.append((point, in_end, length, pool.submit(self.decode, point, length)))
            if not pending:
                break
            point, in_end, length, future = pending.pop(0)
            out = future.result()
            if self.exact and len(out) != length:
                raise ContainerError("%s block at input offset %d decodes to the wrong size"
                                     % (self.name, in_end))
            index.add(out_pos, point)
            out_pos += len(out)
            self.out_pos, self.in_pos = out_pos, in_end
            yield out
        self.size = out_pos

    exact = False                 # listed() lengths are exact (xz's index says so)

    def read_chunk(self, index, i, length):
        """The first `length` bytes of chunk i (from seek point i)."""
        return self.decode(index.points[i], length)

    @staticmethod
    def savable(point):
        return True

    def state(self):
        """What a saved index keeps besides the points (name -> bytes or JSON)."""
        return {}

    def restore(self, state, size):
        pass


class GzipAccess(SeekAccess):
    """gzip, pigz, multi-member: points at members, sync flushes, and spacing."""

    name = "gzip"

    def __init__(self, files, spacing=GZIP_SPACING, budget=256 * MiB):
        SeekAccess.__init__(self, files)
        self.spacing, self.budget = spacing, budget

    def run(self, index):
        """The pass: yields decompressed chunks, adds seek points to index."""
        files, in_pos, out_pos = self.files, 0, 0
        SYNC = b"\x00\x00\xff\xff"
        while True:
            head = files.pread(64, in_pos)
            stripped = head.lstrip(b"\0")
            if not stripped:
                if not head or not files.pread(1, in_pos + len(head)).strip(b"\0"):
                    break
                in_pos += len(head)
                continue
            in_pos += len(head) - len(stripped)
            if not stripped.startswith(b"\x1f\x8b"):
                raise ContainerError("gzip stream: unexpected data at input offset %d" % in_pos)
            dec = zlib.decompressobj(31)
            index.add(out_pos, ("member", in_pos))
            last_point = out_pos
            tail = b""                   # last 32 KiB of output, for window points
            pending = None               # (in, out, window) after a sync marker, to confirm
            while not dec.eof:
                data = files.pread(256 * 1024, in_pos)
                if not data:
                    raise ContainerError("gzip stream is truncated at input offset %d" % in_pos)
                # feed up to each sync marker separately, so the state there is known
                cuts = [m.end() for m in re.finditer(re.escape(SYNC), data)] + [len(data)]
                start = 0
                for cut in cuts:
                    piece = data[start:cut]
                    start = cut
                    while piece and not dec.eof:
                        # stop output where the next in-memory point is due
                        room = last_point + 2 * self.spacing - out_pos
                        try:
                            out = dec.decompress(piece, max(1 << 16, min(CHUNK, room)))
                        except zlib.error as e:
                            raise ContainerError("gzip stream is corrupt near input offset %d: %s"
                                                 % (in_pos, e))
                        used = len(piece) - len(dec.unconsumed_tail)
                        in_pos += used
                        piece = dec.unconsumed_tail
                        if out:
                            if pending is not None:
                                pending = self._confirm(index, pending, out_pos, out)
                            out_pos += len(out)
                            tail = (tail + out)[-32768:]
                            self.out_pos, self.in_pos = out_pos, in_pos
                            yield out
                        if dec.eof:
                            break
                        # at a sync marker a (savable) window point is better
                        at_marker = not piece and cut < len(data)
                        if not at_marker and out_pos - last_point >= 2 * self.spacing:
                            index.add(out_pos, ("zlib", in_pos, dec.copy()))
                            last_point = out_pos
                            self._thin(index)
                    if dec.eof:
                        break
                    if cut < len(data) and pending is None and out_pos - last_point >= self.spacing \
                            and len(tail) == 32768:
                        pending = (in_pos, out_pos, tail)
                        last_point = out_pos
            in_pos -= len(dec.unused_data)
        self.size = out_pos

    def _confirm(self, index, pending, out_pos, out):
        """A sync marker may be chance bytes: keep the point only if a primed raw
        inflater started there gives the same output as the real one."""
        p_in, p_out, window = pending
        if out_pos < p_out:
            return pending
        skip = out_pos - p_out          # output already past the point
        want = out[:4096]
        try:
            d = zlib.decompressobj(-15, zdict=window)
            got = d.decompress(self.files.pread(64 * 1024, p_in), skip + len(want))
        except zlib.error:
            return None
        if got[skip:skip + len(want)] == want and want:
            index.add(p_out, ("window", p_in, window))
            self._thin(index)
        return None

    def _thin(self, index):
        """Keep in-memory points within budget: drop every other one, double spacing."""
        cost = sum(ZLIB_POINT_COST if p[0] == "zlib" else 32768 if p[0] == "window" else 64
                   for p in index.points)
        if cost <= self.budget:
            return
        keep_off, keep = array("Q"), []
        drop = False
        for off, p in zip(index.offsets, index.points):
            if p[0] == "member" or not drop:
                keep_off.append(off)
                keep.append(p)
            if p[0] != "member":
                drop = not drop
        index.offsets, index.points = keep_off, keep
        self.spacing *= 2

    def decode(self, point, length):
        kind, pos = point[0], point[1]
        if kind == "member":
            dec = zlib.decompressobj(31)
        elif kind == "window":
            dec = zlib.decompressobj(-15, zdict=point[2])
        else:
            dec = point[2].copy()          # its unconsumed_tail is stale: read from pos
        parts, have, tail = [], 0, b""
        try:
            while have < length and not dec.eof:
                data = tail or self.files.pread(256 * 1024, pos)
                if not tail:
                    if not data:
                        break
                    pos += len(data)
                out = dec.decompress(data, length - have)
                tail = dec.unconsumed_tail
                parts.append(out)
                have += len(out)
        except zlib.error as e:
            raise ContainerError("gzip data is corrupt near input offset %d: %s" % (pos, e))
        return b"".join(parts)

    @staticmethod
    def savable(point):
        return point[0] != "zlib"


class Bzip2Access(SeekAccess):
    """bzip2 (also lbzip2, pbzip2 multi-stream): every block is a seek point."""

    name = "bzip2"
    BLOCK = 0x314159265359
    END = 0x177245385090

    def __init__(self, files):
        SeekAccess.__init__(self, files)
        self.patterns = [self._patterns(m) for m in (self.BLOCK, self.END)]

    @staticmethod
    def _patterns(magic):
        """For each bit shift, (search key, shift, first byte mask/value, last byte mask/value)."""
        pats = []
        for s in range(8):
            if s == 0:
                pats.append((magic.to_bytes(6, "big"), 0, 0, 0, 0, 0, 0))
                continue
            v = (magic << (8 - s)).to_bytes(7, "big")
            pats.append((v[1:6], s, 0xFF >> s, v[0], (0xFF << (8 - s)) & 0xFF, v[6], 1))
        return pats

    def _find(self, buf, start_bit, which, best=-1):
        """First bit position >= start_bit where the magic starts (before
        `best` when one is known), or -1: the bytes fully inside the magic are
        found in C, the edge bits checked.  Each later bit shift searches only
        up to the best position found so far, so a block costs a few scans of
        itself, not eight of the buffer."""
        for key, s, m0, v0, m6, v6, lead in self.patterns[which]:
            limit = len(buf) if best < 0 else min(len(buf), best // 8 + 8)
            i = buf.find(key, max(0, start_bit // 8 - 1) + lead, limit)
            while i >= 0:
                j = i - lead                     # the byte where the magic starts
                b = j * 8 + s
                ok = j >= 0 and b >= start_bit
                if ok and lead:
                    ok = (buf[j] & m0) == v0 and j + 6 < len(buf) and (buf[j + 6] & m6) == v6
                if ok:
                    if best < 0 or b < best:
                        best = b
                    break
                i = buf.find(key, i + 1, limit)
        return best

    @staticmethod
    def _bits(buf, first, end):
        """The bits [first, end) of buf as an int."""
        x = int.from_bytes(buf[first // 8:(end + 7) // 8], "big")
        x >>= (-end) % 8
        return x & ((1 << (end - first)) - 1)

    def _one_block_stream(self, level, bits, nbits, crc):
        """A valid bzip2 stream holding just this block: header, block, end, CRC."""
        x = (((bits << 48) | self.END) << 32) | crc
        n = nbits + 80
        pad = (-n) % 8
        return b"BZh" + level + (x << pad).to_bytes((n + pad) // 8, "big")

    def _decode_block(self, level, bits, nbits, crc, length=-1):
        try:
            return bz2.BZ2Decompressor().decompress(
                self._one_block_stream(level, bits, nbits, crc), length)
        except (OSError, EOFError, ValueError) as e:
            raise ContainerError("bzip2 block is corrupt: %s" % e)

    AHEAD = 6                    # blocks decoded ahead, side by side on the cores

    def run(self, index):
        """The pass: blocks are found by their magic in the main thread and
        decoded side by side in worker threads (libbz2 drops the GIL), in
        order.  A magic found by chance inside block data shows as a failed
        decode; from there on the blocks are found again one by one."""
        from concurrent.futures import ThreadPoolExecutor
        workers = max(1, min(2, os.cpu_count() or 1))
        with ThreadPoolExecutor(workers) as pool:
            for out in self._run(index, pool):
                yield out

    def _run(self, index, pool):
        files, base, out_pos = self.files, 0, 0
        while True:
            head = files.pread(4, base)
            if len(head) < 4 or not head.startswith(b"BZh"):
                if head.strip(b"\0") and base:
                    raise ContainerError("bzip2 stream: unexpected data at input offset %d" % base)
                if not base:
                    raise ContainerError("bzip2 stream is empty")
                break
            level = head[3:4]
            scan = _BlockScan(self, files, base)
            combined, pending = 0, []          # [(first bit, nbits, crc, future)]
            while True:
                while len(pending) < self.AHEAD and not scan.ended:
                    found = scan.next_block()
                    if found is None:
                        break
                    first, nbits, crc, data, shift = found
                    pending.append((first, nbits, crc, pool.submit(
                        self._decode_from, level, data, shift, nbits, crc)))
                if not pending:
                    break
                first, nbits, crc, future = pending.pop(0)
                try:
                    out = future.result()
                except ContainerError:
                    # the block's end was a chance magic: find it again, and
                    # everything after it
                    for item in pending:
                        item[3].cancel()
                    pending = []
                    out, nbits = scan.redo(first, level, crc)
                index.add(out_pos, ("bz2", level, first, nbits, crc))
                combined = (((combined << 1) | (combined >> 31)) & M32) ^ crc
                out_pos += len(out)
                self.out_pos, self.in_pos = out_pos, (first + nbits) // 8
                yield out
            if scan.stream_crc != combined:
                raise ContainerError("bzip2 stream CRC mismatch at input offset %d" % scan.end_at)
            base = scan.next_stream
        self.size = out_pos

    def _decode_from(self, level, data, shift, nbits, crc):
        return self._decode_block(level, self._bits(data, shift, shift + nbits), nbits, crc)

    def decode(self, point, length):
        _kind, level, first, nbits, crc = point
        buf = self.files.pread((first % 8 + nbits + 7) // 8, first // 8)
        return self._decode_block(level, self._bits(buf, first % 8, first % 8 + nbits), nbits, crc,
                                  length)


class _BlockScan:
    """Finds the blocks of one bzip2 stream by their magic, in order: each
    (first bit in the file, bits, CRC, bytes holding it, bit offset in them)."""

    def __init__(self, access, files, base):
        self.access, self.files = access, files
        self.buf_off = base                       # input byte offset of buf[0]
        self.buf = files.pread(2 * MiB, base)
        self.pos = 32                             # bit of buf where the next magic sits
        self.ended = False
        self.stream_crc = self.end_at = self.next_stream = None

    def _more(self):
        more = self.files.pread(2 * MiB, self.buf_off + len(self.buf))
        if not more:
            raise ContainerError("bzip2 stream is truncated at input offset %d"
                                 % (self.buf_off + len(self.buf)))
        self.buf += more

    def _next_magic(self, start):
        """The first BLOCK or END magic at or after bit `start` of buf."""
        a = self.access
        while True:
            best = a._find(self.buf, start, 1, a._find(self.buf, start, 0))
            # the END magic needs its CRC in the buffer too
            if best >= 0 and best + 80 <= len(self.buf) * 8:
                return best
            self._more()

    def next_block(self):
        a, buf = self.access, None
        while self.pos + 80 > len(self.buf) * 8:
            self._more()
        buf, pos = self.buf, self.pos
        value = a._bits(buf, pos, pos + 48)
        if value == a.END:
            self.stream_crc = a._bits(buf, pos + 48, pos + 80)
            self.end_at = self.buf_off + pos // 8
            self.next_stream = self.buf_off + (pos + 80 + 7) // 8
            self.ended = True
            return None
        if value != a.BLOCK:
            raise ContainerError("bzip2 stream is corrupt at input offset %d"
                                 % (self.buf_off + pos // 8))
        nxt = self._next_magic(pos + 48)
        buf = self.buf
        crc = a._bits(buf, pos + 48, pos + 80)
        lo = pos // 8
        data = buf[lo:(nxt + 7) // 8]
        first = self.buf_off * 8 + pos
        self._advance(nxt)
        return first, nxt - pos, crc, data, pos - lo * 8

    def _advance(self, nxt):
        drop = nxt // 8
        self.buf, self.buf_off, self.pos = self.buf[drop:], self.buf_off + drop, nxt - drop * 8

    def redo(self, first, level, crc):
        """Decode the block at bit `first` again, trying later magics as its
        end; (output, bits).  The scan then goes on after it."""
        a = self.access
        start = first // 8
        self.buf, self.buf_off = self.files.pread(2 * MiB, start), start
        pos = first - start * 8
        nxt = self._next_magic(pos + 48)
        for _try in range(8):
            try:
                out = a._decode_block(level, a._bits(self.buf, pos, nxt), nxt - pos, crc)
                self._advance(nxt)
                self.ended = False
                return out, nxt - pos
            except ContainerError:
                nxt = self._next_magic(nxt + 1)
        raise ContainerError("bzip2 block at input offset %d is corrupt" % start)


class XzAccess(SeekAccess):
    """xz with several blocks or streams: the stream indexes list every block."""

    name = "xz"
    blocks = None

    def _parse(self):
        """[(stream flags, block offset, padded size, unpadded size, decompressed size)]."""
        files, end, blocks = self.files, self.files.size, []
        while end > 0:
            while end >= 4 and files.pread(4, end - 4) == b"\0\0\0\0":
                end -= 4                                      # stream padding
            if end < 24:
                break
            footer = files.pread(12, end - 12)
            if footer[10:12] != b"YZ":
                raise ContainerError("xz stream footer not found")
            backward, flags = struct.unpack_from("<I2s", footer, 4)
            isize = (backward + 1) * 4
            if zlib.crc32(footer[4:10]) != struct.unpack_from("<I", footer, 0)[0] or isize > end:
                raise ContainerError("xz stream footer is corrupt")
            idx = files.pread(isize, end - 12 - isize)
            if idx[0] != 0 or zlib.crc32(idx[:-4]) != struct.unpack_from("<I", idx, isize - 4)[0]:
                raise ContainerError("xz index is corrupt")
            count, pos = _read_varint(idx, 1)
            recs = []
            for _ in range(count):
                unpadded, pos = _read_varint(idx, pos)
                usize, pos = _read_varint(idx, pos)
                recs.append((unpadded, usize))
            total = sum((u + 3) & ~3 for u, _ in recs)
            start = end - 12 - isize - total - 12
            if start < 0:
                raise ContainerError("xz index does not fit the file")
            header = files.pread(12, start)
            if not header.startswith(b"\xfd7zXZ\x00") or header[6:8] != flags:
                raise ContainerError("xz stream header not found where the index says")
            off, stream_blocks = start + 12, []
            for unpadded, usize in recs:
                stream_blocks.append((flags, off, (unpadded + 3) & ~3, unpadded, usize))
                off += (unpadded + 3) & ~3
            blocks[:0] = stream_blocks
            end = start
        self.blocks = blocks

    def plan(self):
        self._parse()
        return "points" if len(self.blocks) > 1 else "cache"

    exact = True

    def listed(self):
        for block in self.blocks:
            yield ("xz",) + block, block[1] + block[2], block[4]

    def decode(self, point, length):
        _kind, flags, offset, padded, unpadded, usize = point
        head = b"\xfd7zXZ\x00" + flags + struct.pack("<I", zlib.crc32(flags))
        idx = b"\x00" + _varint(1) + _varint(unpadded) + _varint(usize)
        idx += b"\0" * ((-len(idx)) % 4)
        idx += struct.pack("<I", zlib.crc32(idx))
        tail = struct.pack("<I", len(idx) // 4 - 1) + flags
        stream = head + self.files.pread(padded, offset) + idx + \
            struct.pack("<I", zlib.crc32(tail)) + tail + b"YZ"
        try:
            return lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(stream, length)
        except lzma.LZMAError as e:
            raise ContainerError("xz block at input offset %d is corrupt: %s" % (offset, e))


def next_frame(files, pos, magic, what):
    """(offset, first 18 bytes) of the next frame with `magic` from pos on,
    past skippable frames (zstd and lz4 share them); (None, None) at the end."""
    while pos < files.size:
        head = files.pread(18, pos)
        (found,) = struct.unpack_from("<I", head + b"\0" * 4, 0)
        if 0x184D2A50 <= found <= 0x184D2A5F:
            pos += 8 + struct.unpack_from("<I", head + b"\0" * 8, 4)[0]
        elif found == magic:
            return pos, head
        elif not head.strip(b"\0"):
            break
        else:
            raise ContainerError("%s stream: unexpected data at input offset %d" % (what, pos))
    return None, None


# --- zstd: frames, and restart points inside a frame -----------------------
#
# A frame (RFC 8878) is a header (magic, descriptor byte, window descriptor
# unless single-segment, dictionary id, content size) and blocks, each after
# a 3-byte little-endian header: bit 0 last block, bits 1-2 type (0 raw,
# 1 RLE: one byte repeated, 2 compressed), bits 3-23 size; a 4-byte checksum
# ends the frame when its descriptor says so.  A compressed block starts
# with its literals section (type in bits 0-1 of the first byte: 3 =
# Treeless, the Huffman table of an earlier block) and then its sequences
# section (count, then one byte of modes for literal lengths, offsets and
# match lengths in bits 7-6, 5-4, 3-2: 3 = Repeat, the table of the last
# block that had sequences).
#
# `zstd -T0` writes one frame, so inside it: a block that reuses no table
# can start a synthetic frame (the same window descriptor; no checksum, no
# content size) decoded with the last window of output before it as a
# raw-content dictionary.  Its repeat offsets start at 1, 4, 8, which the
# real ones may not be, so a candidate is decoded beside the real decoder in
# the pass until it has matched for a while (for a whole spacing where the
# kept window is shorter than the real one: --long), and block headers then
# tell if a later block reuses a table from before it.  A checksum of every
# piece of output (XXH3-64 with the xxhash package, else CRC-32) lets each
# read from such a point check its bytes; a point that gives other bytes is
# dropped for the one before it.

ZSTD_MAGIC = 0xFD2FB528
ZSTD_SPACING = 16 * MiB         # decompressed bytes between restart points, before thinning
ZSTD_DICT_CAP = 8 * MiB         # the most of a window kept per point (--long windows are bigger)
ZSTD_PIECE = MiB                # decompressed bytes per checksum of the pass's check list
ZSTD_CHECK = 64 * 1024          # a candidate must reproduce this much output in the pass,
ZSTD_CHECK_MAX = MiB            # and this much when its tables are not all its own by then
ZSTD_PROBE = 256 * 1024         # the window a candidate is first decoded with
ZSTD_RETRY_LONG = MiB           # output after a failed candidate before the next, there
ZSTD_BUF = MiB                  # compressed bytes read at a time
ZSTD_NO_POINTS = 64 * MiB       # a frame this large without a restart point: use the cache file
ZSTD_SYNTHETIC = b"\x28\xb5\x2f\xfd\x00"   # magic, descriptor: no checksum, size or dictionary


class Packed(bytes):
    """Bytes already compressed: a saved index stores them as they are."""


def _zstd_module():
    """zstandard, else pyzstd (MissingDependency if neither)."""
    module = optional_module("zstandard") or optional_module("pyzstd")
    if module is None:
        need_module("zstandard", "reading zstd-compressed images")
    return module


def _zstd_decoder(window=None, reader=False):
    """A zstd decoder whose decompress(data) returns all the output data
    gives; window: a raw-content dictionary.  reader: zstandard's own
    decompressor instead, for _zstd_read."""
    z = _zstd_module()
    if z.__name__ == "zstandard":
        d = z.ZstdCompressionDict(window, dict_type=z.DICT_TYPE_RAWCONTENT) \
            if window is not None else None
        dec = z.ZstdDecompressor(dict_data=d, max_window_size=1 << z.WINDOWLOG_MAX)
        return dec if reader else dec.decompressobj(write_size=MiB)
    d = z.ZstdDict(bytes(window), is_raw=True) if window is not None else None
    return z.ZstdDecompressor(d, {z.DParameter.windowLogMax: z.DParameter.windowLogMax.bounds()[1]})


def _zstd_decompress(data):
    """One whole zstd frame (a Wyng chunk or metadata file), decoded."""
    try:
        return _zstd_decoder().decompress(data)
    except MissingDependency:
        raise
    except Exception as e:
        raise ContainerError("zstd frame is corrupt: %s" % e)


class _ZstdInput:
    """A frame's header, then the input from `start` on, as a file to read."""

    def __init__(self, files, first, start):
        self.files, self.first, self.pos = files, first, start

    def read(self, n):
        if self.first:
            data, self.first = self.first, b""
            return data
        data = self.files.pread(n, self.pos)
        self.pos += len(data)
        return data


def _zstd_read(dec, source, length):
    """Up to `length` bytes of one frame, decoded into a single buffer."""
    buf = bytearray(length)
    view, have = memoryview(buf), 0
    with dec.stream_reader(source, read_size=512 * 1024, read_across_frames=False) as reader:
        while have < length:
            n = reader.readinto(view[have:])
            if not n:
                break
            have += n
    del view
    if have < length:
        del buf[have:]
    return buf


def _zstd_packer():
    """What _zstd_pack compresses with (one per thread)."""
    z = _zstd_module()
    return z.ZstdCompressor(level=1) if z.__name__ == "zstandard" else None


def _zstd_pack(parts, keep, packer):
    """The last `keep` bytes of parts, as a window is kept in memory: zstd
    level 1 (fast; it releases the GIL, and runs in the pass's thread)."""
    total = sum(len(p) for p in parts)
    skip, n = max(0, total - keep), min(total, keep)
    c = packer.compressobj(size=n) if packer is not None else _zstd_module().ZstdCompressor(1)
    out = []
    for part in parts:
        if skip >= len(part):
            skip -= len(part)
            continue
        out.append(c.compress(memoryview(part)[skip:] if skip else part))
        skip = 0
    out.append(c.flush())
    return Packed(b"".join(out))


def _zstd_unpack(data):
    z = _zstd_module()
    if z.__name__ != "zstandard":
        return z.decompress(data)
    if len(data) > 4 and data[4] & 0xE0:       # a content size: one call into one buffer
        return z.ZstdDecompressor().decompress(data)
    return z.ZstdDecompressor().decompressobj().decompress(data)    # pyzstd wrote it


def _check_kind():
    """The checksum of the pieces of output: XXH3-64 (~50 GB/s) with the
    xxhash package, else CRC-32 (~3 GB/s)."""
    xxhash = optional_module("xxhash")
    return "xxh3" if xxhash is not None and hasattr(xxhash, "xxh3_64") else "crc32"


def _check_sum(kind, parts):
    if kind == "xxh3":
        h = optional_module("xxhash").xxh3_64()
        for part in parts:
            h.update(part)
        return h.intdigest()
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    return crc


def _zstd_frame_header(head, pos):
    """(header size, window descriptor byte, window size, checksum flag) of a frame."""
    fhd = head[4] if len(head) > 4 else 0
    single, checksum, did, fcs = fhd >> 5 & 1, fhd >> 2 & 1, fhd & 3, fhd >> 6
    size = 5 + (0 if single else 1) + (0, 1, 2, 4)[did] + ((1 if single else 0), 2, 4, 8)[fcs]
    if fhd & 0x08 or len(head) < size:
        raise ContainerError("zstd frame header is corrupt at input offset %d" % pos)
    if did and int.from_bytes(head[6 - single:6 - single + (0, 1, 2, 4)[did]], "little"):
        raise ContainerError("zstd frame at input offset %d needs a dictionary" % pos)
    if single:                  # window = content size: the smallest descriptor that holds it
        content = int.from_bytes(head[size - (1, 2, 4, 8)[fcs]:size], "little") + \
            (256 if fcs == 1 else 0)
        exp = max(0, (max(content, 1) - 1).bit_length() - 10)
        return size, exp << 3, 1 << (10 + exp), checksum
    wd = head[5]
    base = 1 << (10 + (wd >> 3))
    return size, wd, base + (base >> 3) * (wd & 7), checksum


def _zstd_blocks(files, pos, bufsize=ZSTD_BUF):
    """(input offset, type, the whole block) of each block from pos to the
    frame's last: 3-byte headers read from large reads of the input."""
    buf, base = b"", pos
    while True:
        at = pos - base
        if at + 3 > len(buf):
            buf, base, at = files.pread(bufsize, pos), pos, 0
            if len(buf) < 3:
                raise ContainerError("zstd stream is truncated at input offset %d" % pos)
        v = buf[at] | buf[at + 1] << 8 | buf[at + 2] << 16
        btype, n = v >> 1 & 3, 3 + (1 if v & 6 == 2 else v >> 3)
        if btype == 3:
            raise ContainerError("zstd block at input offset %d is corrupt" % pos)
        if at + n > len(buf):
            buf, base, at = files.pread(max(bufsize, n), pos), pos, 0
            if len(buf) < n:
                raise ContainerError("zstd stream is truncated at input offset %d" % pos)
        yield pos, btype, memoryview(buf)[at:at + n]
        pos += n
        if v & 1:
            return


def _zstd_tables(block):
    """(literals type, number of sequences, (LL, OF, ML modes)) of a
    compressed block, from its two section headers; None if cut short."""
    try:
        b0 = block[3]
        lt, sf = b0 & 3, b0 >> 2 & 3
        if lt < 2:                              # raw or RLE literals: 1, 2 or 3 header bytes
            hs = (1, 2, 1, 3)[sf]
            size = b0 >> 3 if hs == 1 else int.from_bytes(block[3:3 + hs], "little") >> 4
            at = hs + (size if lt == 0 else 1)
        else:                                   # Huffman-coded: 3, 3, 4 or 5 header bytes
            hs, bits = ((3, 10), (3, 10), (4, 14), (5, 18))[sf]
            at = hs + (int.from_bytes(block[3:3 + hs], "little") >> (4 + bits) & ((1 << bits) - 1))
        nb = block[3 + at]
        if nb == 0:
            return lt, 0, ()
        m = block[3 + at + (1 if nb < 128 else 2 if nb < 255 else 3)]
        return lt, nb, (m >> 6, m >> 4 & 3, m >> 2 & 3)
    except IndexError:
        return None


def _zstd_candidate(btype, block):
    """A block that reuses no table: raw, RLE, or compressed without Treeless
    literals or a Repeat mode."""
    if btype != 2:
        return True
    tables = _zstd_tables(block)
    return tables is not None and tables[0] != 3 and 3 not in tables[2]


class _Trial:
    """A candidate restart point: decoded beside the real decoder for a while,
    then followed by block headers until every table is its own.  Raw and
    RLE blocks decode the same in any state: its decoder starts at the first
    compressed block, with the window before that block, first only its last
    ZSTD_PROBE bytes (a shorter history gives the same bytes or an error,
    never other bytes; on an error it starts again with the whole window)."""

    def __init__(self, out_pos, in_pos, wd, keep, parts, exact):
        self.out_pos, self.in_pos, self.wd, self.keep = out_pos, in_pos, wd, keep
        self.parts = parts                      # output before the point: its window
        self.exact = exact                      # the window kept is the whole history it needs
        self.dec = self.base = None
        self.probe, self.fed = False, []
        self.matched = 0
        self.point = None
        self.riders = []                        # provisional points that stand or fall with it
        self.fresh = True                       # no sequences yet: repeat offsets untested
        self.huffman = False
        self.fse = [False, False, False]        # LL, OF, ML tables defined since the start

    def _decoder(self, size):
        dec = _zstd_decoder(_tail_window(self.base, size))
        dec.decompress(ZSTD_SYNTHETIC + bytes([self.wd]))
        return dec

    def feed(self, btype, block, want, tail):
        """Decode the next block; False when it gives other bytes than `want`."""
        if self.dec is None and btype != 2:
            self.matched += len(want)
            return True
        try:
            if self.dec is None:
                self.base = list(tail) if self.matched else self.parts
                self.probe = self.exact and self.keep > ZSTD_PROBE
                self.dec = self._decoder(ZSTD_PROBE if self.probe else self.keep)
            got = self.dec.decompress(block)
        except Exception:
            if not self.probe or self.fed is None:
                return False
            self.probe = False
            try:
                self.dec = self._decoder(self.keep)
                for b, w in self.fed:
                    if self.dec.decompress(b) != w:
                        return False
                got = self.dec.decompress(block)
            except Exception:
                return False
        if got != want or not self.track(btype, block):
            return False
        if self.probe and self.fed is not None:
            self.fed.append((block, want))
            if len(self.fed) > 32:
                self.fed = None                 # too far along to start again
        self.matched += len(want)
        return True

    def track(self, btype, block):
        """False when this block reuses a table from before the start."""
        if btype != 2:
            return True
        tables = _zstd_tables(block)
        if tables is None or tables[0] == 3 and not self.huffman:
            return False
        self.huffman = self.huffman or tables[0] == 2
        if tables[1]:
            self.fresh = False
            for k, mode in enumerate(tables[2]):
                if mode != 3:
                    self.fse[k] = True
                elif not self.fse[k]:
                    return False
        return True

    def settled(self):
        return self.huffman and all(self.fse)


def _tail_window(parts, keep):
    """The last `keep` bytes of output (parts: the last outputs, in order)."""
    have, k = 0, len(parts)
    while k and have < keep:
        k -= 1
        have += len(parts[k])
    window = b"".join(parts[k:])
    return memoryview(window)[max(0, len(window) - keep):]


class _Finder:
    """The restart points of one frame, found as its blocks go by.

    One trial runs at a time, from the first candidate block once a point is
    due.  It is accepted when it has matched ZSTD_CHECK bytes and its tables
    are all its own (or ZSTD_CHECK_MAX bytes; a whole spacing where the kept
    window is short), and then followed by headers until its tables settle:
    a block that reuses an older table drops it.  Raw and RLE blocks (and
    blocks without sequences) leave the repeat offsets alone: points in a run
    of them are provisional until the first block with sequences, which every
    decoder started in the run meets in the same state; they are dropped
    together if the trial started right after them fails, and ride along
    with it once it is accepted.  A dropped point's output joins the chunk
    before it, so points are followed until the last one is final.
    (Where the kept window is short, a decoder started later, with a later
    window, sees less history than the point's own: it errs only on the
    safe side.)"""

    def __init__(self, access, index, out_pos, wd, wsize):
        self.access, self.index = access, index
        self.wd, self.keep = wd, min(wsize, ZSTD_DICT_CAP)
        self.whole = self.keep == wsize
        self.start = self.last = self.retry = out_pos
        self.trial = None
        self.watches, self.provisional = [], []
        self.found = 0

    def before(self, out_pos, bpos, btype, block, tail):
        """Start a trial at this block if a point is due and it is a candidate."""
        if self.trial is not None or out_pos - self.last < self.access.spacing_for(self.keep) \
                or out_pos == self.start or out_pos < self.retry:
            return
        if not _zstd_candidate(btype, block):
            self._drop(self.provisional)        # it reuses a table they do not have
            return
        exact = self.whole or out_pos - self.start <= self.keep
        self.access._cut(out_pos)
        self.trial = _Trial(out_pos, bpos, self.wd, self.keep, list(tail), exact)

    def after(self, btype, block, out, tail):
        """Check the block's output from the trial, and the watched tables."""
        if self.watches:
            for w in list(self.watches):
                if not w.track(btype, block):
                    self._drop([w.point] + w.riders)
                if w.point is None or w.settled():
                    self.watches.remove(w)
            last = self.index.points[-1]
            if not any(last is p.point for p in self.watches) and \
                    not any(last is p for p in self.provisional):
                self.watches = []               # the chunks before it end there for good
        t = self.trial
        if t is None:
            return
        if not t.feed(btype, block, out, tail):
            self._drop(self.provisional)        # it started in their state
            if not t.exact:                     # a long trial costs a whole window to set up
                self.retry = t.out_pos + t.matched + ZSTD_RETRY_LONG
            self.trial = None
            return
        spacing = self.access.spacing_for(self.keep)
        if t.fresh:
            if t.matched >= spacing:
                self._accept(t)
                self.provisional.append(t.point)
        elif t.matched >= (ZSTD_CHECK_MAX if t.exact else spacing) or \
                t.exact and t.matched >= ZSTD_CHECK and t.settled():
            self._accept(t)
            t.riders, self.provisional = self.provisional, []
            if not t.settled():
                self.watches.append(t)

    def _accept(self, t):
        self.access._accept(self.index, t)
        self.last, self.found = t.out_pos, self.found + 1
        t.dec = t.parts = t.base = t.fed = self.trial = None

    def _drop(self, points):
        """Take points that turned out wrong out of the index."""
        index = self.index
        for p in points:
            for k in range(len(index.points) - 1, 0, -1):
                if index.points[k] is p:
                    del index.offsets[k]
                    del index.points[k]
                    self.found -= 1
                    break
            for w in self.watches:
                if w.point is p:
                    w.point = None
        self.last = max(self.start, index.offsets[-1])
        del points[:]


class ZstdAccess(SeekAccess):
    """zstd: every frame, and restart points inside large frames."""

    name = "zstd"

    def __init__(self, files, spacing=ZSTD_SPACING, budget=256 * MiB):
        SeekAccess.__init__(self, files)
        self.spacing, self.budget = spacing, budget
        self.check = _check_kind()
        self.cuts, self.sums = array("Q"), array("Q")    # a checksum per piece of output
        self.bad = set()                                # point numbers that gave other bytes
        self.hopeless = False

    def plan(self):
        """'points'; for a window longer than what a point keeps (--long),
        only if the first ZSTD_NO_POINTS of output hold a point that checks."""
        pos, head = next_frame(self.files, 0, ZSTD_MAGIC, "zstd")
        if pos is None:
            raise ContainerError("zstd stream has no frame")
        if _zstd_frame_header(head, pos)[2] <= ZSTD_DICT_CAP:
            return "points"
        index = SeekIndex()
        trial = self.run(index)
        try:
            for _chunk in trial:
                if any(p[0] == "block" for p in index.points):
                    return "points"
                if self.out_pos >= ZSTD_NO_POINTS:
                    return "cache"
        except ContainerError:
            pass                        # the pass says so again
        finally:
            trial.close()
            self.out_pos = self.in_pos = 0
        return "points"

    windows = 4                   # points are at least this many kept windows apart

    def spacing_for(self, keep):
        """Output between points (thinning doubles it)."""
        return max(self.spacing, self.windows * keep)

    # --- the pass ---------------------------------------------------------
    def run(self, index):
        """Yields decompressed blocks; adds frame starts and checked restart
        points to index, and a checksum of every piece of output."""
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor
        files, pos, out_pos = self.files, 0, 0
        self.cuts, self.sums = array("Q"), array("Q")
        self.piece_start, self.piece = 0, []
        # windows are compressed, and pieces summed, in a thread as decoding goes on
        self.pool, self.packing, self.summing = ThreadPoolExecutor(1), deque(), deque()
        self.packer = _zstd_packer()            # used by that one thread only
        self.next_thin = 16
        try:
            while True:
                pos, head = next_frame(files, pos, ZSTD_MAGIC, "zstd")
                if pos is None:
                    break
                hsize, wd, wsize, checksum = _zstd_frame_header(head, pos)
                self._cut(out_pos)
                index.add(out_pos, ("frame", pos))
                finder = _Finder(self, index, out_pos, wd, wsize)
                keep, frame_start = finder.keep, out_pos
                dec = _zstd_decoder()
                tail, tail_len = deque(), 0
                try:
                    dec.decompress(head[:hsize])
                    for bpos, btype, block in _zstd_blocks(files, pos + hsize):
                        finder.before(out_pos, bpos, btype, block, tail)
                        out = dec.decompress(block)
                        finder.after(btype, block, out, tail)
                        if not out:
                            continue
                        out_pos += len(out)
                        self.piece.append(out)
                        if out_pos - self.piece_start >= ZSTD_PIECE:
                            self._cut(out_pos)
                        tail.append(out)
                        tail_len += len(out)
                        while tail_len - len(tail[0]) >= keep:
                            tail_len -= len(tail.popleft())
                        self.out_pos, self.in_pos = out_pos, bpos + len(block)
                        yield out
                    end = bpos + len(block)
                    if checksum:
                        tail_bytes = files.pread(4, end)
                        if len(tail_bytes) < 4:
                            raise ContainerError("zstd stream is truncated at input offset %d" % end)
                        dec.decompress(tail_bytes)        # checks the frame's XXH64
                        end += 4
                except ContainerError:
                    raise
                except Exception as e:
                    raise ContainerError("zstd frame at input offset %d is corrupt: %s" % (pos, e))
                if out_pos - frame_start >= ZSTD_NO_POINTS and finder.found <= 0:
                    self.hopeless = True
                pos = self.in_pos = end
            self.size = out_pos
        finally:
            self._settle(index)

    def _settle(self, index):
        """The pass is over (or stopped): collect the thread's work."""
        self._cut(self.out_pos)
        self.cuts.append(self.piece_start)
        self.pool.shutdown(wait=True)
        self.sums.extend(job.result() for job in self.summing)
        self.summing.clear()
        keep_off, keep = array("Q"), []
        for off, p in zip(index.offsets, index.points):
            if p[0] == "block" and not isinstance(p[3], bytes):
                try:
                    p = p[:3] + (p[3].result(),)
                except MemoryError:
                    continue                    # no window, no point
            keep_off.append(off)
            keep.append(p)
        index.offsets, index.points = keep_off, keep
        self.packing.clear()
        self._thin(index)

    def _cut(self, at):
        """End the checksummed piece at decompressed offset `at` (a point may
        start there); CRC-32s are computed in the thread, a few pieces behind."""
        if at > self.piece_start:
            self.cuts.append(self.piece_start)
            if self.check != "crc32":
                self.sums.append(_check_sum(self.check, self.piece))
            else:
                while len(self.summing) >= 32:
                    self.sums.append(self.summing.popleft().result())
                self.summing.append(self.pool.submit(_check_sum, self.check, self.piece))
            self.piece_start, self.piece = at, []

    def _accept(self, index, trial):
        while len(self.packing) >= 4:              # a few windows wait at most
            self.packing.popleft().result()
        job = self.pool.submit(_zstd_pack, trial.parts, trial.keep, self.packer)
        self.packing.append(job)
        trial.point = ("block", trial.in_pos, trial.wd, job)
        index.add(trial.out_pos, trial.point)
        if len(index) >= self.next_thin:
            self.next_thin = len(index) + max(16, len(index) // 8)
            self._thin(index)

    def memory(self, index):
        """Bytes the points take (windows as compressed; estimated while in work)."""
        total = 16 * len(self.sums) + 100 * len(index)
        for p in index.points:
            if p[0] == "block":
                w = p[3]
                total += len(w) if isinstance(w, bytes) else \
                    len(w.result()) if w.done() else ZSTD_DICT_CAP // 2
        return total

    def _thin(self, index):
        """Keep the windows within budget: drop every other restart point, double spacing."""
        while self.memory(index) > self.budget and any(p[0] == "block" for p in index.points):
            keep_off, keep = array("Q"), []
            drop = False
            for off, p in zip(index.offsets, index.points):
                if p[0] == "frame" or not drop:
                    keep_off.append(off)
                    keep.append(p)
                if p[0] != "frame":
                    drop = not drop
            index.offsets, index.points = keep_off, keep
            self.spacing *= 2

    # --- reads ------------------------------------------------------------
    def decode(self, point, length):
        if point[0] == "frame":
            pos = point[1]
            head = self.files.pread(18, pos)
            hsize = _zstd_frame_header(head, pos)[0]
            dec, first, start = _zstd_decoder(reader=True), head[:hsize], pos + hsize
        else:
            _kind, start, wd, packed = point
            try:
                dec = _zstd_decoder(_zstd_unpack(packed), reader=True)
            except MissingDependency:
                raise
            except Exception as e:
                raise ContainerError("zstd restart window is corrupt: %s" % e)
            first = ZSTD_SYNTHETIC + bytes([wd])
        try:
            if hasattr(dec, "stream_reader"):
                return _zstd_read(dec, _ZstdInput(self.files, first, start), length)
            parts, have = [dec.decompress(first)], 0
            for _pos, _t, block in _zstd_blocks(self.files, start, min(ZSTD_BUF, length // 2 + 4096)):
                out = dec.decompress(block)
                parts.append(out)
                have += len(out)
                if have >= length:
                    break
        except ContainerError:
            raise
        except Exception as e:
            raise ContainerError("zstd data near input offset %d is corrupt: %s" % (start, e))
        return b"".join(parts)

    def read_chunk(self, index, i, length):
        """The first `length` bytes of chunk i.  Output from a restart point
        is checked piece by piece against the pass's checksums; a point that
        gives other bytes (or none) is dropped for the one before it."""
        offs, cuts, j = index.offsets, self.cuts, i
        while True:
            while j in self.bad:
                j -= 1
            point, skip = index.points[j], offs[i] - offs[j]
            if point[0] == "frame":
                return self.decode(point, skip + length)[skip:]
            # decode to the end of the piece the last wanted byte is in
            k = bisect.bisect_left(cuts, offs[j])
            last = bisect.bisect_left(cuts, offs[i] + length, k)
            if k >= len(self.sums) or cuts[k] != offs[j] or last >= len(cuts):
                self.bad.add(j)                 # not in the check list: not trusted
                continue
            try:
                out = self.decode(point, cuts[last] - offs[j])
            except ContainerError:
                out = b""
            if len(out) >= cuts[last] - offs[j]:
                view = memoryview(out)
                if all(_check_sum(self.check, [view[cuts[p] - offs[j]:cuts[p + 1] - offs[j]]])
                       == self.sums[p] for p in range(k, last)):
                    del view
                    return out[skip:] if skip else out
            self.bad.add(j)

    # --- saved with the index ---------------------------------------------
    def state(self):
        cuts, sums = array("Q", self.cuts), array("Q", self.sums)
        if sys.byteorder == "big":
            cuts.byteswap()
            sums.byteswap()
        return {"check": self.check, "cuts": cuts.tobytes(), "sums": sums.tobytes()}

    def restore(self, state, size):
        if state["check"] != self.check:
            raise ValueError("the index was checked with %s" % state["check"])
        cuts, sums = array("Q"), array("Q")
        cuts.frombytes(state["cuts"])
        sums.frombytes(state["sums"])
        if sys.byteorder == "big":
            cuts.byteswap()
            sums.byteswap()
        if len(cuts) != len(sums) + 1 or cuts[-1] != size:
            raise ValueError("the check list does not fit")
        self.cuts, self.sums = cuts, sums


class Lz4Access(SeekAccess):
    """lz4 frames with independent blocks (the lz4 command's default)."""

    name = "lz4"
    BLOCK_MAX = {4: 64 << 10, 5: 256 << 10, 6: 1 << 20, 7: 4 << 20}

    def _blocks(self):
        files, pos, blocks, independent = self.files, 0, [], True
        while True:
            pos, head = next_frame(files, pos, 0x184D2204, "lz4")
            if pos is None:
                break
            flg, bd = head[4], head[5]
            independent = independent and bool(flg & 0x20)
            bmax = self.BLOCK_MAX.get(bd >> 4 & 7)
            if bmax is None:
                raise ContainerError("lz4 frame header is corrupt at input offset %d" % pos)
            p = pos + 7 + (8 if flg & 0x08 else 0) + (4 if flg & 0x01 else 0)
            while True:
                word = files.pread(4, p)
                if len(word) < 4:
                    raise ContainerError("lz4 stream is truncated at input offset %d" % p)
                (v,) = struct.unpack("<I", word)
                p += 4
                if v == 0:
                    break
                size = v & 0x7FFFFFFF
                blocks.append((p, size, bool(v >> 31), bmax))
                p += size + (4 if flg & 0x10 else 0)
            pos = p + (4 if flg & 0x04 else 0)
        self.blocks = blocks
        return independent

    def plan(self):
        return "points" if self._blocks() and len(self.blocks) > 1 else "cache"

    def listed(self):
        for block in self.blocks:
            yield ("lz4",) + block, block[0] + block[1], block[3]

    def decode(self, point, length):
        _kind, offset, size, stored, bmax = point
        data = self.files.pread(size, offset)
        if stored:
            return data
        block = need_module("lz4.block", "reading lz4-compressed images", "lz4")
        try:
            return block.decompress(data, uncompressed_size=bmax)
        except Exception as e:
            raise ContainerError("lz4 block at input offset %d is corrupt: %s" % (offset, e))


RANDOM_ACCESS = {   # codec name -> its seek-point reader; others use the cache file
    "gzip": GzipAccess,
    "bzip2": Bzip2Access,
    "xz": XzAccess,
    "zstd": ZstdAccess,
    "lz4": Lz4Access,
}


def cache_dir(path=None):
    if path:
        return path
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vimage")


def private_dir(path):
    """Create `path` (mode 0700) or check an existing one: indexes and cache
    files hold decoded image data, so nobody else may write (or plant) them."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.stat(path)
    except OSError as e:
        raise VimageError("cannot use the cache directory %s: %s" % (path, e.strerror))
    if st.st_mode & 0o022:
        raise VimageError("the cache directory %s is writable by %s; refusing to keep image "
                          "data there (chmod go-w it, or choose another with --cache-dir)"
                          % (path, "others" if st.st_mode & 0o002 else "its group"))
    return path


def untrusted_reason(fd_or_path):
    """Why a saved index or cache file must not be used (None when it may):
    it has to belong to the user running vimage and be writable by no one else."""
    try:
        st = os.fstat(fd_or_path) if isinstance(fd_or_path, int) else os.stat(fd_or_path)
    except OSError as e:
        return e.strerror
    if st.st_uid != os.geteuid():
        return "it belongs to uid %d, not to the user running vimage" % st.st_uid
    if st.st_mode & 0o022:
        return "it is writable by %s" % ("others" if st.st_mode & 0o002 else "its group")
    return None


def write_private(path, data):
    """Write a file only its owner can read (0600), replacing it atomically;
    data is text, bytes, or a list of bytes written one after the other."""
    tmp = "%s.tmp%d" % (path, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            fd = None
            for piece in data if isinstance(data, list) else [data]:
                f.write(piece.encode() if isinstance(piece, str) else piece)
        os.replace(tmp, path)
    except BaseException:
        if fd is not None:
            os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def image_identity(files):
    """What says 'the same image': sizes, mtimes and a hash of sampled ranges."""
    import hashlib
    h = hashlib.sha256()
    stats = []
    for path in files.paths:
        st = os.stat(path)
        stats.append([os.path.basename(path), st.st_size, st.st_mtime_ns])
    size = files.size
    for i in range(16):
        off = (size - 65536) * i // 15 if size > 65536 else 0
        h.update(files.pread(65536, max(0, off)))
    return {"pieces": stats, "size": size, "sample_sha256": h.hexdigest()}


_COMPRESSED_FILES = weakref.WeakSet()


def _after_fork_in_child():
    """A forked mount process has none of the parent's prefetch threads: their
    locks and pending events must not be inherited half-taken."""
    for cf in list(_COMPRESSED_FILES):
        cf.reset_threads()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class CompressedFile:
    """Random reads of the decompressed bytes of a compressed (split) file."""

    random_access = True
    INDEX_MAGIC = "vimage-seek-index-2"

    def __init__(self, files, codec, index_memory=256 * MiB, cache=None, keep_cache=False,
                 index_file=None, quiet=False):
        self.files, self.codec = files, codec
        self.quiet = quiet
        self.index = SeekIndex()
        self.lru = ChunkLRU(LRU_BYTES)
        self.reset_threads()
        _COMPRESSED_FILES.add(self)
        self.cache_fd = self.cache_path = None
        self.keep_cache = keep_cache
        self.size = None
        self.error = None            # why bytes past self.size cannot be read
        self.identity = image_identity(files)
        key = "%s-%s" % (re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(files.paths[0]))[:80],
                         self.identity["sample_sha256"][:16])
        self.cache_root = cache_dir(cache)
        self.notes = []              # said once in the mount summary (a rebuilt index ...)
        self.index_file = index_file or os.path.join(self.cache_root, key + ".index")
        self.cache_file = os.path.join(self.cache_root, key + ".cache")
        impl = RANDOM_ACCESS.get(codec.name)
        self.impl = impl(files) if impl else None
        if impl in (GzipAccess, ZstdAccess):
            self.impl.budget = index_memory
        if impl is GzipAccess:
            self.impl.spacing = max(GZIP_SPACING, 1 << 20)
        try:
            self.mode = self.impl.plan() if self.impl else "cache"
        except ContainerError as e:
            # no usable block list (a truncated xz has no index): decode in order
            log_error("%s: %s; reading it in order into a cache file" % (files.paths[0], e))
            self.mode = "cache"
        if index_file is None or self.mode == "cache":
            private_dir(self.cache_root)    # refused if others could plant files there
        self.loaded = self._load()

    # --- the pass ---------------------------------------------------------
    def pass_chunks(self):
        """Decompressed chunks, in order, while the index (or cache) is built."""
        if self.mode == "cache":
            return self._cache_pass()
        return self._points_pass()

    def _points_pass(self):
        try:
            for chunk in self.impl.run(self.index):
                yield chunk
            self.size = self.impl.size
        except (ContainerError, MissingDependency) as e:
            if isinstance(e, MissingDependency):
                raise
            self.error = str(e)
            self.size = self.impl.out_pos          # what decoded well before the fault
            log_error("%s; reads past decompressed offset %d fail with EIO" % (e, self.size))
        if getattr(self.impl, "hopeless", False) and self._to_cache():
            return
        self.size_lru()
        self._save()

    def _to_cache(self):
        """After a pass that found no restart point in a large zstd frame (a
        --long window whose kept part never restarted exactly): decode once
        more into a cache file, rather than read from the frame start."""
        try:
            self.announce_cache(self.size)
        except VimageError as e:
            log_error("%s; reads decode from the start of the frame instead" % e)
            return False
        self.mode, self.index, error = "cache", SeekIndex(), self.error
        for _chunk in self._cache_pass():
            pass
        self.error = self.error or error
        return True

    def announce_cache(self, need):
        private_dir(self.cache_root)
        free = os.statvfs(self.cache_root)
        free = free.f_bavail * free.f_frsize
        if not self.quiet:
            sys.stderr.write("%s: this %s stream has no restart points: decompressing it to the "
                             "cache file %s (needs up to %s, %s free there; removed at unmount "
                             "unless --keep-cache)\n" % (PROG, self.codec.name, self.cache_file,
                                                         human(need) if need else "its full size",
                                                         human(free)))
        if need and need > free:
            raise VimageError("not enough space in %s for the cache file (%s needed, %s free); "
                              "choose another place with --cache-dir" % (self.cache_root,
                                                                        human(need), human(free)))

    def _cache_pass(self):
        private_dir(self.cache_root)
        try:
            os.unlink(self.cache_file)          # never write into someone else's file
        except OSError:
            pass
        fd = os.open(self.cache_file, os.O_RDWR | os.O_CREAT | os.O_EXCL |
                     getattr(os, "O_CLOEXEC", 0), 0o600)
        self.cache_fd = fd
        self.files.pos = 0
        stream = self.codec.open(self.files)
        pos = 0
        try:
            while True:
                data = stream.read(CHUNK)
                if not data:
                    break
                # all-zero stretches stay holes: the cache costs what is really there
                mv = memoryview(data)
                for i in range(0, len(data), MiB):
                    piece = mv[i:i + MiB]
                    if piece != _ZEROS_VIEW[:len(piece)]:
                        os.pwrite(fd, piece, pos + i)
                pos += len(data)
                yield data
        except ContainerError as e:
            self.error = str(e)
            log_error("%s; reads past decompressed offset %d fail with EIO" % (e, pos))
        os.ftruncate(fd, pos)
        self.size = pos
        self._save()

    # --- saved index ------------------------------------------------------
    # One line of JSON (magic, codec, identity, size, points, the codec's
    # check list), then the bytes it refers to as [offset, length] from the
    # end of that line: {"z": ...} zlib-compressed, {"b": ...} kept as they
    # are (zstd windows come compressed).
    def _save(self):
        blobs, at = [], [0]

        def enc(x):
            if not isinstance(x, bytes):
                return x
            data = x if isinstance(x, Packed) else zlib.compress(x)
            blobs.append(data)
            at[0] += len(data)
            return {"b" if isinstance(x, Packed) else "z": [at[0] - len(data), len(data)]}
        state = None
        if self.mode == "points":
            # in-memory inflater copies cannot be saved; the other points can,
            # and a read then starts from the saved point before it
            keep = [(off, p) for off, p in zip(self.index.offsets, self.index.points)
                    if self.impl.savable(p)]
            if 2 * len(keep) < len(self.index):
                return
            points = [[off] + [enc(x) for x in p] for off, p in keep]
            state = {k: enc(v) for k, v in self.impl.state().items()}
        else:
            if not self.keep_cache:
                return
            points = None
        doc = {"magic": self.INDEX_MAGIC, "codec": self.codec.name, "identity": self.identity,
               "size": self.size, "error": self.error, "mode": self.mode, "points": points,
               "state": state}
        try:
            if os.path.dirname(os.path.abspath(self.index_file)) == os.path.abspath(self.cache_root):
                private_dir(self.cache_root)
            write_private(self.index_file, [json.dumps(doc).encode() + b"\n"] + list(blobs))
        except OSError as e:
            self.notes.append("cannot save the index to %s: %s" % (self.index_file, e.strerror))
        except VimageError as e:
            self.notes.append("index not saved: %s" % e)

    def _load(self):
        """Reuse a saved index (or kept cache) when it is for this very image."""
        try:
            fd = os.open(self.index_file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return False
        with os.fdopen(fd, "rb") as f:
            why = untrusted_reason(fd)
            if why:
                self.notes.append("saved index %s not used (%s); rebuilt" % (self.index_file, why))
                return False
            try:
                doc = json.loads(f.readline().decode())
                blobs = f.read()
            except (OSError, ValueError):
                return False

        def dec(x):
            if not isinstance(x, dict):
                return x
            (kind, (off, n)), = x.items()
            if off < 0 or n < 0 or off + n > len(blobs):
                raise ValueError("blob out of range")
            data = blobs[off:off + n]
            return Packed(data) if kind == "b" else zlib.decompress(data)
        try:
            if doc.get("magic") != self.INDEX_MAGIC or doc.get("codec") != self.codec.name or \
                    doc.get("identity") != self.identity or doc.get("mode") != self.mode:
                return False
            if self.mode == "cache":
                try:
                    fd = os.open(self.cache_file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                except OSError:
                    return False
                why = untrusted_reason(fd)
                if why or os.fstat(fd).st_size != doc["size"]:
                    os.close(fd)
                    if why:
                        self.notes.append("kept cache file %s not used (%s); rebuilt"
                                          % (self.cache_file, why))
                    return False
                self.cache_fd = fd
            else:
                for item in doc["points"]:
                    self.index.add(item[0], tuple(dec(x) for x in item[1:]))
                self.impl.restore({k: dec(v) for k, v in (doc.get("state") or {}).items()},
                                  doc["size"])
            self.size, self.error = doc["size"], doc.get("error")
            self.size_lru()
            return True
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, zlib.error):
            self.index = SeekIndex()
            return False

    # --- reads ------------------------------------------------------------
    def size_lru(self):
        """Room for the chunk being read and those decoded ahead of it."""
        offs = list(self.index.offsets) + [self.size or 0]
        largest = max([b - a for a, b in zip(offs, offs[1:])] or [0])
        self.lru.budget = max(LRU_BYTES, (self.PREFETCH + 2) * largest)

    def reset_threads(self):
        self.prefetch_lock = threading.Lock()
        self.prefetching = {}        # chunk number -> Event, while a thread decodes it
        self.last_chunk = -2
        self.lru.lock = threading.Lock()

    def _decode(self, i, upto=None):
        """Decode chunk i, or only its first `upto` bytes (a random read need
        not pay for the rest of a big block); the LRU keeps what was decoded."""
        offs = self.index.offsets
        whole = (offs[i + 1] if i + 1 < len(offs) else self.size) - offs[i]
        length = whole if upto is None else min(whole, upto)
        chunk = self.impl.read_chunk(self.index, i, length)
        if len(chunk) > whole:
            chunk = chunk[:whole]               # more than was asked is kept, not past the chunk
        if len(chunk) < length:
            raise OSError(errno.EIO, "compressed data at decompressed offset %d decodes short"
                          % offs[i])
        self.lru.put(i, chunk)
        return chunk

    PARTIAL_SLACK = MiB              # decoded past a random read, for the reads near it

    def _chunk(self, i, need):
        """Chunk i, decoded at least to byte `need`.  When reads go forward
        chunk by chunk, the next ones are decoded meanwhile in threads (the
        codecs release the GIL), so a sequential read keeps the cores busy."""
        chunk = self.lru.get(i)
        if chunk is None or len(chunk) < need:
            with self.prefetch_lock:
                pending = self.prefetching.get(i)
            if pending is not None:
                pending.wait()
                chunk = self.lru.get(i)
            if chunk is None or len(chunk) < need:
                forward = i in (self.last_chunk, self.last_chunk + 1)
                chunk = self._decode(i, None if forward else need + self.PARTIAL_SLACK)
        if i == self.last_chunk + 1:
            for ahead in range(i + 1, min(i + 1 + self.PREFETCH, len(self.index))):
                self._prefetch(ahead)
        self.last_chunk = i
        return chunk

    PREFETCH = 2                     # chunks decoded ahead, each in its own thread

    def _prefetch(self, i):
        with self.prefetch_lock:
            if i in self.prefetching or len(self.prefetching) >= self.PREFETCH or \
                    self.lru.get(i) is not None:
                return
            done = self.prefetching[i] = threading.Event()

        def work():
            try:
                self._decode(i)
            except (OSError, VimageError):
                pass                   # the read itself will report it
            finally:
                with self.prefetch_lock:
                    del self.prefetching[i]
                done.set()
        threading.Thread(target=work, daemon=True).start()

    def pread(self, n, offset):
        end = min(offset + n, self.size)
        if offset + n > self.size and self.error:
            raise OSError(errno.EIO, "decompressed bytes past offset %d cannot be read: %s"
                          % (self.size, self.error))
        if self.cache_fd is not None:
            return os.pread(self.cache_fd, max(0, end - offset), offset)
        parts = []
        try:
            while offset < end:
                i = bisect.bisect_right(self.index.offsets, offset) - 1
                offs = self.index.offsets
                k = offset - offs[i]
                chunk_end = offs[i + 1] if i + 1 < len(offs) else self.size
                chunk = self._chunk(i, min(end, chunk_end) - offs[i])
                piece = chunk[k:k + end - offset]
                if not piece:
                    raise OSError(errno.EIO, "no data at decompressed offset %d" % offset)
                parts.append(piece)
                offset += len(piece)
        except VimageError as e:
            raise OSError(errno.EIO, str(e))
        return b"".join(parts)

    def preadv_into(self, bufs, offset):
        data = self.pread(sum(len(b) for b in bufs), offset)
        pos = 0
        for b in bufs:
            n = len(b)
            if pos + n > len(data):
                raise OSError(errno.EIO, "image is truncated")
            b[:] = data[pos:pos + n]
            pos += n

    def close(self, remove=True):
        if self.cache_fd is not None:
            os.close(self.cache_fd)
            self.cache_fd = None
            if remove and not self.keep_cache:
                for p in (self.cache_file, self.index_file):
                    try:
                        os.unlink(p)
                    except OSError:
                        pass
        self.files.close()

    def describe(self):
        if self.mode == "cache":
            return "%s stream, cached in %s" % (self.codec.name, self.cache_file)
        kinds = {}
        for p in self.index.points:
            kinds[p[0]] = kinds.get(p[0], 0) + 1
        return "%s stream, %d seek points (%s)" % (
            self.codec.name, len(self.index), ", ".join("%d %s" % (n, k) for k, n in sorted(kinds.items())))


class PassSource(Source):
    """The index pass seen as a stream: the image readers parse it as it runs."""

    def __init__(self, cfile, progress):
        self.cfile, self.gen, self.progress = cfile, cfile.pass_chunks(), progress
        self.buf, self.pos = b"", 0
        self.input_size = cfile.files.size
        self.ended = False

    def read(self, n):
        parts, have = [self.buf], len(self.buf)
        while have < n and not self.ended:
            chunk = next(self.gen, None)
            if chunk is None:
                self.ended = True
                break
            parts.append(chunk)
            have += len(chunk)
            if self.progress is not None:
                self.progress.update_to(self.consumed())
        data = b"".join(parts)
        self.buf = data[n:]
        self.pos += min(n, len(data))
        return data[:n]

    def drain(self):
        for _chunk in self.gen:
            if self.progress is not None:
                self.progress.update_to(self.consumed())
        self.ended = True

    def consumed(self):
        """How far the pass is in the compressed input."""
        cf = self.cfile
        return cf.files.pos if cf.mode == "cache" else cf.impl.in_pos


class RandomStream(Source):
    """Sequential reads over a random-access source (headers of a saved-index mount)."""

    def __init__(self, ra):
        self.ra, self.pos = ra, 0
        self.size = ra.size

    def read(self, n):
        data = self.ra.pread(max(0, min(n, self.ra.size - self.pos)), self.pos)
        self.pos += len(data)
        return data

    def consumed(self):
        return self.pos

# ===========================================================================
# Rank index and virtual partition: random access for `mount`
# ===========================================================================
#
# A read of partition bytes [a, b) becomes: the used-block runs inside it
# (from the bitmap), for each run the number of used blocks before it (the
# rank), hence where its data sits in the image, and one large pread per run
# from which the interleaved checksum fields are cut out.  Unused blocks are
# zeros.  Nothing here keeps a file position, so reads are thread-safe.

class RankIndex:
    """Used blocks before any block: cumulative popcounts every `step` bits
    in an array('Q'), the rest popcounted on demand."""

    def __init__(self, bitmap, nbits, step=DEFAULT_INDEX_BITS, bytemap=False):
        if step < 64 or step % 64:
            raise VimageError("--index-size must be a multiple of 64 bits, at least 64")
        self.bitmap, self.nbits, self.bytemap = bitmap, nbits, bytemap
        self.step = step
        self.cum = array("Q")
        total = 0
        if bytemap:                       # partclone 0001: one byte per block
            for i in range(0, nbits, step):
                self.cum.append(total)
                total += bitmap.count(1, i, min(i + step, nbits))
        else:
            sb = step // 8
            whole = nbits // 8
            for i in range(0, whole, sb):
                self.cum.append(total)
                total += popcount(bitmap[i:min(i + sb, whole)])
            if nbits % 8:
                if whole % sb == 0:
                    self.cum.append(total)
                total += bin(bitmap[whole] & ((1 << (nbits % 8)) - 1)).count("1")
        self.total = total

    def rank(self, block):
        """Number of used blocks before `block` (0 <= block <= nbits)."""
        if block >= self.nbits:
            return self.total
        i = block // self.step
        r = self.cum[i]
        start = i * self.step
        if self.bytemap:
            return r + self.bitmap.count(1, start, block)
        r += popcount(self.bitmap[start // 8:block // 8])
        if block % 8:
            r += bin(self.bitmap[block // 8] & ((1 << (block % 8)) - 1)).count("1")
        return r

    def used_runs(self, first, end):
        """Runs (start, count) of used blocks within [first, end)."""
        end = min(end, self.nbits)
        if first >= end:
            return
        if self.bytemap:
            for m in _BYTE_RUN_RE.finditer(self.bitmap, first, end):
                yield m.start(), m.end() - m.start()
            return
        base = first // 8 * 8
        for start, count in bit_runs(self.bitmap[first // 8:(end + 7) // 8], end - base):
            s, e = max(base + start, first), min(base + start + count, end)
            if e > s:
                yield s, e - s

    def nbytes(self):
        return self.cum.itemsize * len(self.cum)


def field_iovecs(first, dst, group, field):
    """Buffers that a preadv fills from image bytes holding data bytes from data
    offset `first` on, with a `field`-byte field after every `group` data bytes:
    the data lands in dst, the fields in a scratch buffer."""
    if not field:
        return [dst]
    scratch = memoryview(bytearray(field))
    iov, p, d, n = [], 0, first, len(dst)
    while p < n:
        take = min(group - d % group, n - p)
        iov.append(dst[p:p + take])
        p += take
        d += take
        if p < n:
            iov.append(scratch)
    return iov


class BlockPartition(ReadIntoMixin):
    """Random access to a partclone or partimage image on plain files."""

    def __init__(self, image, source, index_bits=DEFAULT_INDEX_BITS, verify_reads=False):
        self.image, self.source, self.pread = image, source, source.pread
        self.size, self.bs = image.size, image.block_size
        if isinstance(image, PartimageImage):
            self.group, self.field, bytemap = PI_CHECK_EVERY, PI_CHK.size, False
            self.digest = None
        else:
            self.group = image.bpc * image.block_size if image.csum_size else 0
            self.field = image.csum_size if image.csum_size else 0
            bytemap = image.extra.get("image_version") == "0001"
        self.base = image.data_start
        self.data_len = image.used_blocks * self.bs
        self.index = RankIndex(image.bitmap, image.total_blocks, index_bits, bytemap)
        self.verify_reads = verify_reads
        if verify_reads:
            if isinstance(image, PartimageImage):
                self.check = self._check_partimage
            elif not image.csum_size or not image.reseed or bytemap:
                raise VimageError("--verify-reads needs checksums that restart for every group "
                                  "(this image: %s, reseed %s)" % (image.checksum, image.reseed))
            else:
                digest = make_digest(image.digest_kind, True, image.endian, image.csum_size)
                self.check = lambda d, stored: digest(d) == stored

    def image_pos(self, d):
        """Image offset of data offset d (the used-block data, fields excluded)."""
        return self.base + d + (d // self.group) * self.field if self.field else self.base + d

    def _verified(self, d0, d1):
        """Like data(), reading whole checksum groups and checking each one."""
        g = self.group
        g0, g1 = d0 // g * g, min(-(-d1 // g) * g, self.data_len)
        partimage = isinstance(self.image, PartimageImage)
        tail_field = not partimage or g1 % g == 0      # partimage's last partial group has none
        start = self.image_pos(g0)
        end = self.image_pos(g1 - 1) + 1 + (self.field if tail_field else 0)
        buf = self.pread(end - start, start)
        if len(buf) < end - start:
            raise OSError(errno.EIO, "image is truncated at offset %d" % (start + len(buf)))
        out, pos, d = [], 0, g0
        while d < g1:
            n = min(g, g1 - d)
            chunk = buf[pos:pos + n]
            if (n == g or not partimage) and not self.check(chunk, buf[pos + n:pos + n + self.field]):
                raise OSError(errno.EIO, "checksum mismatch in the group at image offset %d "
                              "(used-block data bytes %d-%d)" % (start + pos, d, d + n - 1))
            out.append(chunk)
            pos += n + self.field
            d += n
        return b"".join(out)[d0 - g0:d1 - g0]

    @staticmethod
    def _check_partimage(chunk, stored):
        magic, crc, _pos = PI_CHK.unpack(stored)
        return magic == b"CHK\0" and crc == zlib.crc32(chunk)

    def readinto(self, offset, out):
        """Fill `out` with partition bytes from offset on: one preadv per used
        run straight into out (checksum fields into scratch), zeros between.
        A short read (the common 4 KiB one) whose blocks are all used, or all
        free, is told from one small int of the bitmap."""
        end = offset + len(out)
        bs = self.bs
        first, stop = offset // bs, -(-end // bs)
        idx = self.index
        if stop - first <= 64 and stop <= idx.nbits and not idx.bytemap and \
                not self.verify_reads:
            bits = (int.from_bytes(idx.bitmap[first >> 3:(stop + 7) >> 3], "little") >>
                    (first & 7)) & ((1 << (stop - first)) - 1)
            if bits == (1 << (stop - first)) - 1:
                d0 = idx.rank(first) * bs + offset - first * bs
                g, f = self.group, self.field
                bufs = [out] if not f or d0 // g == (d0 + len(out) - 1) // g else \
                    field_iovecs(d0, out, g, f)
                self.source.preadv_into(bufs, self.image_pos(d0))
                return
            if not bits:
                zero_fill(out)
                return
        self._readinto(offset, out)

    def _readinto(self, offset, out):
        end = offset + len(out)
        bs, pos = self.bs, offset
        for start, count in self.index.used_runs(offset // bs, -(-end // bs)):
            a, b = max(start * bs, offset), min((start + count) * bs, end)
            if a > pos:
                zero_fill(out[pos - offset:a - offset])
            d0 = self.index.rank(start) * bs + a - start * bs
            dst = out[a - offset:b - offset]
            if self.verify_reads and self.field:
                dst[:] = self._verified(d0, d0 + b - a)
            else:
                self.source.preadv_into(field_iovecs(d0, dst, self.group, self.field),
                                        self.image_pos(d0))
            pos = b
        if end > pos:
            zero_fill(out[pos - offset:])


class RunIndex:
    """ntfsclone: runs of stored clusters, (first cluster, count, image offset
    of the first record), merged where records follow each other."""

    def __init__(self, rec):
        self.rec = rec
        self.starts, self.counts, self.offsets = array("Q"), array("Q"), array("Q")

    def record(self, cluster, count, offset):
        if self.starts:
            last = len(self.starts) - 1
            if self.starts[last] + self.counts[last] == cluster and \
                    self.offsets[last] + self.counts[last] * self.rec == offset:
                self.counts[last] += count
                return
        if self.starts and cluster < self.starts[-1]:
            raise FormatError("this ntfsclone image stores clusters out of order "
                              "(a metadata image) and cannot be mounted")
        self.starts.append(cluster)
        self.counts.append(count)
        self.offsets.append(offset)

    def nbytes(self):
        return 3 * 8 * len(self.starts)


class IndexSink:
    """The sink of the ntfsclone index pass: keeps record positions, not data."""

    wants_data = False
    sequential = False

    def __init__(self, index):
        self.record = index.record

    def write(self, offset, data):
        pass

    def finish(self, size):
        pass


class NtfsPartition(ReadIntoMixin):
    """Random access to an ntfsclone image on plain files (after one index pass)."""

    def __init__(self, image, source, quiet=False, progress=None):
        self.image, self.source = image, source
        self.size, self.cs = image.size, image.block_size
        self.rec = self.cs + 1
        self.index = RunIndex(self.rec)
        problems = []
        progress = (progress or (lambda total, desc: Progress(total, desc, quiet)))(
            image.stream.input_size, "index")
        try:
            image.scan_all(IndexSink(self.index), problems.append, progress)
        finally:
            progress.close()
        bad = [p for p in problems if p.kind != "structure" or "in use" not in p.message]
        if bad:
            raise FormatError("cannot index %s: %s" % (image.name, bad[0]))

    def readinto(self, offset, out):
        """Fill `out` from offset on: per run of stored clusters one preadv that
        puts the cluster data into out and the 1-byte record codes aside."""
        end = offset + len(out)
        cs, idx = self.cs, self.index
        pos = offset
        i = max(0, bisect.bisect_right(idx.starts, offset // cs) - 1)
        while i < len(idx.starts) and idx.starts[i] * cs < end:
            s, n, o = idx.starts[i], idx.counts[i], idx.offsets[i]
            a, b = max(s * cs, offset), min((s + n) * cs, end)
            if b > a:
                if a > pos:
                    zero_fill(out[pos - offset:a - offset])
                d = a - s * cs                      # data offset inside the run
                self.source.preadv_into(field_iovecs(d, out[a - offset:b - offset], cs, 1),
                                        o + 1 + d + d // cs)
                pos = b
            i += 1
        if end > pos:
            zero_fill(out[pos - offset:])


class RawPartition(ReadIntoMixin):
    """A raw image is its own partition."""

    def __init__(self, image, source):
        self.source, self.size = source, image.size

    def readinto(self, offset, out):
        self.source.preadv_into([out], offset)


def volume_paths(first_path):
    """NAME.000, NAME.001 ... as far as they go (just the path if not numbered)."""
    m = re.match(r"^(.*)\.(\d{3})$", first_path)
    paths = [first_path]
    if m:
        i = int(m.group(2)) + 1
        while os.path.exists("%s.%03d" % (m.group(1), i)):
            paths.append("%s.%03d" % (m.group(1), i))
            i += 1
    return paths


class VolumeSetReader:
    """Random reads over partimage's logical stream: the volumes (plain files or
    compressed ones) joined without their 512-byte volume headers."""

    def __init__(self, sources):
        self.sources, self.starts, pos = sources, [], 0
        for src in sources:
            self.starts.append(pos)
            pos += src.size - PI_VOLUME_HEADER
        self.size = pos

    def _spans(self, offset, n):
        i = bisect.bisect_right(self.starts, offset) - 1
        while n > 0 and 0 <= i < len(self.sources):
            end = self.starts[i + 1] if i + 1 < len(self.starts) else self.size
            take = min(n, end - offset)
            if take <= 0:
                break
            yield self.sources[i], PI_VOLUME_HEADER + offset - self.starts[i], take
            n -= take
            offset += take
            i += 1

    def pread(self, n, offset):
        return b"".join([src.pread(take, off) for src, off, take in self._spans(offset, n)])

    def preadv_into(self, bufs, offset):
        total = sum(len(b) for b in bufs)
        spans = list(self._spans(offset, total))
        if len(spans) == 1 and spans[0][2] == total:
            return spans[0][0].preadv_into(bufs, spans[0][1])
        data = self.pread(total, offset)
        if len(data) < total:
            raise OSError(errno.EIO, "image is truncated")
        pos = 0
        for b in bufs:
            b[:] = data[pos:pos + len(b)]
            pos += len(b)

    def close(self, remove=True):
        for src in self.sources:
            close_source(src, remove)


def close_source(src, remove=True):
    """Close a plain or compressed source; remove=False keeps cache files (the
    parent of a mount closes its copies while the mount process goes on)."""
    if isinstance(src, CompressedFile):
        src.close(remove)
    else:
        src.close()


def estimate_cache_need(files, codec):
    """Bytes a cache file will take, when the image header tells (else None)."""
    try:
        if RANDOM_ACCESS.get(codec.name) is XzAccess:
            x = XzAccess(files)
            x._parse()
            return sum(b[4] for b in x.blocks)
        stream = PeekSource(codec.open(FileSource(files.paths)))
        try:
            head = stream.peek(64)
            if head.startswith(PartcloneImage.MAGIC):
                return PartcloneImage(stream, {}, "").image_length()
            if head.startswith(NtfscloneImage.MAGIC):
                img = NtfscloneImage(stream, {}, "")
                return img.data_start + (img.used_blocks + 1) * (img.block_size + 1)
        finally:
            stream.close()
    except (VimageError, OSError):
        pass
    return None


def open_random(path, copts, quiet):
    """(random-access source of the decompressed bytes, pass source or None)."""
    files = FileSource(split_pieces(path))
    files.watch = True
    head = files.pread(64, 0)
    codec = next((c for c in DETECTED_CODECS if c.matches(head)), None)
    if codec is None:
        return files, None
    if codec.module:
        need_module(codec.module, "reading %s-compressed images" % codec.name, codec.pip_name)
    cf = CompressedFile(files, codec, index_memory=copts.get("index_memory", 256 * MiB),
                        cache=copts.get("cache_dir"), keep_cache=copts.get("keep_cache", False),
                        index_file=copts.get("index_file"), quiet=quiet)
    if cf.loaded:
        return cf, None
    if cf.mode == "cache":
        cf.announce_cache(estimate_cache_need(files, codec))
    return cf, PassSource(cf, progress_of(copts, quiet)(files.size,
                                                        "index %s" % os.path.basename(path)))


def progress_of(copts, quiet):
    """The progress maker of a pass: the shared display of a mount of several
    images, else a display of its own."""
    return copts.get("progress") or (lambda total, desc: Progress(total, desc, quiet))


def open_partition(path, index_bits=DEFAULT_INDEX_BITS, verify_reads=False, quiet=False,
                   fmt=None, **copts):
    """(image, virtual partition, close(remove)) for mounting an image.

    Compressed images get their seek index (or cache file) here, in one pass."""
    if path == "-":
        raise VimageError("mount needs an image file, not stdin")
    stream, _container = open_stream(path)
    is_partimage = stream.peek(64).startswith(PartimageImage.MAGIC) and fmt != "raw"
    stream.close()
    if is_partimage:
        probe = open_image(path)        # headers and bitmap, read in order
        probe.stream.close()
        sources = []
        try:
            for vp in volume_paths(path):
                src, passer = open_random(vp, copts, quiet)
                sources.append(src)
                if passer is not None:
                    passer.drain()
                    passer.progress.close()
        except BaseException:
            for src in sources:
                close_source(src)
            raise
        reader = VolumeSetReader(sources)
        part = BlockPartition(probe, reader, index_bits, verify_reads)
        part.how = describe_sources(sources)
        return probe, part, reader.close
    src, passer = open_random(path, copts, quiet)
    try:
        container = {"compression": src.codec.name if isinstance(src, CompressedFile) else None,
                     "pieces": len(src.files.paths if isinstance(src, CompressedFile) else src.paths)}
        stream = PeekSource(passer if passer is not None else RandomStream(src))
        image = detect_image(stream, container, path, fmt)
        if isinstance(image, NtfscloneImage):
            if verify_reads:
                raise VimageError("--verify-reads: ntfsclone images have no checksums")
            part = NtfsPartition(image, src, quiet or passer is not None, copts.get("progress"))
        if passer is not None:
            passer.drain()
            passer.progress.close()
        if isinstance(image, PartcloneImage):
            part = BlockPartition(image, src, index_bits, verify_reads)
        elif isinstance(image, RawImage):
            if verify_reads:
                raise VimageError("--verify-reads: raw images have no checksums")
            image.size = src.size
            part = RawPartition(image, src)
        elif not isinstance(image, NtfscloneImage):
            raise VimageError("%s: a partimage image inside a compressed file cannot be mounted"
                              % path)
    except BaseException:
        close_source(src)
        raise
    part.how = describe_sources([src])
    return image, part, lambda remove=True: close_source(src, remove)


def describe_sources(sources):
    """How the mount reads the image: seek points or cache, per compressed file."""
    parts = []
    for src in sources:
        if isinstance(src, CompressedFile):
            line = src.describe()
            if src.loaded:
                line += ", index reused from %s" % src.index_file
            for note in src.notes:
                line += "; " + note
            if src.error:
                line += "; DAMAGED: %s (reads past decompressed offset %d give EIO)" % (
                    src.error, src.size)
            parts.append(line)
    return "; ".join(parts)


# ===========================================================================
# FUSE: one read-only file, the partition
# ===========================================================================

# File system -> (check in no-change mode, read-only mount attempts in order).
# Every attempt is `mount -t TYPE -o OPTIONS` on a read-only loop device over
# the virtual partition, with nosuid,nodev (and noexec unless --exec) added:
# nothing in an old backup can write to it, run setuid or open a device.  The
# options moved across kernels (btrfs nologreplay became rescue=nologreplay),
# and a FUSE driver stands in where the kernel lacks one (fuse.NAME goes
# through mount.fuse).  The third field names what to install when all fail.
FILESYSTEMS = {
    "ext2": ("e2fsck -fn %s", [("ext2", "ro"), ("ext4", "ro")], "e2fsprogs"),
    "ext3": ("e2fsck -fn %s", [("ext3", "ro,noload"), ("ext4", "ro,noload")], "e2fsprogs"),
    "ext4": ("e2fsck -fn %s", [("ext4", "ro,noload")], "e2fsprogs"),
    "xfs": ("xfs_repair -n -f %s", [("xfs", "ro,norecovery")], "xfsprogs"),
    "btrfs": ("btrfs check --readonly %s", [("btrfs", "ro,rescue=nologreplay"),
                                             ("btrfs", "ro,nologreplay"), ("btrfs", "ro")],
              "btrfs-progs"),
    "ntfs": ("ntfsfix -n %s", [("ntfs3", "ro"), ("ntfs-3g", "ro"), ("lowntfs-3g", "ro")],
             "ntfs-3g"),
    "vfat": ("fsck.vfat -n %s", [("vfat", "ro"), ("fuse.fusefat", "ro")], "fusefat"),
    "exfat": ("fsck.exfat -n %s", [("exfat", "ro"), ("exfat-fuse", "ro")], "exfat-fuse"),
    "hfsplus": ("fsck.hfsplus -n %s", [("hfsplus", "ro"), ("fuse.hfsfuse", "ro")], "hfsfuse"),
    "f2fs": ("fsck.f2fs --dry-run %s", [("f2fs", "ro,norecovery")], "a kernel with f2fs"),
    "jfs": ("jfs_fsck -n %s", [("jfs", "ro")], "a kernel with jfs"),
    "reiserfs": ("reiserfsck --check %s", [("reiserfs", "ro,nolog")], "a kernel with reiserfs"),
    "iso9660": (None, [("iso9660", "ro"), ("fuse.fuseiso", "ro")], "fuseiso"),
    "udf": (None, [("udf", "ro")], "a kernel with udf"),
    "squashfs": (None, [("squashfs", "ro"), ("fuse.squashfuse", "ro")], "squashfuse"),
    "erofs": (None, [("erofs", "ro")], "a kernel with erofs"),
    "minix": ("fsck.minix %s", [("minix", "ro")], "a kernel with minix"),
}


def safe_options(options, allow_exec=False):
    """Mount options plus those that keep a backup harmless."""
    return options + ",nosuid,nodev" + ("" if allow_exec else ",noexec")


def virtual_name(path):
    """The virtual file's name: the image's name without split/compression suffixes."""
    name = os.path.basename(path)
    name = _SPLIT_RE.sub(r"\1", name)
    name = re.sub(r"\.(\d{3})$", "", name)
    name = re.sub(r"\.(gz|gzip|bz2|bzip2|xz|lzma|lz|lzip|zst|zstd|lz4|lzo)$", "", name)
    return name or "partition.img"


def load_fuse():
    """mfusepy (libfuse3) when it is there, else fusepy (libfuse2): side by
    side in `make bench` libfuse3 served as fast or faster.  VIMAGE_FUSE=fuse
    or =mfusepy picks one (to compare them)."""
    errors = []
    order = ("mfusepy", "fuse")
    if os.environ.get("VIMAGE_FUSE") in order:
        order = (os.environ["VIMAGE_FUSE"],)
    for module in order:
        try:
            import importlib
            mod = importlib.import_module(module)
            if hasattr(mod, "FUSE") and hasattr(mod, "Operations"):
                return mod
        except (ImportError, OSError, EnvironmentError) as e:
            errors.append("%s: %s" % (module, e))
    raise MissingDependency("mount needs fusepy with libfuse2 (pip install fusepy; apt install "
                            "libfuse2) or mfusepy with libfuse3 (pip install mfusepy)")


def access_of(paths):
    """(uid, gid, mode, mtime) for a virtual file made of these image files: never
    more access than the files give.  The mode is the most restrictive of
    theirs without write bits; files of different owners (or groups) leave
    the virtual file to root."""
    stats = [os.stat(p) for p in paths]
    mode = 0o555
    for st in stats:
        mode &= st.st_mode
    uids, gids = {st.st_uid for st in stats}, {st.st_gid for st in stats}
    uid = uids.pop() if len(uids) == 1 else 0
    gid = gids.pop() if len(gids) == 1 else 0
    return uid, gid, mode & 0o555, max(st.st_mtime for st in stats)


def dir_mode(mode):
    """A directory holding files of `mode`: searchable where they are readable."""
    return mode | (mode & 0o444) >> 2


def make_operations(fuse, files, on_destroy=None):
    """The fusepy Operations serving a flat directory of read-only files.

    `files` maps a name to (reader, (uid, gid, mode, mtime)); the directory
    takes the most restrictive access of them all.  The kernel enforces
    owners and modes (default_permissions)."""
    nodes = {}
    for name, (part, (uid, gid, mode, mtime)) in files.items():
        t = int(mtime * 1e9)
        nodes["/" + name] = (part, {"st_mode": stat.S_IFREG | mode, "st_nlink": 1,
                                    "st_uid": uid, "st_gid": gid, "st_size": part.size,
                                    "st_blocks": 0, "st_atime": t, "st_mtime": t, "st_ctime": t})
    accesses = [a for _p, a in files.values()]
    uids, gids = {a[0] for a in accesses}, {a[1] for a in accesses}
    mode = 0o555
    for a in accesses:
        mode &= a[2]
    t = int(max(a[3] for a in accesses) * 1e9) if accesses else 0
    root = {"st_mode": stat.S_IFDIR | dir_mode(mode), "st_nlink": 2,
            "st_uid": uids.pop() if len(uids) == 1 else 0,
            "st_gid": gids.pop() if len(gids) == 1 else 0,
            "st_size": 0, "st_atime": t, "st_mtime": t, "st_ctime": t}
    listing = [".", ".."] + list(files)
    total = sum(-(-p.size // 4096) for p, _a in files.values())

    class VimageFS(fuse.Operations):
        use_ns = True

        def __init__(self):
            self.ready = None        # called once the kernel has the mount
            self.nodes = nodes

        def init(self, path):
            if self.ready:
                self.ready()

        def destroy(self, path):
            if on_destroy:
                on_destroy()

        def getattr(self, path, fh=None):
            if path == "/":
                return root
            node = nodes.get(path)
            if node is None:
                raise fuse.FuseOSError(errno.ENOENT)
            return node[1]

        def readdir(self, path, fh):
            if path != "/":
                raise fuse.FuseOSError(errno.ENOTDIR)
            return listing

        def open(self, path, flags):
            if path not in nodes:
                raise fuse.FuseOSError(errno.ENOENT)
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
                raise fuse.FuseOSError(errno.EROFS)
            return 0

        def read(self, path, size, offset, fh):
            try:
                return nodes[path][0].read(offset, size)
            except (OSError, VimageError) as e:
                log_error("%s: read of %d bytes at %d failed: %s"
                          % (path[1:], size, offset, getattr(e, "strerror", None) or e))
                raise fuse.FuseOSError(errno.EIO)

        def statfs(self, path):
            return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": total,
                    "f_bfree": 0, "f_bavail": 0, "f_files": len(files) + 1, "f_ffree": 0,
                    "f_namemax": 255}

        def access(self, path, amode):
            if amode & os.W_OK:
                raise fuse.FuseOSError(errno.EROFS)
            return 0

        def _refuse(self, *args, **kwargs):
            raise fuse.FuseOSError(errno.EROFS)

        write = create = truncate = unlink = mkdir = rmdir = rename = _refuse
        chmod = chown = symlink = link = utimens = mknod = setxattr = removexattr = _refuse

    return VimageFS()


def fuse_class(fuse, ops):
    """fusepy's FUSE with a zero-copy read: preadv fills libfuse's buffer
    directly (fusepy's own read path copies the data twice more)."""
    base = fuse.FUSE
    if not hasattr(base, "read"):
        return base
    import ctypes
    nodes = {k.encode("utf-8"): v for k, v in ops.nodes.items()}
    c_char, addressof = ctypes.c_char, ctypes.addressof

    class ZeroCopyFUSE(base):
        def read(self, path, buf, size, offset, fip):
            node = nodes.get(path)          # fusepy and mfusepy both hand over bytes
            if node is None:
                return -errno.ENOENT
            part = node[0]
            n = max(0, min(size, part.size - offset))
            if n:
                view = memoryview((c_char * n).from_address(addressof(buf.contents))).cast("B")
                try:
                    part.readinto(offset, view)
                except (OSError, VimageError) as e:
                    log_error("%s: read of %d bytes at %d failed: %s"
                              % (path.decode("utf-8", "replace")[1:], size, offset,
                                 getattr(e, "strerror", None) or e))
                    return -errno.EIO
            return n
    return ZeroCopyFUSE


def log_error(text):
    """Errors of a running mount: stderr in the foreground, syslog otherwise."""
    try:
        sys.stderr.write("%s: %s\n" % (PROG, text))
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass
    try:
        import syslog
        syslog.syslog(syslog.LOG_ERR, "%s: %s" % (PROG, text))
    except (ImportError, OSError):
        pass


def subprocess_quiet(cmd):
    import subprocess
    try:
        return subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE).returncode
    except OSError:
        return 127


def mount_table():
    """(target, fstype, source) of every mount, in /proc/self/mountinfo order."""
    table = []
    try:
        with io.open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                sep = fields.index("-")
                table.append((fields[4].replace("\\040", " "), fields[sep + 1], fields[sep + 2]))
    except (OSError, ValueError):
        pass
    return table


def mounts_at(path):
    """Mount entries (fstype, source) stacked at path, bottom first."""
    path = os.path.realpath(path)
    return [(fstype, source) for target, fstype, source in mount_table() if target == path]


RUN_DIR = "/run/vimage"

# ===========================================================================
# Outputs of a scan: nothing (verify), a file, a block device, a stream
# ===========================================================================

class NullSink:
    """verify: the data is checked, not kept."""

    wants_data = False

    def write(self, offset, data):
        pass

    def finish(self, size):
        pass


class FileSink:
    """A regular file (sparse: unused blocks stay holes) or a block device."""

    wants_data = True

    def __init__(self, fd, size, truncate):
        self.fd, self.size, self.truncate = fd, size, truncate

    def write(self, offset, data):
        if self.size is not None and offset + len(data) > self.size:
            data = data[:max(0, self.size - offset)]
        view = memoryview(data)
        while len(view):
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    def finish(self, size):
        if self.truncate:
            os.ftruncate(self.fd, size)


class StreamSink:
    """stdout or a pipe: written in order, zeros for unused blocks."""

    wants_data = True
    sequential = True

    def __init__(self, fd, size):
        self.fd, self.size, self.pos = fd, size, 0

    def _write(self, data):
        view = memoryview(data)
        while len(view):
            n = os.write(self.fd, view)
            view = view[n:]
        self.pos += len(data)

    def _zeros(self, n):
        while n > 0:
            k = min(n, len(_ZEROS))
            self._write(_ZEROS[:k] if k < len(_ZEROS) else _ZEROS)
            n -= k

    def write(self, offset, data):
        if self.size is not None and offset + len(data) > self.size:
            data = data[:max(0, self.size - offset)]
        if offset > self.pos:
            self._zeros(offset - self.pos)
        self._write(data)

    def finish(self, size):
        self._zeros(size - self.pos)


# ===========================================================================
# Verification and the Python API
# ===========================================================================
#
# verify_backup() is what `verify` does, without printing: every member is
# scanned (side by side, one per core), then the backup's own checks run
# (sums files, tables, hash chains), and a Report says what was found and
# what the checks covered.  The public API (vimage.open and VirtualImage,
# listed in __all__) serves a backup and each of its members as objects with
# info(), read(), raw(), blocks(), used_extents() and verify().

class Report:
    """What verify found.  problems: Problem objects (kind, message,
    image_offset, byte_range, block_range, member); members: (name, level,
    words) with level 'full', 'partial' or 'none' (what the checks vouch
    for); checked/unchecked: the backup's own checks done and not done."""

    def __init__(self, noun="partitions"):
        self.problems, self.members = [], []
        self.checked, self.unchecked, self.notes = [], [], []
        self.noun, self.size, self.seconds = noun, 0, 0.0

    @property
    def ok(self):
        return not self.problems

    def verdict(self):
        """The summary line (without the input's name)."""
        if self.problems:
            bad = {p.member for p in self.problems}
            unverified = [n for n, level, _w in self.members if level != "full" and n not in bad]
            return "FAILED: %s%s" % (summary_of(self.problems), "; besides, %d of %d %s could "
                                     "not be fully verified (no checksums): %s" % (
                                         len(unverified), len(self.members), self.noun,
                                         ", ".join(unverified)) if unverified else "")
        levels = {level for _n, level, _w in self.members}
        if self.checked:
            levels.add("full")
        if len(self.members) > 1:
            words = ["%d of %d %s %s" % (sum(1 for _n, l, _w in self.members if l == level),
                                         len(self.members), self.noun,
                                         {"full": "verified", "partial": "partly verified",
                                          "none": "not verified"}[level])
                     for level in ("full", "partial", "none")
                     if any(l == level for _n, l, _w in self.members)]
        else:
            words = [w for _n, _l, w in self.members if w]
        words += self.checked
        head = "OK: " if levels == {"full"} else "partly verified: " if levels & {"full", "partial"} \
            else "not verified: " if len(self.members) > 1 else ""
        return "%s%s; %s in %.1f s" % (head, "; ".join(words), human(self.size), self.seconds)


def verify_backup(backup, on_problem=None, on_member=None, progress=None, stdin=False,
                  say=None):
    """Verify every member and the backup's own checks; a Report."""
    members = backup.verify_members()
    report = Report(backup.noun)
    lock = threading.Lock()
    for path, tap in backup.taps().items():
        FILE_TAPS[os.path.realpath(path)] = tap
    if progress is not None and not stdin:
        progress.set_total(sum(m.input_size() for m in members))

    def reporter(name):
        def report_one(p):
            p.member = name
            with lock:
                report.problems.append(p)
            if on_problem:
                on_problem(name, p)
        return report_one

    def scan(m):
        report_one = reporter(m.name)
        try:
            image = m.scan(NullSink(), report_one, progress.part() if progress else None)
            level, words = image.coverage() if image is not None else ("full", "verified")
        except VimageError as e:
            report_one(Problem("unreadable", str(e)))
            level, words = "none", "not read to the end"
        if on_member:
            on_member(m.name, level, words, [p for p in report.problems if p.member == m.name])
        return m.name, level, words
    start = time.monotonic()
    try:
        # several images are checked side by side, one per core (the
        # decompressors and hashes release the GIL)
        workers = min(len(members), os.cpu_count() or 1, 4)
        if workers > 1:
            from concurrent.futures import ThreadPoolExecutor
            with ThreadPoolExecutor(workers) as pool:
                report.members = list(pool.map(scan, members))
        else:
            report.members = [scan(m) for m in members]
        backup.checks(reporter, say or (lambda text: None))
    finally:
        for tap in FILE_TAPS.values():
            tap.close()
        FILE_TAPS.clear()
    report.seconds = time.monotonic() - start
    report.size = sum(m.size or 0 for m in members)
    report.checked, report.unchecked = list(backup.checked), list(backup.unchecked)
    report.notes = list(backup.notes)
    if getattr(backup, "covers_all", False):
        # the image files as stored are vouched for whole (sums, par2)
        report.members = [(n, "full", None) for n, _l, _w in report.members]
    return report


class VirtualImage:
    """A backup, or one partition, disk or volume of it, as vimage serves it.

    open() gives one for what a path names; .partitions, .disk and .disks
    give the members of a backup that holds several, each a VirtualImage
    too.  Reading needs no mount: read(), readinto() and raw() go through
    the same random access as `mount` (a compressed image gets its seek
    index on the first read)."""

    def __init__(self, backup, member, ctx, owner=None):
        self._backup, self._member, self._ctx = backup, member, ctx
        self._owner = owner
        self._reader = None
        self._children = None

    # --- what it is -------------------------------------------------------
    @property
    def name(self):
        return self._member.name if self._member else os.path.basename(self._backup.path)

    @property
    def kind(self):
        return self._member.kind if self._member else "backup"

    @property
    def size(self):
        """Bytes of the partition, disk or volume (None for a backup that
        holds several and no single disk)."""
        if self._member is None:
            return None
        if self._member.size is None:
            self._open()
        return self._member.size

    def info(self):
        """The same dict as `info --json` (for a member: its own part of it)."""
        if self._owner is None:
            return self._backup.info()
        return self._member.info()

    def _kids(self):
        if self._children is None:
            self._children = [VirtualImage(self._backup, m, self._ctx, self)
                              for m in self._backup.members]
        return self._children

    @property
    def partitions(self):
        """The partitions (or volumes) of a backup that holds several; []
        for a single partition image."""
        if self._owner is not None or len(self._backup.members) == 1:
            return []
        return [v for v in self._kids() if v.kind != "disk"]

    @property
    def disks(self):
        return [] if self._owner is not None else [v for v in self._kids() if v.kind == "disk"]

    @property
    def disk(self):
        disks = self.disks
        return disks[0] if len(disks) == 1 else None

    # --- reading ------------------------------------------------------------
    def _open(self):
        if self._reader is None:
            if self._member is None:
                raise VimageError("%s holds several partitions and no single disk; read one of "
                                  ".partitions" % self._backup.path)
            self._reader = self._member.open(self._ctx)
            if self._member.size is None:
                self._member.size = self._reader.size
        return self._reader

    def read(self, offset, size):
        """Bytes [offset, offset+size), cut at the end."""
        return self._open().read(offset, size)

    def readinto(self, offset, buffer):
        """Fill buffer (any writable bytes-like object) from offset; returns
        the number of bytes, fewer only at the end."""
        reader = self._open()
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), reader.size - offset))
        if n:
            reader.readinto(offset, view[:n])
        return n

    def raw(self):
        """A read-only, seekable binary file object over the bytes."""
        return _RawView(self)

    def used_extents(self):
        """(offset, length) runs that hold data, in order; the rest reads as zeros."""
        if self._member is None:
            raise VimageError("%s holds several partitions; ask one of them" % self._backup.path)
        return self._member.extents(self._ctx)

    def blocks(self, verify=True):
        """(offset, bytes) of the data in order, in large pieces, from one
        pass over the image; the checksums are checked as they pass (a
        mismatch raises ChecksumError there; verify=False hands the data on)."""
        if self._member is None:
            raise VimageError("%s holds several partitions; ask one of them" % self._backup.path)
        return _scan_blocks(self._member, verify)

    def verify(self, progress=None):
        """Check everything, as the verify command does; a Report.  progress,
        when given, is called with (bytes done, bytes in all)."""
        shared = _CallbackProgress(progress) if progress else None
        if self._owner is None:
            return verify_backup(self._backup, progress=shared)
        sub = Backup(self._backup.path, [self._member])
        return verify_backup(sub, progress=shared)

    # --- lifetime -------------------------------------------------------------
    def close(self):
        if self._owner is None:
            self._ctx.close(True)
            self._backup.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return "<vimage %s %s, %s>" % (self.kind, self.name,
                                      human(self._member.size) if self._member else "several")


class _CallbackProgress:
    """verify's progress handed to a user's callback(done, total)."""

    def __init__(self, callback):
        self.callback, self.done = callback, {}
        self.total = None

    def part(self):
        return _CallbackPart(self)

    def set_total(self, total):
        self.total = total


class _CallbackPart:
    def __init__(self, shared):
        self.shared = shared

    def update_to(self, done):
        self.shared.done[id(self)] = done
        self.shared.callback(sum(self.shared.done.values()), self.shared.total)

    def close(self):
        pass


class _RawView(io.RawIOBase):
    """VirtualImage.raw(): a seekable, read-only file object."""

    def __init__(self, vi):
        io.RawIOBase.__init__(self)
        self.vi, self.pos = vi, 0
        self.length = vi.size

    def readable(self):
        return True

    def seekable(self):
        return True

    def readinto(self, b):
        n = self.vi.readinto(self.pos, b)
        self.pos += n
        return n

    def seek(self, offset, whence=io.SEEK_SET):
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self.pos = base + offset
        return self.pos

    def tell(self):
        return self.pos


class _QueueSink:
    """blocks(): the scan, in a thread of its own, hands its writes over here."""

    wants_data = True

    def __init__(self, queue, stop):
        self.queue, self.stop = queue, stop

    def write(self, offset, data):
        if self.stop.is_set():
            raise _Stopped()
        self.queue.put((offset, data if isinstance(data, bytes) else bytes(data)))

    def finish(self, size):
        pass


class _Stopped(Exception):
    pass


def _scan_blocks(member, verify):
    import queue as queuelib
    q, stop = queuelib.Queue(maxsize=4), threading.Event()
    end = object()

    def report(p):
        if verify or p.kind in ("truncated", "unreadable", "missing"):
            raise ChecksumError(str(p)) if p.kind == "checksum" else FormatError(str(p))

    def work():
        try:
            member.scan(_QueueSink(q, stop), report)
            q.put(end)
        except _Stopped:
            pass
        except BaseException as e:         # handed to the reader of the blocks
            q.put(e)
    t = threading.Thread(target=work, daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while t.is_alive():
            try:
                q.get(timeout=0.1)
            except queuelib.Empty:
                pass


def api_open(path, *, verify_reads=False, cache_dir=None, index=None, volume=None, session=None,
             format=None):
    """Open anything the command line takes: a partition image (split,
    compressed), a raw disk image, a Clonezilla image directory, a
    sparsebak/Wyng archive (volume=, session=).  A VirtualImage; use it as a
    context manager (or close() it)."""
    backup = open_backup(path, format, volume=volume, session=session)
    ctx = OpenContext(DEFAULT_INDEX_BITS, verify_reads, True, cache_dir=cache_dir,
                      index_file=index)
    try:
        member = backup.default_member()
    except VimageError:
        member = None
    return VirtualImage(backup, member, ctx)


open = api_open          # vimage.open(); the module itself calls io.open for files
__all__ = ["open", "VirtualImage", "Report", "Problem", "VimageError", "FormatError",
           "ContainerError", "ChecksumError", "MissingDependency", "OutputError", "main",
           "__version__"]


# ===========================================================================
# Commands
# ===========================================================================

def say(args, text):
    if not args.quiet:
        sys.stderr.write(text + "\n")


def describe(image):
    """One line: what this image is."""
    parts = ["%s image" % image.format + (" of %s" % image.filesystem if image.filesystem else "")]
    parts.append("partition %s" % (human(image.size) if image.size is not None else "size unknown"))
    if image.used_blocks is not None:
        parts.append("%d of %d blocks of %d bytes used" % (image.used_blocks, image.total_blocks,
                                                            image.block_size))
    if image.checksum != "none":
        parts.append("checksum %s" % image.checksum)
    comp = image.container.get("compression")
    if comp:
        parts.append("%s-compressed" % comp)
    if image.container.get("pieces", 1) > 1:
        parts.append("%d pieces" % image.container["pieces"])
    return ", ".join(parts)


def open_input(args):
    """The backup the command line names."""
    return open_backup(args.image, getattr(args, "format", None),
                       volume=getattr(args, "volume", None),
                       session=getattr(args, "session", None),
                       all_sessions=getattr(args, "all_sessions", False))


def print_info(d, indent=""):
    """info as text: scalars as 'key  value', lists of objects as tables."""
    scalars = [(k, v) for k, v in d.items() if not isinstance(v, (list, dict))]
    width = max([len(k) for k, _v in scalars] or [0])
    for key, value in scalars:
        if value is None:
            value = "-"
        elif key in ("size", "disk_size") or key.endswith("_size") and isinstance(value, int) \
                and value >= 1024:
            value = "%d bytes (%s)" % (value, human(value))
        elif isinstance(value, bool):
            value = "yes" if value else "no"
        print("%s%-*s  %s" % (indent, width, key, value))
    for key, value in d.items():
        if isinstance(value, dict):
            print("%s%s:" % (indent, key))
            print_info(value, indent + "  ")
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            print("%s%s:" % (indent, key))
            for item in value:
                print("%s  - %s" % (indent, ", ".join(
                    "%s %s" % (k, v) for k, v in item.items()
                    if v is not None and not isinstance(v, (list, dict)) and v is not False)))
                for k, v in item.items():
                    if isinstance(v, (list, dict)) and v:
                        print("%s      %s: %s" % (indent, k, json.dumps(v)))
        elif isinstance(value, list):
            for v in value:
                print("%s%s: %s" % (indent, key.rstrip("s") if key.endswith("s") else key, v))


def cmd_info(args):
    backup = open_input(args)
    try:
        d = backup.info()
        if args.json:
            print(json.dumps(d, sort_keys=True))
            return 0
        print_info(d)
        for m in backup.members:
            for note in getattr(m, "notes", []):
                print("note: %s" % note)
            for p in getattr(m, "header_problems", []):
                print("warning: %s" % p)
        return 0
    finally:
        backup.close()


def cmd_verify(args):
    backup = open_input(args)
    several = len(backup.verify_members()) > 1
    say(args, "%s: %s" % (args.image, backup_line(backup)))

    def on_problem(name, p):
        print("BAD: %s%s" % ("%s: " % name if several and name else "", p), flush=True)

    def on_member(name, level, words, bad):
        if several:
            print("%s: %s: %s" % (name, "FAILED" if bad else VERDICT[level],
                                  summary_of(bad) if bad else words), flush=True)
    progress = SharedProgress(None, "verify", args.quiet)
    try:
        report = verify_backup(backup, on_problem, on_member, progress,
                               stdin=args.image == "-", say=lambda text: say(args, text))
    finally:
        progress.close()
        backup.close()
    print("%s: %s" % (args.image, report.verdict()))
    for line in report.notes:
        print("%s: %s" % (args.image, line))
    for line in report.unchecked:
        print("%s: not checked: %s" % (args.image, line))
    return 0 if report.ok else 1


VERDICT = {"full": "OK", "partial": "partly verified", "none": "not verified"}


def summary_of(problems):
    """'2 checksum, 1 truncated; 1.0 MiB of the partition affected'."""
    kinds = {}
    for p in problems:
        kinds[p.kind] = kinds.get(p.kind, 0) + 1
    affected = sum(p.byte_range[1] - p.byte_range[0] for p in problems if p.byte_range)
    text = ", ".join("%d %s" % (n, k) for k, n in sorted(kinds.items()))
    if affected:
        units = {p.unit for p in problems if p.byte_range}
        text += "; %s of the %s affected" % (human(affected), units.pop() if len(units) == 1
                                             else "data")
    return text


def backup_line(backup):
    """One line: what the input holds."""
    if isinstance(backup, ImageBackup):
        return backup.members[0].describe()
    return backup.describe()


class Output:
    """extract's OUTPUT.  A regular file is written as OUT.part and renamed at
    the end, so an extract that was killed leaves no file that looks whole;
    a block device gets the used blocks only; '-' and pipes get a stream."""

    def __init__(self, path, force, size, inputs):
        self.path, self.fd, self.tmp, self.note = path, None, None, None
        if path == "-":
            self.sink = StreamSink(sys.stdout.fileno(), size)
            return
        try:
            st = os.stat(path)
        except FileNotFoundError:
            st = None
        except OSError as e:
            raise OutputError("cannot use %s: %s" % (path, e.strerror))
        if st is not None:
            for p in inputs:
                try:
                    if os.path.samefile(p, path):
                        raise OutputError("%s is the input image; refusing to overwrite it" % path)
                except OSError:
                    pass
            if stat.S_ISDIR(st.st_mode):
                raise OutputError("%s is a directory" % path)
            if stat.S_ISREG(st.st_mode) and not force:
                raise OutputError("%s exists; use --force to overwrite it" % path)
        cloexec = getattr(os, "O_CLOEXEC", 0)
        try:
            if st is not None and stat.S_ISBLK(st.st_mode):
                self.fd = os.open(path, os.O_WRONLY | cloexec)
                dev_size = os.lseek(self.fd, 0, os.SEEK_END)
                if size is not None and dev_size < size:
                    self.close()
                    raise OutputError("%s holds %d bytes, the partition needs %d"
                                      % (path, dev_size, size))
                self.sink = FileSink(self.fd, size, truncate=False)
            elif st is not None and not stat.S_ISREG(st.st_mode):      # /dev/null, a fifo
                self.fd = os.open(path, os.O_WRONLY | cloexec)
                self.sink = StreamSink(self.fd, size)
            else:
                self.tmp = path + ".part"
                if os.path.lexists(self.tmp):
                    self.note = ("%s is left from an earlier extract that did not finish; it is "
                                 "replaced" % self.tmp)
                    os.unlink(self.tmp)
                self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | cloexec, 0o644)
                self.sink = FileSink(self.fd, size, truncate=True)
        except OSError as e:
            raise OutputError("cannot write %s: %s" % (self.tmp or path, e.strerror))

    def close(self):
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

    def commit(self):
        """All written: flush it and give it its name."""
        if self.tmp is not None:
            os.fsync(self.fd)
        self.close()
        if self.tmp is not None:
            os.rename(self.tmp, self.path)
            self.tmp = None

    def discard(self):
        """Remove what a failed extract wrote (a device or stream is left as is)."""
        try:
            self.close()
        except OSError:
            pass
        if self.tmp is not None:
            try:
                os.unlink(self.tmp)
            except OSError:
                pass
            return True
        return False


def cmd_extract(args):
    backup = open_input(args)
    out = None
    try:
        member = backup.member(args.partition) if args.partition else backup.default_member()
        say(args, "%s: %s" % (args.image, member.describe()))
        out = Output(args.output, args.force, member.size, backup.paths())
        if out.note:
            say(args, "note: " + out.note)
        warnings = []

        def report(p):
            if p.kind in ("checksum", "structure") and args.ignore_checksums:
                warnings.append(p)
                say(args, "warning: %s" % p)
                return
            raise ChecksumError(str(p)) if p.kind == "checksum" else FormatError(str(p))
        start = time.monotonic()
        progress = Progress(member.input_size() if args.image != "-" else None, "extract",
                            args.quiet)
        try:
            member.scan(out.sink, report, progress)
        finally:
            progress.close()
        out.sink.finish(member.size)
        out.commit()
        out = None
        say(args, "%s: wrote %s (%d bytes) in %.1f s%s"
            % (args.output, human(member.size), member.size, time.monotonic() - start,
               "; %d checksum problems ignored" % len(warnings) if warnings else ""))
        return 0
    except OSError as e:
        if out is not None and out.discard():
            raise OutputError("writing %s failed: %s; the partial output is removed"
                              % (args.output, e.strerror))
        raise OutputError("writing %s failed: %s" % (args.output, e.strerror))
    except VimageError as e:
        if out is not None and out.discard():
            e.args = (str(e) + "; the partial output is removed",)
        raise
    finally:
        backup.close()
        if out is not None:
            out.discard()


def _fuse_unmount(path):
    """Unmount a FUSE mount point: fusermount when not root, umount when root."""
    if os.geteuid() != 0:
        for tool in ("fusermount", "fusermount3"):
            if subprocess_quiet([tool, "-u", path]) == 0:
                return True
        return False
    return subprocess_quiet(["umount", path]) == 0


def _files_mount(fstype, virtual, mountpoint, allow_exec=False):
    """Mount the file system inside the virtual partition at mountpoint, read-only
    and harmless: the attempts of FILESYSTEMS in order on a read-only loop
    device.  Returns the command that worked."""
    if fstype not in FILESYSTEMS:
        raise VimageError("cannot tell which file system the partition holds (%s); mount %s "
                          "yourself" % (fstype or "no known superblock", virtual))
    import subprocess
    proc = subprocess.run(["losetup", "-r", "-f", "--show", virtual], stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    loop = proc.stdout.decode().strip()
    if proc.returncode != 0 or not loop:
        raise VimageError("cannot make a read-only loop device of %s: %s"
                          % (virtual, proc.stderr.decode(errors="replace").strip()))
    errors = []
    try:
        for kind, options in FILESYSTEMS[fstype][1]:
            cmd = ["mount", "-t", kind, "-o", safe_options(options, allow_exec), loop, mountpoint]
            try:
                proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE)
            except OSError as e:
                errors.append("%s: %s" % (kind, e))
                continue
            if proc.returncode == 0:
                return " ".join(cmd)
            lines = [l.strip() for l in proc.stderr.decode(errors="replace").splitlines()
                     if l.strip() and not l.strip().startswith("dmesg")]
            errors.append("-t %s -o %s: %s" % (kind, options, lines[-1].split(": ")[-1] if lines
                                                 else "exit status %d" % proc.returncode))
    finally:
        # detached now, the device goes away by itself once the mount lets go
        subprocess_quiet(["losetup", "-d", loop])
    raise VimageError("no read-only mount of the %s file system worked here (%s); install %s"
                      % (fstype, "; ".join(errors), FILESYSTEMS[fstype][2]))


def check_mountpoint(mp):
    if not os.path.isdir(mp):
        raise VimageError("mount point %s does not exist or is not a directory" % mp)
    try:
        if os.listdir(mp):
            raise VimageError("mount point %s is not empty" % mp)
    except PermissionError:
        raise VimageError("mount point %s cannot be read" % mp)
    if mounts_at(mp):
        raise VimageError("something is already mounted at %s" % mp)
    outer = vimage_mount_above(mp)
    if outer:
        raise VimageError("mount point %s lies inside the vimage mount at %s; choose a directory "
                          "outside it" % (mp, outer))


def mount_states():
    """The records of the --files mounts vimage made (RUN_DIR/*.json, root's own)."""
    states = []
    try:
        entries = sorted(os.listdir(RUN_DIR))
    except OSError:
        return states
    for entry in entries:
        path = os.path.join(RUN_DIR, entry)
        if not entry.endswith(".json") or untrusted_reason(path):
            continue
        try:
            with io.open(path) as f:
                states.append(json.load(f))
        except (OSError, ValueError):
            continue
    return states


def vimage_mount_above(path):
    """The vimage mount (FUSE or --files layers) that path lies inside, if any."""
    path = os.path.realpath(path)
    tops = [target for target, fstype, source in mount_table()
            if fstype.startswith("fuse") and source == "vimage"]
    tops += [state.get("mountpoint") or "" for state in mount_states()]
    for top in tops:
        if top and top != "/" and (path == top or path.startswith(top.rstrip("/") + "/")):
            return top
    return None


class MountPlan:
    """What a mount serves: the virtual files, and the file systems --files
    mounts from them (each a directory of the mount point, or the mount point
    itself for a backup of one partition)."""

    def __init__(self, backup, readers, args):
        self.backup, self.args = backup, args
        self.files = OrderedDict()
        self.fstypes, self.unreadable = {}, {}
        for m in backup.members:
            part = readers[m.name]
            self.files[m.name] = (part, access_of(m.paths()))
            errors = []
            self.fstypes[m.name] = detect_filesystem(part, errors) if m.kind != "disk" else None
            if errors:
                self.unreadable[m.name] = errors[0]
        parts = backup.partitions()
        if len(parts) == 1 and not backup.disks():
            self.targets = [(parts[0], "")]
        else:
            self.targets = [(m, files_dir(m)) for m in parts]
        self.layers = []          # what --files mounted, in order (undone in reverse)
        self.files_lines = []

    def mount_files(self, fuse_dir, mp):
        """--files: every mountable partition; the others are listed and skipped."""
        skipped = []
        single = self.targets and self.targets[0][1] == ""
        if not single:
            # a small read-only tmpfs holds one directory per partition
            if subprocess_quiet(["mount", "-t", "tmpfs", "-o", "mode=0755,size=64k,nosuid,nodev,"
                                 "noexec", "vimage-files", mp]) != 0:
                raise VimageError("cannot mount a tmpfs at %s for the partitions' directories" % mp)
            self.layers.append(mp)
        for m, sub in self.targets:
            fstype = self.fstypes[m.name]
            target = os.path.join(mp, sub) if sub else mp
            if not single:
                os.mkdir(target, 0o755)
            if fstype not in FILESYSTEMS:
                why = self.unreadable.get(m.name) or unmountable_reason(m, fstype)
                if single:
                    raise VimageError("cannot mount the files of %s: %s" % (m.name, why))
                skipped.append("%s (%s)" % (m.name, why))
                continue
            try:
                cmd = _files_mount(fstype, os.path.join(fuse_dir, m.name), target, self.args.exec)
            except VimageError as e:
                if single:
                    raise
                skipped.append("%s (%s)" % (m.name, e))
                continue
            self.layers.append(target)
            self.files_lines.append("files: %s (mounted with: %s)" % (target, cmd))
        if not single:
            if len(self.layers) == 1:
                raise VimageError("no partition of %s could be mounted as files: %s"
                                  % (self.args.image, "; ".join(skipped)))
            subprocess_quiet(["mount", "-o", "remount,ro", mp])
        if skipped:
            self.files_lines.append("skipped: " + "; ".join(skipped))

    def unmount_layers(self):
        for target in reversed(self.layers):
            subprocess_quiet(["umount", target])
        self.layers = []


def files_dir(member):
    """The directory of the mount point where --files puts a partition's files."""
    return "part%d" % member.number if isinstance(member, SliceMember) else member.name


def unmountable_reason(member, fstype):
    why = getattr(member, "no_files_reason", None)
    if why:
        return why
    if fstype is None:
        return "no file system vimage knows"
    return "%s cannot be mounted as files" % fstype


def mount_summary(args, backup, plan, fuse_dir, took):
    lines = ["%s: %s" % (args.image, backup_line(backup))]
    for name, (part, _access) in plan.files.items():
        m = next(x for x in backup.members if x.name == name)
        fstype = plan.fstypes[name]
        lines.append("virtual %s: %s (%d bytes%s)" % (
            m.kind, os.path.join(fuse_dir, name), part.size, ", %s" % fstype if fstype else ""))
        if getattr(part, "how", "") and not isinstance(part, (SliceReader, ComposedReader)):
            lines.append("reading: %s" % part.how)
    if took >= 0.05:
        lines.append("ready in %.1f s (index pass included)" % took)
    if args.files:
        lines.extend(plan.files_lines)
    elif len(plan.files) == 1:
        name = next(iter(plan.files))
        fstype = plan.fstypes[name]
        path = os.path.join(fuse_dir, name)
        if fstype in FILESYSTEMS:
            fsck, attempts, _package = FILESYSTEMS[fstype]
            if fsck:
                lines.append("check it:  " + fsck % path)
            kind, options = attempts[0]
            lines.append("mount it:  mount -t %s -o loop,%s %s /mnt/somewhere"
                         % (kind, safe_options(options), path))
    lines.append("unmount:   python3 %s umount %s" % (sys.argv[0] if sys.argv[0].endswith(".py")
                                                       else "vimage.py", args.mountpoint))
    return "\n".join(lines)


def state_path(fuse_dir):
    return os.path.join(RUN_DIR, os.path.basename(fuse_dir) + ".json")


def cmd_mount(args):
    fuse = load_fuse()
    mp = os.path.abspath(args.mountpoint)
    check_mountpoint(mp)
    if args.files and os.geteuid() != 0:
        raise VimageError("--files loop-mounts the file systems and needs root")
    start = time.monotonic()
    backup = open_input(args)
    if args.index and sum(isinstance(m, ImageMember) for m in backup.members) > 1:
        raise VimageError("--index names the index of one image; %s holds several (their "
                          "indexes go to the cache directory)" % args.image)
    ctx = OpenContext(args.index_size, args.verify_reads, args.quiet,
                      index_memory=args.index_memory, cache_dir=args.cache_dir,
                      keep_cache=args.keep_cache, index_file=args.index)
    try:
        readers = ctx.open_all(backup.members)
        plan = MountPlan(backup, readers, args)
    except BaseException:
        ctx.close(True)
        raise
    finally:
        backup.close()
    took = time.monotonic() - start
    fuse_dir = mp
    if args.files:
        os.makedirs(RUN_DIR, mode=0o700, exist_ok=True)
        import tempfile
        fuse_dir = tempfile.mkdtemp(prefix="mnt-", dir=RUN_DIR)
    ops = make_operations(fuse, plan.files,
                          (lambda: unmount_layers_of(fuse_dir, plan)) if args.files else None)
    # One FUSE thread is faster here: Python serializes the work anyway, and
    # several threads only fight over the GIL (measured: 930 vs 572 MB/s).
    options = dict(foreground=True, ro=True, fsname="vimage", subtype="vimage",
                   nothreads=not args.threads, default_permissions=True, debug=args.debug,
                   auto_unmount=True)
    if os.geteuid() == 0:
        options["allow_other"] = True
    foreground = args.foreground or args.debug
    server = {"pid": os.getpid()}

    def finish_mount():
        """Once FUSE answers: the file system layers, the state, the summary."""
        if args.files:
            try:
                plan.mount_files(fuse_dir, mp)
            except VimageError:
                plan.unmount_layers()
                _fuse_unmount(fuse_dir)
                raise
            write_private(state_path(fuse_dir), json.dumps(
                {"mountpoint": mp, "fuse": fuse_dir, "pid": server["pid"],
                 "layers": plan.layers}))
        print(mount_summary(args, backup, plan, fuse_dir, took), flush=True)

    if foreground:
        def ready():
            def later():
                try:
                    finish_mount()
                except VimageError as e:
                    log_error(str(e))
            threading.Thread(target=later, daemon=True).start()
        ops.ready = ready
        try:
            fuse_class(fuse, ops)(ops, fuse_dir, **options)
        except RuntimeError as e:
            raise VimageError("mounting failed: %s" % e)
        finally:
            ctx.close(True)
            if args.files:
                _cleanup_files_state(fuse_dir)
        return 0

    status_r, status_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child == 0:                                    # the process that serves the mount
        try:
            os.close(status_r)
            os.setsid()
            os.chdir("/")
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 0)
            os.dup2(devnull, 1)
            os.dup2(status_w, 2)                      # libfuse's own errors reach the parent

            def ready():
                os.write(status_w, b"\0ready\n")
                os.dup2(devnull, 2)
                os.close(status_w)
            ops.ready = ready
            try:
                fuse_class(fuse, ops)(ops, fuse_dir, **options)
            except BaseException as e:
                os.write(2, ("%s\n" % e).encode())
        finally:
            try:
                ctx.close(True)
            except Exception:
                pass
            if args.files:
                _cleanup_files_state(fuse_dir)
            os._exit(0)
    server["pid"] = child
    os.close(status_w)
    got = b""
    while True:
        chunk = os.read(status_r, 4096)
        if not chunk:
            break
        got += chunk
    os.close(status_r)
    if b"\0ready\n" not in got:
        os.waitpid(child, 0)
        text = got.decode(errors="replace").strip().splitlines()
        raise VimageError("mounting at %s failed: %s" % (fuse_dir, text[-1] if text else
                                                         "the mount process ended"))
    first = next(iter(plan.files))
    for _ in range(100):                              # the kernel answers; make sure
        try:
            if os.stat(os.path.join(fuse_dir, first)).st_size == plan.files[first][0].size:
                break
        except OSError:
            pass
        time.sleep(0.05)
    else:
        _fuse_unmount(fuse_dir)
        raise VimageError("the mount at %s did not become usable" % fuse_dir)
    try:
        finish_mount()
    finally:
        ctx.close(False)                 # the mount process keeps its own copies
    return 0


def unmount_layers_of(fuse_dir, plan):
    """When the FUSE process ends on its own (a signal): the layers on top go
    first (lazily: the files are going away).  A forked server learns them
    from the state its parent wrote."""
    layers = plan.layers
    try:
        if not untrusted_reason(state_path(fuse_dir)):
            with io.open(state_path(fuse_dir)) as f:
                layers = json.load(f).get("layers") or layers
    except (OSError, ValueError):
        pass
    for target in reversed(layers):
        if mounts_at(target):
            subprocess_quiet(["umount", "-l", target])


def _cleanup_files_state(fuse_dir):
    try:
        os.unlink(state_path(fuse_dir))
    except OSError:
        pass
    try:
        os.rmdir(fuse_dir)
    except OSError:
        pass


def cmd_umount(args):
    mp = os.path.realpath(args.mountpoint)
    state = next((d for d in mount_states() if d.get("mountpoint") == mp), None)
    stack = mounts_at(mp)
    if state:
        layers = state.get("layers") or ([mp] if stack else [])
        for target in reversed(layers):
            if mounts_at(target) and subprocess_quiet(["umount", target]) != 0:
                raise VimageError("cannot unmount the file system at %s (busy?)" % target)
        fuse_dir = state["fuse"]
        for _ in range(100):                          # the loop devices let go of the files
            if _fuse_unmount(fuse_dir):
                break
            time.sleep(0.1)
        else:
            raise VimageError("cannot unmount the virtual files at %s" % fuse_dir)
        _wait_gone(state.get("pid"))
        _cleanup_files_state(fuse_dir)
        say(args, "unmounted %s" % mp)
        return 0
    if not stack:
        raise VimageError("%s is not mounted" % mp)
    fstype, source = stack[-1]
    if not (fstype.startswith("fuse") and source == "vimage"):
        raise VimageError("%s is not a vimage mount (%s from %s)" % (mp, fstype, source))
    if not _fuse_unmount(mp):
        raise VimageError("cannot unmount %s (busy?)" % mp)
    say(args, "unmounted %s" % mp)
    return 0


def _wait_gone(pid, timeout=5.0):
    if not pid:
        return
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except OSError:
            return
        time.sleep(0.05)

# ===========================================================================
# Command line
# ===========================================================================

EPILOG = """examples:
  %(p)s info sda1.ext4-ptcl-img.gz.aa          what is in this backup
  %(p)s info --json nvme0n1p2.ntfs-img         the same as one JSON object
  %(p)s verify sda1.ext4-ptcl-img.gz.aa        check every checksum, list bad places
  %(p)s extract sda1.ext4-ptcl-img.gz.aa sda1.raw    restore to a sparse file
  %(p)s extract hda1.partimg.000 /dev/sdb1     restore to a partition
  zcat img.gz | %(p)s extract - - | md5sum     stream in, stream out
""" % {"p": PROG}


def parse_size(text):
    """'256M', '1G', '4096' -> bytes."""
    m = re.match(r"^\s*(\d+)\s*([kKmMgGtT]?)(i?[bB])?\s*$", text)
    if not m:
        raise argparse.ArgumentTypeError("not a size: %r" % text)
    return int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[m.group(2).lower()]


def build_parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress and no chatter on stderr")
    parser = argparse.ArgumentParser(
        prog=PROG, description="Read, verify, extract and mount partclone, ntfsclone, "
        "partimage and raw disk-image backups (split and compressed too).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress and no chatter on stderr")
    parser.add_argument("--version", action="version", version="%s %s" % (PROG, __version__))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name, help_text, example):
        p = sub.add_parser(name, parents=[common], help=help_text, description=help_text,
                           epilog="example:\n  " + example,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        return p
    def inputs(p, stdin=True):
        p.add_argument("image", help="image file, first piece of a split set, image directory "
                       "or backup folder" + (", or - for stdin" if stdin else ""))
        p.add_argument("--format", choices=["raw"],
                       help="take an input with no known header as a raw (dd) image")
        p.add_argument("--volume", metavar="NAME", help="the volume of a backup archive")
        p.add_argument("--session", metavar="S",
                       help="the session of a backup archive (default: the newest)")
    p = add("info", "show what an image or backup holds",
            "%s info sda1.ext4-ptcl-img.gz.aa --json" % PROG)
    inputs(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p = add("verify", "read the whole image and check every checksum",
            "%s verify sda1.ext4-ptcl-img.gz.aa" % PROG)
    inputs(p)
    p.add_argument("--all-sessions", action="store_true",
                   help="a backup archive: verify the volume as of every session")
    p = add("extract", "write the raw partition or disk (to a sparse file, a device or stdout)",
            "%s extract sda1.ext4-ptcl-img.gz.aa sda1.raw" % PROG)
    inputs(p)
    p.add_argument("output", help="output file, block device, or - for stdout")
    p.add_argument("--partition", metavar="N",
                   help="only this partition (its number, or its name as info shows it)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("--ignore-checksums", action="store_true",
                   help="write the data even where checksums do not match (listed as warnings)")
    p = add("mount", "show the partition as a read-only file through FUSE (no disk space used)",
            "%s mount sda1.ext4-ptcl-img.aa /mnt/img\n  %s mount --files sda1.ext4-ptcl-img.aa "
            "/mnt/files   (root: the files themselves)" % (PROG, PROG))
    inputs(p, stdin=False)
    p.add_argument("mountpoint", help="an empty directory")
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    p.add_argument("-d", "--debug", action="store_true", help="FUSE debug output (implies -f)")
    p.add_argument("--threads", action="store_true",
                   help="serve FUSE requests from several threads (default: one)")
    p.add_argument("--index-size", type=int, default=DEFAULT_INDEX_BITS, metavar="N",
                   help="bits of bitmap per index entry (default %d)" % DEFAULT_INDEX_BITS)
    p.add_argument("--files", action="store_true",
                   help="also loop-mount the file system read-only at MOUNTPOINT (root)")
    p.add_argument("--exec", action="store_true",
                   help="with --files: allow running programs from the backup (never setuid)")
    p.add_argument("--verify-reads", action="store_true",
                   help="check the checksum group of every block served; EIO on a mismatch")
    p.add_argument("--index", metavar="FILE",
                   help="where to save/reuse the seek index of a compressed image "
                   "(default: in the cache directory)")
    p.add_argument("--index-memory", type=parse_size, default=256 * MiB, metavar="SIZE",
                   help="memory for in-memory seek points of gzip streams (default 256M)")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="for indexes and cache files (default $XDG_CACHE_HOME/vimage "
                   "or ~/.cache/vimage)")
    p.add_argument("--keep-cache", action="store_true",
                   help="keep a cache file at unmount, to reuse it next time")
    p = add("umount", "unmount what `mount` mounted (both layers with --files)",
            "%s umount /mnt/img" % PROG)
    p.add_argument("mountpoint")
    return parser


COMMANDS = {"info": cmd_info, "verify": cmd_verify, "extract": cmd_extract,
            "mount": cmd_mount, "umount": cmd_umount}


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "quiet", False):
        args.quiet = False
    if not args.command:
        parser.print_help(sys.stderr)
        return 2
    try:
        return COMMANDS[args.command](args)
    except VimageError as e:
        sys.stderr.write("%s: error: %s\n" % (PROG, e))
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        try:
            sys.stdout = None
        except Exception:
            pass
        return 1
    except MemoryError:
        sys.stderr.write("%s: error: out of memory\n" % PROG)
        return 1
    except OSError as e:
        sys.stderr.write("%s: error: %s\n" % (PROG, e))
        return 1
    except Exception as e:     # a bug: still one line, unless debugging
        if os.environ.get("VIMAGE_DEBUG"):
            raise
        sys.stderr.write("%s: error: internal error (%s: %s); set VIMAGE_DEBUG=1 for details\n"
                         % (PROG, type(e).__name__, e))
        return 1


if __name__ == "__main__":
    sys.exit(main())
