#!/usr/bin/env python3
"""vimage - read partclone, ntfsclone, partimage and raw disk-image backups.

One file, copied next to a backup on a rescue stick and run with Python 3.8+.

What it reads (detected by magic bytes, never by file name):
  * partclone images, format 0002 (checksums none, CRC32, XXH64, XXH128, any
    blocks-per-checksum, reseed on/off, both endians) and format 0001
    (partclone < 0.3: byte bitmap, per-block CRC with the old CRC quirk);
  * ntfsclone --save-image images, versions 10.0 and 10.1;
  * partimage 0.6 images, single files and multi-volume sets (.000, .001 ...);
  * raw images (dd), i.e. any stream with none of the magics above.
Containers around them: split sets as Clonezilla writes them (.aa, .ab ...,
or longer suffixes), compressed with gzip/pigz, bzip2, xz, lzma, lzip (stdlib)
or zstd, lz4, lzop (optional packages), or read from stdin ("-").

What it promises:
  * input images are only ever opened read-only;
  * `extract` writes, byte for byte, what the real tool's restore writes
    (unused blocks read as zeros);
  * `verify` checks every checksum the format has and names each bad place;
  * bad input gives a one-line error and exit status 1, never a traceback.

Subcommands: info, verify, extract, mount, umount.  `mount` serves the
partition as one read-only file through FUSE, compressed images included
(seek points, or a cache file where a codec has none); it needs fusepy (or
mfusepy).  Everything else runs on the standard library alone.
Optional speed-ups: tqdm (progress bars), xxhash (fast XXH64/XXH128).
"""

import argparse
import bisect
import bz2
import errno
import io
import json
import lzma
import os
import re
import stat
import struct
import sys
import threading
import time
import weakref
import zlib
from array import array
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
        if self.enabled:
            tqdm = optional_module("tqdm")
            if tqdm is not None:
                self._bar = tqdm.tqdm(total=total, desc=desc, unit="B", unit_scale=True,
                                      unit_divisor=1024, leave=False)

    def update_to(self, done):
        if not self.enabled:
            return
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
        else:
            sys.stderr.write("\r" + " " * 79 + "\r")
            sys.stderr.flush()


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


class Segmented:
    """Thread-safe random reads over a list of file segments (see segments())."""

    def pread(self, n, offset):
        """Up to n bytes at offset (short only at the end)."""
        parts = []
        for fd, off, length in self.segments(offset, n):
            data = os.pread(fd, length, off)
            parts.append(data)
            if len(data) < length:
                raise ContainerError("an image file shrank while being read")
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def preadv_into(self, bufs, offset):
        """Fill the writable buffers `bufs`, in order, from `offset` on: one
        preadv per file segment (and per IOV_MAX buffers), no copies."""
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
                if os.preadv(fd, part, off) != want:
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
        pos = 0
        try:
            for p in self.paths:
                fd = os.open(p, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                self.fds.append(fd)
                st = os.fstat(fd)
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
        data = self.pread(n, self.pos)
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
        self.fds = []


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

    def __init__(self, kind, message, image_offset=None, byte_range=None, block_range=None):
        self.kind = kind                  # 'checksum', 'truncated', 'structure'
        self.message = message
        self.image_offset = image_offset
        self.byte_range = byte_range      # (first, end) partition bytes
        self.block_range = block_range    # (first, last) block numbers

    def __str__(self):
        parts = [self.message]
        if self.image_offset is not None:
            parts.append("at image offset %d" % self.image_offset)
        if self.byte_range is not None:
            parts.append("partition bytes %d-%d" % (self.byte_range[0], self.byte_range[1] - 1))
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
    """Write payload (the blocks of spans, back to back) to the sink."""
    pos = 0
    for start, count in spans:
        n = count * bs
        sink.write(start * bs, payload[pos:pos + n])
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
            if len(buf) < nbytes:
                hint = " (volume %s is missing)" % self.stream.missing if self.stream.missing else ""
                report(Problem("truncated", "image is truncated%s: %d of %d used blocks present"
                               % (hint, done_data // bs, self.used_blocks),
                               image_offset=self.offset + len(buf)))
                return
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
            done_data += groups * PI_CHECK_EVERY if groups else tail_bytes
            self._progress(progress)
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
    """A plain partition image (dd): the stream is the partition."""

    format = "raw"

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


# Magic at offset 0 of the decompressed stream -> reader.  Anything else is raw.
FORMATS = [
    (PartcloneImage.MAGIC, PartcloneImage),
    (NtfscloneImage.MAGIC, NtfscloneImage),
    (PartimageImage.MAGIC, PartimageImage),
]


def detect_image(stream, container, path):
    """The reader for the format at the front of a peekable stream."""
    try:
        head = stream.peek(64)
        for magic, reader in FORMATS:
            if head.startswith(magic):
                return reader(stream, container, path)
        if not head:
            raise FormatError("%s is empty" % path)
        return RawImage(stream, container, path)
    except BaseException:
        stream.close()
        raise


def open_image(path):
    """Open IMAGE and return the reader for its format."""
    stream, container = open_stream(path)
    return detect_image(stream, container, path)


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
        from collections import OrderedDict
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

    def run(self, index):
        """The pass for codecs whose points are known before decoding (from
        listed(): point, input offset after it, decoded length or None)."""
        out_pos = 0
        for point, in_end, length in self.listed():
            out = self.decode(point, length)
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

    def _find(self, buf, start_bit, which):
        """First bit position >= start_bit where the magic starts, or -1: the
        bytes fully inside the magic are found in C, the edge bits checked."""
        best = -1
        for key, s, m0, v0, m6, v6, lead in self.patterns[which]:
            i = buf.find(key, max(0, start_bit // 8 - 1) + lead)
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
                i = buf.find(key, i + 1)
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

    def run(self, index):
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
            buf_off = base                  # input byte offset of buf[0]
            buf = files.pread(2 * MiB, base)
            pos = 32                        # bit position (relative to buf) of the next magic
            combined = 0
            while True:
                if pos + 48 > len(buf) * 8:
                    raise ContainerError("bzip2 stream is truncated at input offset %d" % (buf_off + len(buf)))
                value = self._bits(buf, pos, pos + 48)
                if value == self.END:
                    stored = self._bits(buf, pos + 48, pos + 80)
                    if stored != combined:
                        raise ContainerError("bzip2 stream CRC mismatch at input offset %d" % (buf_off + pos // 8))
                    base = buf_off + (pos + 80 + 7) // 8
                    break
                if value != self.BLOCK:
                    raise ContainerError("bzip2 stream is corrupt at input offset %d" % (buf_off + pos // 8))
                nxt = -1
                while nxt < 0:
                    nb = self._find(buf, pos + 48, 0)
                    ne = self._find(buf, pos + 48, 1)
                    cands = [c for c in (nb, ne) if c >= 0]
                    if cands:
                        nxt = min(cands)
                        # the END magic needs its CRC in the buffer too
                        if nxt + 80 <= len(buf) * 8:
                            break
                        nxt = -1
                    more = files.pread(2 * MiB, buf_off + len(buf))
                    if not more:
                        raise ContainerError("bzip2 stream is truncated at input offset %d"
                                             % (buf_off + len(buf)))
                    buf += more
                crc = self._bits(buf, pos + 48, pos + 80)
                out = None
                for _try in range(4):      # block data may hold the magic by chance
                    nbits = nxt - pos
                    try:
                        out = self._decode_block(level, self._bits(buf, pos, nxt), nbits, crc)
                        break
                    except ContainerError:
                        later = [c for c in (self._find(buf, nxt + 1, 0), self._find(buf, nxt + 1, 1))
                                 if c >= 0]
                        if not later:
                            raise
                        nxt = min(later)
                if out is None:
                    raise ContainerError("bzip2 block at input offset %d is corrupt" % (buf_off + pos // 8))
                index.add(out_pos, ("bz2", level, buf_off * 8 + pos, nbits, crc))
                combined = (((combined << 1) | (combined >> 31)) & M32) ^ crc
                out_pos += len(out)
                self.out_pos, self.in_pos = out_pos, buf_off + nxt // 8
                yield out
                # drop what lies before the next block
                drop = nxt // 8
                buf, buf_off, pos = buf[drop:], buf_off + drop, nxt - drop * 8
        self.size = out_pos

    def decode(self, point, length):
        _kind, level, first, nbits, crc = point
        buf = self.files.pread((first % 8 + nbits + 7) // 8, first // 8)
        return self._decode_block(level, self._bits(buf, first % 8, first % 8 + nbits), nbits, crc,
                                  length)


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
        os.makedirs(self.cache_root, mode=0o700, exist_ok=True)
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
        os.makedirs(self.cache_root, mode=0o700, exist_ok=True)
        fd = os.open(self.cache_file, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
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
            os.makedirs(os.path.dirname(os.path.abspath(self.index_file)), exist_ok=True)
            tmp = self.index_file + ".tmp"
            with open(tmp, "wb") as f:
                f.write(json.dumps(doc).encode() + b"\n")
                for data in blobs:
                    f.write(data)
            os.replace(tmp, self.index_file)
        except OSError as e:
            log_error("cannot save the index to %s: %s" % (self.index_file, e.strerror))

    def _load(self):
        """Reuse a saved index (or kept cache) when it is for this very image."""
        try:
            with open(self.index_file, "rb") as f:
                line = f.readline()
                doc = json.loads(line.decode())
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
                if not os.path.exists(self.cache_file) or \
                        os.path.getsize(self.cache_file) != doc["size"]:
                    return False
                self.cache_fd = os.open(self.cache_file, os.O_RDONLY)
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

DEFAULT_INDEX_BITS = 4096


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
        run straight into out (checksum fields into scratch), zeros between."""
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

    def __init__(self, image, source, quiet=False):
        self.image, self.source = image, source
        self.size, self.cs = image.size, image.block_size
        self.rec = self.cs + 1
        self.index = RunIndex(self.rec)
        problems = []
        run_scan(image, IndexSink(self.index), problems.append, quiet, "index")
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
    return cf, PassSource(cf, Progress(files.size, "index %s" % os.path.basename(path), quiet))


def open_partition(path, index_bits=DEFAULT_INDEX_BITS, verify_reads=False, quiet=False,
                   **copts):
    """(image, virtual partition, close(remove)) for mounting an image.

    Compressed images get their seek index (or cache file) here, in one pass."""
    if path == "-":
        raise VimageError("mount needs an image file, not stdin")
    stream, _container = open_stream(path)
    is_partimage = stream.peek(64).startswith(PartimageImage.MAGIC)
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
        image = detect_image(stream, container, path)
        if isinstance(image, NtfscloneImage):
            if verify_reads:
                raise VimageError("--verify-reads: ntfsclone images have no checksums")
            part = NtfsPartition(image, src, quiet or passer is not None)
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
            if src.error:
                line += "; DAMAGED: %s (reads past decompressed offset %d give EIO)" % (
                    src.error, src.size)
            parts.append(line)
    return "; ".join(parts)


# ===========================================================================
# FUSE: one read-only file, the partition
# ===========================================================================

# file system magic -> name; checked in order on the virtual partition's first bytes
FS_MAGICS = [
    (3, b"NTFS    ", "ntfs"),
    (3, b"EXFAT   ", "exfat"),
    (0, b"XFSB", "xfs"),
    (0x10040, b"_BHRfS_M", "btrfs"),
    (1080, b"\x53\xef", "ext"),
    (1024, b"\x10\x20\xf5\xf2", "f2fs"),
    (1024, b"H+", "hfsplus"),
    (1024, b"HX", "hfsplus"),
    (32768, b"JFS1", "jfs"),
    (65588, b"ReIsEr", "reiserfs"),
    (82, b"FAT32   ", "vfat"),
    (54, b"FAT16   ", "vfat"),
    (54, b"FAT12   ", "vfat"),
]

# file system -> (fsck in no-change mode, mount options that never write)
FS_COMMANDS = {
    "ext2": ("e2fsck -fn %s", "-t ext2 -o loop,ro"),
    "ext3": ("e2fsck -fn %s", "-t ext3 -o loop,ro,noload"),
    "ext4": ("e2fsck -fn %s", "-t ext4 -o loop,ro,noload"),
    "xfs": ("xfs_repair -n -f %s", "-t xfs -o loop,ro,norecovery"),
    "btrfs": ("btrfs check --readonly %s", "-t btrfs -o loop,ro,nologreplay"),
    "ntfs": ("ntfsfix -n %s", "-t ntfs3 -o loop,ro"),
    "vfat": ("fsck.vfat -n %s", "-t vfat -o loop,ro"),
    "exfat": ("fsck.exfat -n %s", "-t exfat -o loop,ro"),
    "hfsplus": ("fsck.hfsplus -n %s", "-t hfsplus -o loop,ro"),
    "f2fs": ("fsck.f2fs --dry-run %s", "-t f2fs -o loop,ro,norecovery"),
    "jfs": ("jfs_fsck -n %s", "-t jfs -o loop,ro"),
    "reiserfs": ("reiserfsck --check %s", "-t reiserfs -o loop,ro,nolog"),
}


def detect_filesystem(part):
    """The file system inside a virtual partition, from its superblock magic."""
    try:
        head = part.read(0, 65536 + 4096)
    except OSError:                 # --verify-reads found a bad group there
        return None
    for offset, magic, name in FS_MAGICS:
        if head[offset:offset + len(magic)] == magic:
            if name == "ext":
                compat, incompat = struct.unpack_from("<II", head, 1024 + 92)
                if incompat & 0x2C0 or incompat & ~0x1E:        # extents, 64bit, flex_bg, ...
                    return "ext4"
                return "ext3" if compat & 0x4 else "ext2"
            return name
    return None


def virtual_name(path):
    """The virtual file's name: the image's name without split/compression suffixes."""
    name = os.path.basename(path)
    name = _SPLIT_RE.sub(r"\1", name)
    name = re.sub(r"\.(\d{3})$", "", name)
    name = re.sub(r"\.(gz|gzip|bz2|bzip2|xz|lzma|lz|lzip|zst|zstd|lz4|lzo)$", "", name)
    return name or "partition.img"


def load_fuse():
    """The fusepy module (libfuse2), else mfusepy (libfuse3)."""
    errors = []
    for module in ("fuse", "mfusepy"):
        try:
            import importlib
            mod = importlib.import_module(module)
            if hasattr(mod, "FUSE") and hasattr(mod, "Operations"):
                return mod
        except (ImportError, OSError, EnvironmentError) as e:
            errors.append("%s: %s" % (module, e))
    raise MissingDependency("mount needs fusepy with libfuse2 (pip install fusepy; apt install "
                            "libfuse2) or mfusepy with libfuse3 (pip install mfusepy)")


def make_operations(fuse, part, name, image_path, files_mount=None):
    """The fusepy Operations class serving `name` as the read-only partition."""
    st = os.stat(image_path)
    now = st.st_mtime
    uid, gid = os.getuid(), os.getgid()

    class PartitionFS(fuse.Operations):
        use_ns = True

        def __init__(self):
            self.ready = None        # called once the kernel has the mount

        def init(self, path):
            if self.ready:
                self.ready()

        def destroy(self, path):
            if files_mount and os.path.ismount(files_mount):
                subprocess_quiet(["umount", "-l", files_mount])

        def getattr(self, path, fh=None):
            t = int(now * 1e9)
            if path == "/":
                return {"st_mode": stat.S_IFDIR | 0o555, "st_nlink": 2, "st_uid": uid,
                        "st_gid": gid, "st_size": 0, "st_atime": t, "st_mtime": t, "st_ctime": t}
            if path == "/" + name:
                return {"st_mode": stat.S_IFREG | 0o444, "st_nlink": 1, "st_uid": uid,
                        "st_gid": gid, "st_size": part.size, "st_blocks": 0,
                        "st_atime": t, "st_mtime": t, "st_ctime": t}
            raise fuse.FuseOSError(errno.ENOENT)

        def readdir(self, path, fh):
            if path != "/":
                raise fuse.FuseOSError(errno.ENOTDIR)
            return [".", "..", name]

        def open(self, path, flags):
            if path != "/" + name:
                raise fuse.FuseOSError(errno.ENOENT)
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
                raise fuse.FuseOSError(errno.EROFS)
            return 0

        def read(self, path, size, offset, fh):
            try:
                return part.read(offset, size)
            except OSError as e:
                log_error("read of %d bytes at %d failed: %s" % (size, offset, e.strerror or e))
                raise fuse.FuseOSError(errno.EIO)
            except VimageError as e:
                log_error("read of %d bytes at %d failed: %s" % (size, offset, e))
                raise fuse.FuseOSError(errno.EIO)

        def statfs(self, path):
            return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": -(-part.size // 4096),
                    "f_bfree": 0, "f_bavail": 0, "f_files": 2, "f_ffree": 0, "f_namemax": 255}

        def access(self, path, amode):
            if amode & os.W_OK:
                raise fuse.FuseOSError(errno.EROFS)
            return 0

        def _refuse(self, *args, **kwargs):
            raise fuse.FuseOSError(errno.EROFS)

        write = create = truncate = unlink = mkdir = rmdir = rename = _refuse
        chmod = chown = symlink = link = utimens = mknod = setxattr = removexattr = _refuse

    return PartitionFS()


def fuse_class(fuse, part):
    """fusepy's FUSE with a zero-copy read: preadv fills libfuse's buffer
    directly (fusepy's own read path copies the data twice more)."""
    base = fuse.FUSE
    if fuse.__name__ != "fuse" or not hasattr(base, "read"):
        return base                     # mfusepy: its own read path
    import ctypes

    class ZeroCopyFUSE(base):
        def read(self, path, buf, size, offset, fip):
            n = max(0, min(size, part.size - offset))
            if n:
                view = memoryview((ctypes.c_char * n).from_address(
                    ctypes.addressof(buf.contents))).cast("B")
                try:
                    part.readinto(offset, view)
                except (OSError, VimageError) as e:
                    log_error("read of %d bytes at %d failed: %s" % (size, offset, e))
                    raise fuse.FuseOSError(errno.EIO)
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


def mounts_at(path):
    """Mount entries (fstype, source) stacked at path, bottom first."""
    path = os.path.realpath(path)
    found = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                sep = fields.index("-")
                target = fields[4].replace("\\040", " ")
                if target == path:
                    found.append((fields[sep + 1], fields[sep + 2]))
    except OSError:
        pass
    return found


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


def cmd_info(args):
    image = open_image(args.image)
    try:
        d = image.info()
        if args.json:
            print(json.dumps(d, sort_keys=True))
            return 0
        width = max(len(k) for k in d)
        for key, value in d.items():
            if value is None:
                value = "-"
            elif key == "size":
                value = "%d bytes (%s)" % (value, human(value))
            elif isinstance(value, bool):
                value = "yes" if value else "no"
            print("%-*s  %s" % (width, key, value))
        for note in image.notes:
            print("note: %s" % note)
        for p in image.header_problems:
            print("warning: %s" % p)
        return 0
    finally:
        image.stream.close()


def run_scan(image, sink, report, quiet, desc):
    progress = Progress(image.stream.input_size, desc, quiet)
    try:
        image.scan(sink, report, progress)
    finally:
        progress.close()
    failed = image.stream.failure()
    if failed is not None:          # the image ended early because its container broke
        raise failed


def cmd_verify(args):
    image = open_image(args.image)
    try:
        say(args, "%s: %s" % (args.image, describe(image)))
        problems = []

        def report(p):
            problems.append(p)
            print("BAD: %s" % p, flush=True)
        start = time.monotonic()
        run_scan(image, NullSink(), report, args.quiet, "verify")
        took = time.monotonic() - start
    finally:
        image.stream.close()
    if problems:
        kinds = {}
        for p in problems:
            kinds[p.kind] = kinds.get(p.kind, 0) + 1
        affected = sum(p.byte_range[1] - p.byte_range[0] for p in problems if p.byte_range)
        print("%s: FAILED: %s; %s of the partition affected"
              % (args.image, ", ".join("%d %s" % (n, k) for k, n in sorted(kinds.items())),
                 human(affected)))
        return 1
    what = "checksums verified" if image.checksum != "none" else "structure read (no data checksums)"
    print("%s: OK: %s, %s in %.1f s" % (args.image, what, human(image.size), took))
    return 0


def open_output(path, force, size, inputs):
    """(fd, sink, created) for extract's OUTPUT."""
    if path == "-":
        return None, StreamSink(sys.stdout.fileno(), size), False
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
    try:
        if st is not None and stat.S_ISBLK(st.st_mode):
            fd = os.open(path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
            dev_size = os.lseek(fd, 0, os.SEEK_END)
            if size is not None and dev_size < size:
                os.close(fd)
                raise OutputError("%s holds %d bytes, the partition needs %d" % (path, dev_size, size))
            return fd, FileSink(fd, size, truncate=False), False
        if st is not None and not stat.S_ISREG(st.st_mode):      # /dev/null, a fifo
            fd = os.open(path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
            return fd, StreamSink(fd, size), False
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
        return fd, FileSink(fd, size, truncate=True), True
    except OSError as e:
        raise OutputError("cannot write %s: %s" % (path, e.strerror))


def cmd_extract(args):
    image = open_image(args.image)
    fd = None
    created = False
    try:
        say(args, "%s: %s" % (args.image, describe(image)))
        inputs = [] if args.image == "-" else split_pieces(args.image) + volume_paths(args.image)
        fd, sink, created = open_output(args.output, args.force, image.size, inputs)
        warnings = []

        def report(p):
            if p.kind in ("checksum", "structure") and args.ignore_checksums:
                warnings.append(p)
                say(args, "warning: %s" % p)
                return
            raise ChecksumError(str(p)) if p.kind == "checksum" else FormatError(str(p))
        start = time.monotonic()
        run_scan(image, sink, report, args.quiet, "extract")
        sink.finish(image.size)
        if fd is not None:
            os.close(fd)
            fd = None
        created = False
        say(args, "%s: wrote %s (%d bytes) in %.1f s%s"
            % (args.output, human(image.size), image.size, time.monotonic() - start,
               "; %d checksum problems ignored" % len(warnings) if warnings else ""))
        return 0
    except OSError as e:
        raise OutputError("writing %s failed: %s" % (args.output, e.strerror))
    except VimageError as e:
        if created:
            e.args = (str(e) + "; %s removed" % args.output,)
        raise
    finally:
        image.stream.close()
        if fd is not None:
            os.close(fd)
        if created:
            try:
                os.unlink(args.output)
            except OSError:
                pass


def _fuse_unmount(path):
    """Unmount a FUSE mount point: fusermount when not root, umount when root."""
    if os.geteuid() != 0:
        for tool in ("fusermount", "fusermount3"):
            if subprocess_quiet([tool, "-u", path]) == 0:
                return True
        return False
    return subprocess_quiet(["umount", path]) == 0


def _files_mount(fstype, virtual, mountpoint):
    """Loop-mount the file system of the virtual partition, read-only, never writing."""
    if fstype not in FS_COMMANDS:
        raise VimageError("cannot tell which file system the partition holds; mount %s yourself"
                          % virtual)
    opts = FS_COMMANDS[fstype][1].split()
    attempts = [["mount"] + opts + [virtual, mountpoint]]
    # where the kernel lacks the driver, a FUSE driver of the same file system
    fallback = {"ntfs": ["ntfs-3g", "-o", "ro"], "vfat": ["fusefat", "-o", "ro"],
                "exfat": ["mount.exfat-fuse", "-o", "ro"]}.get(fstype)
    if fallback:
        attempts.append(fallback + [virtual, mountpoint])
    if fstype == "ext2":
        attempts.append(["mount", "-t", "ext4", "-o", "loop,ro,noload", virtual, mountpoint])
    import subprocess
    err = ""
    for cmd in attempts:
        try:
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
        except OSError as e:
            err = str(e)
            continue
        if proc.returncode == 0:
            return " ".join(cmd)
        lines = [l.strip() for l in proc.stderr.decode(errors="replace").splitlines() if l.strip()]
        err = "; ".join(lines[:2]) or "%s exited with %d" % (cmd[0], proc.returncode)
    raise VimageError("mounting the %s file system failed: %s" % (fstype, err))


def mount_summary(args, image, part, name, path, fstype, took, files_cmd):
    lines = ["%s: %s" % (args.image, describe(image)),
             "virtual partition: %s (%d bytes%s)" % (path, part.size,
                                                    ", %s" % fstype if fstype else "")]
    if getattr(part, "how", ""):
        lines.append("reading: %s" % part.how)
    if took >= 0.05:
        lines.append("ready in %.1f s (index pass included)" % took)
    if files_cmd:
        lines.append("files: %s (mounted with: %s)" % (args.mountpoint, files_cmd))
    elif fstype in FS_COMMANDS:
        fsck, opts = FS_COMMANDS[fstype]
        lines.append("check it:  " + fsck % path)
        lines.append("mount it:  mount %s %s /mnt/somewhere" % (opts, path))
    lines.append("unmount:   python3 %s umount %s" % (sys.argv[0] if sys.argv[0].endswith(".py")
                                                       else "vimage.py", args.mountpoint))
    return "\n".join(lines)


def cmd_mount(args):
    fuse = load_fuse()
    mp = os.path.abspath(args.mountpoint)
    if not os.path.isdir(mp):
        raise VimageError("mount point %s does not exist or is not a directory" % mp)
    try:
        if os.listdir(mp):
            raise VimageError("mount point %s is not empty" % mp)
    except PermissionError:
        raise VimageError("mount point %s cannot be read" % mp)
    if args.files and os.geteuid() != 0:
        raise VimageError("--files loop-mounts the file system and needs root")
    start = time.monotonic()
    image, part, close = open_partition(
        args.image, args.index_size, args.verify_reads, args.quiet,
        index_memory=args.index_memory, cache_dir=args.cache_dir, keep_cache=args.keep_cache,
        index_file=args.index)
    took = time.monotonic() - start
    name = virtual_name(args.image)
    fstype = detect_filesystem(part)
    fuse_dir = mp
    if args.files:
        os.makedirs(RUN_DIR, mode=0o700, exist_ok=True)
        import tempfile
        fuse_dir = tempfile.mkdtemp(prefix="mnt-", dir=RUN_DIR)
    virtual = os.path.join(fuse_dir, name)
    ops = make_operations(fuse, part, name, args.image, mp if args.files else None)
    # One FUSE thread is faster here: Python serializes the work anyway, and
    # several threads only fight over the GIL (measured: 930 vs 572 MB/s).
    options = dict(foreground=True, ro=True, fsname="vimage", subtype="vimage",
                   nothreads=not args.threads, default_permissions=True, debug=args.debug,
                   auto_unmount=True)
    if os.geteuid() == 0:
        options["allow_other"] = True
    foreground = args.foreground or args.debug
    status_r, status_w = os.pipe()

    def finish_mount():
        """Once FUSE answers: the optional file system layer, state, summary."""
        files_cmd = None
        if args.files:
            try:
                files_cmd = _files_mount(fstype, virtual, mp)
            except VimageError:
                _fuse_unmount(fuse_dir)
                raise
            with open(os.path.join(RUN_DIR, os.path.basename(fuse_dir) + ".json"), "w") as f:
                json.dump({"mountpoint": mp, "fuse": fuse_dir, "pid": os.getpid()
                           if foreground else child}, f)
        print(mount_summary(args, image, part, name, virtual, fstype, took, files_cmd), flush=True)

    if foreground:
        os.close(status_r)
        os.close(status_w)

        def ready():
            def later():
                try:
                    finish_mount()
                except VimageError as e:
                    log_error(str(e))
            threading.Thread(target=later, daemon=True).start()
        ops.ready = ready
        try:
            fuse_class(fuse, part)(ops, fuse_dir, **options)
        except RuntimeError as e:
            raise VimageError("mounting failed: %s" % e)
        finally:
            close(True)
            if args.files:
                _cleanup_files_state(fuse_dir)
        return 0

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
                fuse_class(fuse, part)(ops, fuse_dir, **options)
            except BaseException as e:
                os.write(2, ("%s\n" % e).encode())
        finally:
            try:
                close(True)
            except Exception:
                pass
            if args.files:
                _cleanup_files_state(fuse_dir)
            os._exit(0)
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
    for _ in range(100):                              # the kernel answers; make sure
        try:
            if os.stat(virtual).st_size == part.size:
                break
        except OSError:
            pass
        time.sleep(0.05)
    else:
        _fuse_unmount(fuse_dir)
        raise VimageError("the mount at %s did not become usable" % fuse_dir)
    finish_mount()
    close(False)                 # the mount process keeps its own copies
    return 0


def _cleanup_files_state(fuse_dir):
    for path in (os.path.join(RUN_DIR, os.path.basename(fuse_dir) + ".json"),):
        try:
            os.unlink(path)
        except OSError:
            pass
    try:
        os.rmdir(fuse_dir)
    except OSError:
        pass


def cmd_umount(args):
    mp = os.path.realpath(args.mountpoint)
    state = None
    try:
        for entry in os.listdir(RUN_DIR):
            if entry.endswith(".json"):
                try:
                    with open(os.path.join(RUN_DIR, entry)) as f:
                        d = json.load(f)
                except (OSError, ValueError):
                    continue
                if d.get("mountpoint") == mp:
                    state = d
    except OSError:
        pass
    stack = mounts_at(mp)
    if state:
        if stack and subprocess_quiet(["umount", mp]) != 0:
            raise VimageError("cannot unmount the file system at %s (busy?)" % mp)
        fuse_dir = state["fuse"]
        for _ in range(100):                          # the loop device lets go of the file
            if _fuse_unmount(fuse_dir):
                break
            time.sleep(0.1)
        else:
            raise VimageError("cannot unmount the virtual partition at %s" % fuse_dir)
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
    p = add("info", "show what an image holds",
            "%s info sda1.ext4-ptcl-img.gz.aa --json" % PROG)
    p.add_argument("image", help="image file, first piece of a split set, or - for stdin")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p = add("verify", "read the whole image and check every checksum",
            "%s verify sda1.ext4-ptcl-img.gz.aa" % PROG)
    p.add_argument("image", help="image file, first piece of a split set, or - for stdin")
    p = add("extract", "write the raw partition (to a sparse file, a device or stdout)",
            "%s extract sda1.ext4-ptcl-img.gz.aa sda1.raw" % PROG)
    p.add_argument("image", help="image file, first piece of a split set, or - for stdin")
    p.add_argument("output", help="output file, block device, or - for stdout")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("--ignore-checksums", action="store_true",
                   help="write the data even where checksums do not match (listed as warnings)")
    p = add("mount", "show the partition as a read-only file through FUSE (no disk space used)",
            "%s mount sda1.ext4-ptcl-img.aa /mnt/img\n  %s mount --files sda1.ext4-ptcl-img.aa "
            "/mnt/files   (root: the files themselves)" % (PROG, PROG))
    p.add_argument("image", help="image file or first piece of a split set")
    p.add_argument("mountpoint", help="an empty directory")
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    p.add_argument("-d", "--debug", action="store_true", help="FUSE debug output (implies -f)")
    p.add_argument("--threads", action="store_true",
                   help="serve FUSE requests from several threads (default: one)")
    p.add_argument("--index-size", type=int, default=DEFAULT_INDEX_BITS, metavar="N",
                   help="bits of bitmap per index entry (default %d)" % DEFAULT_INDEX_BITS)
    p.add_argument("--files", action="store_true",
                   help="also loop-mount the file system read-only at MOUNTPOINT (root)")
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
