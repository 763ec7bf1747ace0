"""Bad headers: every numeric field of every format's header (partclone 0001
and 0002, ntfsclone, partimage's volume, main and local headers and EXT
records, MBR/EBR/GPT tables, Clonezilla's files) set to 0, 1, its maximum
and a value past the end of the image; then a Hypothesis campaign of random
values.  info, verify and extract must each end in a clean message or a
report: no traceback, no hang, no allocation beyond what the image's size
allows (a 1 GiB address-space limit in the worker)."""
import gzip
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import TESTDATA, image_path

HERE = os.path.dirname(os.path.abspath(__file__))

# format sample -> [(name, file offset, struct code)]
FIELDS = {
    "ext4-4k.ptcl-img": [  # partclone 0002
        ("device_size", 52, "<Q"), ("total_blocks", 60, "<Q"), ("used_blocks", 68, "<Q"),
        ("used_bitmap", 76, "<Q"), ("block_size", 84, "<I"), ("feature", 88, "<I"),
        ("image_version", 92, "<H"), ("cpu_bits", 94, "<H"), ("checksum_mode", 96, "<H"),
        ("checksum_size", 98, "<H"), ("blocks_per_checksum", 100, "<I"), ("reseed", 104, "<B"),
        ("bitmap_mode", 105, "<B")],
    "ext4-v1-0.2.89.ptcl-img": [  # partclone 0001
        ("block_size", 36, "<i"), ("device_size", 40, "<Q"), ("total_blocks", 48, "<Q"),
        ("used_blocks", 56, "<Q")],
    "ntfs.ntfsclone-img": [
        ("major", 16, "<B"), ("cluster_size", 18, "<I"), ("device_size", 22, "<Q"),
        ("nr_clusters", 30, "<q"), ("inuse", 38, "<Q"), ("offset_to_data", 46, "<I")],
    "ext2.partimg.000": [  # partimage: volume header, main header (at 512), EXT000, local header
        ("volume_number", 96, "<I"), ("compression", 512 + 9540, "<I"),
        ("partition_size", 512 + 9592, "<Q"), ("mbr_count", 512 + 9792, "<I"),
        ("mbr_size", 512 + 9796, "<I"), ("encrypt", 512 + 9800, "<I"),
        ("ext000_length", 16921 + 18, "<I"), ("block_size", 17164, "<Q"),
        ("used_blocks", 17164 + 8, "<Q"), ("total_blocks", 17164 + 16, "<Q"),
        ("bitmap_size", 17164 + 24, "<Q")],
}


def disk_fields():
    """MBR, EBR and GPT fields of the bundled raw disks (with the GPT header
    CRC recomputed, so that the parser goes past it)."""
    with open(os.path.join(TESTDATA, "rawdisk", "expected.json")) as f:
        mbr = json.load(f)["mbr.img"]
    ebr2 = [p for p in mbr["partitions"] if p.get("kind") == "logical"][1]["start"] - 2048 * 512
    fields = [("mbr.img", "slot%d_%s" % (i, what), 446 + 16 * i + off, "<I")
              for i in range(4) for what, off in (("start", 8), ("sectors", 12))]
    fields += [("mbr.img", "ebr2_%s" % what, ebr2 + 446 + off, "<I")
               for what, off in (("start", 8), ("sectors", 12), ("link_start", 24),
                                 ("link_sectors", 28))]
    fields += [("gpt.img", name, 512 + off, code) for name, off, code in (
        ("header_size", 12, "<I"), ("my_lba", 24, "<Q"), ("alternate_lba", 32, "<Q"),
        ("first_usable", 40, "<Q"), ("last_usable", 48, "<Q"), ("entries_lba", 72, "<Q"),
        ("entry_count", 80, "<I"), ("entry_size", 84, "<I"))]
    fields += [("gpt.img", "entry1_%s" % what, 1024 + off, "<Q")
               for what, off in (("first_lba", 32), ("last_lba", 40))]
    return fields


@pytest.fixture(scope="module")
def disks(tmp_path_factory):
    d = tmp_path_factory.mktemp("disks")
    for name in ("mbr.img", "gpt.img"):
        with gzip.open(os.path.join(TESTDATA, "rawdisk", name + ".gz")) as fin, \
                open(d / name, "wb") as fout:
            shutil.copyfileobj(fin, fout)
    return d


def values(code, file_size):
    bits = struct.calcsize(code) * 8
    top = (1 << (bits - 1)) - 1 if code[-1].islower() and code[-1] not in "bhiq" else None
    top = (1 << (bits - 1)) - 1 if code[-1] in "bhilq" else (1 << bits) - 1
    past = min(top, file_size + 1)
    return sorted({0, 1, top, past, min(top, file_size * 4096 + 1)})


def mutate(src, dst, offset, code, value, fix_gpt=False):
    data = bytearray(open(src, "rb").read())
    struct.pack_into(code, data, offset, value)
    if fix_gpt:                      # keep the GPT header's own CRC right
        hsize = struct.unpack_from("<I", data, 512 + 12)[0]
        if 92 <= hsize <= 512:
            struct.pack_into("<I", data, 512 + 16, 0)
            struct.pack_into("<I", data, 512 + 16, zlib.crc32(bytes(data[512:512 + hsize])))
    with open(dst, "wb") as f:
        f.write(data)


def run_worker(cases):
    proc = subprocess.run([sys.executable, os.path.join(HERE, "header_worker.py")],
                          input=json.dumps(cases).encode(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=900)
    results = [json.loads(l) for l in proc.stdout.decode().splitlines() if l.startswith("{")]
    assert len(results) == len(cases), proc.stderr.decode()[-3000:]
    return results


def commands(path, out):
    return [["info", path], ["verify", "-q", path], ["extract", "-q", "--force", path, out]]


def check(results):
    bad = []
    for r in results:
        if r["fault"] or r["code"] not in (0, 1) or "Traceback" in r["err"]:
            bad.append("%s -> code %s, %s" % (" ".join(r["argv"]), r["code"],
                                               (r["fault"] or r["err"])[-600:]))
    assert not bad, "\n".join(bad[:10])


def test_every_header_field_at_its_edges(tmp_path, disks):
    cases = []
    out = str(tmp_path / "out.raw")
    n = 0
    for sample, fields in sorted(FIELDS.items()):
        src = image_path(sample)
        size = os.path.getsize(src)
        for name, offset, code in fields:
            for v in values(code, size):
                dst = str(tmp_path / ("%d-%s-%s" % (n, sample, name)))
                n += 1
                mutate(src, dst, offset, code, v)
                cases += commands(dst, out)
    for disk, name, offset, code in disk_fields():
        src = str(disks / disk)
        for v in values(code, os.path.getsize(src)):
            dst = str(tmp_path / ("%d-%s-%s" % (n, disk, name)))
            n += 1
            mutate(src, dst, offset, code, v, fix_gpt=disk == "gpt.img")
            cases.append(["info", dst])
            cases.append(["verify", "-q", dst])
    check(run_worker(cases))


def clonezilla_cases(tmp_path):
    """Clonezilla's own files made absurd: table dumps, the disk size, the
    saved sectors, the parts list."""
    base = os.path.join(TESTDATA, "clonezilla", "mbr-zstd-split")
    edits = {
        "pt.sf start 0": ("loop0-pt.sf", lambda t: t.replace("start=        2048", "start=0")),
        "pt.sf size huge": ("loop0-pt.sf", lambda t: t.replace("size=       32768",
                                                               "size=99999999999999")),
        "pt.sf garbage": ("loop0-pt.sf", lambda t: "label: dos\n/dev/loop0p1 : start=x, size=,\n"),
        "pt.sf empty": ("loop0-pt.sf", lambda t: ""),
        "parted size 0": ("loop0-pt.parted", lambda t: t.replace("98304s", "0s")),
        "parted size huge": ("loop0-pt.parted", lambda t: t.replace("98304s", "9" * 30 + "s")),
        "parts garbage": ("parts", lambda t: "../../etc/passwd loop0p9 \x00\n"),
        "disk unknown": ("disk", lambda t: "sdz\n"),
        "swap info garbage": ("swappt-loop0p6.info", lambda t: 'UUID="not-a-uuid"\nLABEL="%s"\n'
                              % ("x" * 500)),
        "MD5SUMS garbage": ("MD5SUMS", lambda t: "zz\n" + "1" * 32 + "  /etc/passwd\n"),
    }
    cases = []
    for i, (what, (name, edit)) in enumerate(sorted(edits.items())):
        d = tmp_path / ("cz%d" % i)
        shutil.copytree(base, d)
        p = d / name
        p.write_text(edit(p.read_text()))
        cases += commands(str(d), str(tmp_path / "out.raw"))
    for i, (name, data) in enumerate([("loop0-mbr", b"\xff" * 7), ("loop0-hidden-data-after-mbr",
                                                                     b"\x01" * 99),
                                      ("loop0p2-ebr", b"")]):
        d = tmp_path / ("czb%d" % i)
        shutil.copytree(base, d)
        (d / name).write_bytes(data)
        cases += commands(str(d), str(tmp_path / "out.raw"))
    return cases


def test_clonezilla_files_at_their_edges(tmp_path):
    check(run_worker(clonezilla_cases(tmp_path)))


CAMPAIGN = [(s, f) for s, fields in sorted(FIELDS.items()) for f in fields]


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, len(CAMPAIGN) - 1), st.integers(0, (1 << 64) - 1)),
                min_size=1, max_size=3))
def test_random_header_values(tmp_path, changes):
    """Hypothesis: several fields of one image at random values at once."""
    by_sample = {}
    for k, v in changes:
        sample, field = CAMPAIGN[k]
        by_sample.setdefault(sample, []).append((field, v))
    cases = []
    for sample, fields in by_sample.items():
        data = bytearray(open(image_path(sample), "rb").read())
        for (_name, offset, code), v in fields:
            bits = struct.calcsize(code) * 8
            v &= (1 << bits) - 1
            if code[-1] in "bhilq" and v >= 1 << (bits - 1):
                v -= 1 << bits
            struct.pack_into(code, data, offset, v)
        dst = tmp_path / ("rand-" + sample)
        dst.write_bytes(bytes(data))
        cases += commands(str(dst), str(tmp_path / "out.raw"))
    check(run_worker(cases))
