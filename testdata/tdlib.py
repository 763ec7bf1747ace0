#!/usr/bin/env python3
"""Helper for make-testdata.sh (Python 3.8+, standard library only).

  tdlib.py rec RECORDS NAME key=value key:=JSON ...   append one manifest record
  tdlib.py finish RECORDS OUTDIR                      write OUTDIR/expected.json

"finish" adds facts read back from the files themselves: partclone.info output
for partclone images, the ntfsclone image header, sizes and sha256 of the files.
"""
import hashlib
import json
import os
import re
import struct
import subprocess
import sys


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cmd_rec(records, name, args):
    rec = {"name": name}
    for a in args:
        k, v = a.split("=", 1)
        if k.endswith(":"):
            rec[k[:-1]] = json.loads(v)
        else:
            rec[k] = v
    with open(records, "a") as f:
        f.write(json.dumps(rec, sort_keys=True) + "\n")


def partclone_info(path):
    """Run the real partclone.info and parse what it prints."""
    log = os.path.join(os.environ.get("TMPDIR", "/tmp"), "vimage-pcinfo.log")
    p = subprocess.run(["partclone.info", "-s", path, "-L", log],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = p.stdout.decode("utf-8", "replace")
    try:
        os.unlink(log)
    except OSError:
        pass
    facts = {}

    def grab(rx, key, conv=str):
        m = re.search(rx, out, re.M)
        if m:
            facts[key] = conv(m.group(1).strip())

    grab(r"^File system:\s*(\S+)", "filesystem")
    grab(r"^Device size:.*=\s*(\d+) Blocks", "total_blocks", int)
    grab(r"^Space in use:.*=\s*(\d+) Blocks", "used_blocks", int)
    grab(r"^Block size:\s*(\d+) Byte", "block_size", int)
    grab(r"^image format:\s*(\S+)", "image_version")
    grab(r"^with partclone:\s*(\S+)", "image_tool_version")
    grab(r"^checksum algo:\s*(\S+)", "checksum", lambda s: s.lower())
    grab(r"^checksum size:\s*(\S+)", "checksum_size",
         lambda s: int(s) if s.isdigit() else None)
    grab(r"^blocks/checksum:\s*(\S+)", "blocks_per_checksum",
         lambda s: int(s) if s.isdigit() else None)
    grab(r"^reseed checksum:\s*(\S+)", "reseed",
         lambda s: {"yes": True, "no": False}.get(s))
    facts["partclone_info_rc"] = p.returncode
    return facts


def partclone_header(path):
    """A few raw fields of a format-0002 header (for cross-checking)."""
    with open(path, "rb") as f:
        h = f.read(110)
    if h[30:34] != b"0002":
        return {}
    dev_size, total, used = struct.unpack_from("<QQQ", h, 0x36)
    return {"device_size": dev_size}


def ntfsclone_header(path):
    with open(path, "rb") as f:
        h = f.read(50)
    magic, major, minor, csize, dev_size, nr_clusters, inuse, off = \
        struct.unpack("<16sBBIQqQI", h)
    assert magic == b"\0ntfsclone-image", magic
    return {"image_version": "%d.%d" % (major, minor), "block_size": csize,
            "device_size": dev_size, "total_blocks": nr_clusters,
            "used_blocks": inuse, "offset_to_image_data": off,
            "filesystem": "NTFS"}


def cmd_finish(records, outdir):
    manifest = {}
    with open(records) as f:
        for line in f:
            rec = json.loads(line)
            name = rec.pop("name")
            fmt = rec.get("format")
            path = os.path.join(outdir, name)
            if fmt == "partclone" and rec.get("origin") is None:
                info = partclone_info(path)
                for k, v in info.items():
                    rec.setdefault(k, v)
                rec.update(partclone_header(path))
            elif fmt == "ntfsclone":
                for k, v in ntfsclone_header(path).items():
                    rec.setdefault(k, v)
            files = rec.get("files") or [name]
            rec["files"] = [{"name": n,
                             "bytes": os.path.getsize(os.path.join(outdir, n)),
                             "sha256": sha256_file(os.path.join(outdir, n))}
                            for n in files]
            manifest[name] = rec
    with open(os.path.join(outdir, "expected.json"), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")


def main(argv):
    if len(argv) >= 3 and argv[1] == "rec":
        cmd_rec(argv[2], argv[3], argv[4:])
    elif len(argv) == 4 and argv[1] == "finish":
        cmd_finish(argv[2], argv[3])
    else:
        sys.stderr.write(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
