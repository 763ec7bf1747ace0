#!/usr/bin/env python3
"""Write the deterministic source tree used to build the vimage test filesystems.

Usage: python3 testdata/mktree.py DIR

DIR must not exist or must be empty. The content only depends on this script
(random.Random with fixed seeds, getrandbits-based bytes so that it works on
Python 3.8). File times are not set here; make-testdata.sh sets them.
Total size: about 1.1 MiB in 14 files.
"""
import os
import random
import sys


def rbytes(rng, n):
    """n random bytes from rng (random.Random.randbytes is Python 3.9+)."""
    if n == 0:
        return b""
    return rng.getrandbits(n * 8).to_bytes(n, "little")


def lorem(n_lines, tag):
    words = ("lorem ipsum dolor sit amet consectetur adipiscing elit sed do "
             "eiusmod tempor incididunt ut labore et dolore magna aliqua").split()
    out = []
    for i in range(n_lines):
        w = " ".join(words[(i + k) % len(words)] for k in range(6 + i % 7))
        out.append("%s %06d %s.\n" % (tag, i, w))
    return "".join(out).encode("ascii")


# (relative path, bytes); directories are created as needed.
def entries():
    rng = random.Random(20240102)
    return [
        ("README.txt", b"vimage test tree\nmade by testdata/mktree.py\n"),
        ("text/lorem.txt", lorem(3000, "L")),                       # ~230 KB, compressible
        ("text/numbers.csv", "".join("%d,%d,%d\n" % (i, i * i, i ^ 0x5A5A)
                                     for i in range(10000)).encode()),
        ("bin/random-a.bin", rbytes(rng, 160000)),                  # incompressible
        ("bin/random-b.bin", rbytes(rng, 77777)),                   # odd size
        ("bin/zero-runs.bin", rbytes(rng, 4096) + bytes(65536) + rbytes(rng, 1000)
         + bytes(32768) + rbytes(rng, 333) + bytes(8192)),
        ("bin/zeros.bin", bytes(65536)),
        ("nested/a/b/c/deep.txt", b"hello from a deep directory\n" * 10),
        ("nested/a/b/sibling.bin", rbytes(rng, 12345)),
        ("nested/a/empty.dat", b""),
        ("nested/hidden/.keep", b""),
        ("with space/file name.txt", b"a file name with a space\n"),
        (u"utf8/\u00e9t\u00e9-\u65e5\u672c-\u00fc.txt", u"UTF-8 name: \u00e9t\u00e9 \u65e5\u672c\n".encode("utf-8")),
        ("last.txt", b"the end\n"),
    ]


def main(argv):
    if len(argv) != 2:
        sys.stderr.write("usage: mktree.py DIR\n")
        return 2
    root = argv[1]
    os.makedirs(root, exist_ok=True)
    if os.listdir(root):
        sys.stderr.write("mktree.py: %s is not empty\n" % root)
        return 1
    total = 0
    for rel, data in entries():
        path = os.path.join(root, *rel.split("/"))
        d = os.path.dirname(path)
        if not os.path.isdir(d):
            os.makedirs(d)
        with open(path, "wb") as f:
            f.write(data)
        total += len(data)
    os.makedirs(os.path.join(root, "emptydir-top"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
