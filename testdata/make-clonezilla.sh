#!/bin/bash
# make-clonezilla.sh - build real Clonezilla image directories for vimage's tests.
#
#   sudo bash testdata/make-clonezilla.sh
#
# Makes, with the REAL ocs-sr (Debian 12: clonezilla 5.3.17, drbl 5.2.7,
# partclone 0.3.23) in batch mode on loop disks:
#
#   testdata/clonezilla/gpt-pigz/        savedisk, GPT, ext4 + FAT16 + ext2, -z1p, -gb (B2SUMS), -i 0
#   testdata/clonezilla/mbr-zstd-split/  savedisk, MBR, ext4 + extended(ext4, swap, FAT16, FAT12),
#                                        -z9p -i 1 (1 MB pieces), -gm -gs, -j2 (hidden data after MBR)
#   testdata/clonezilla/saveparts/       saveparts of 2 logical partitions of the MBR disk, -z5p (xz),
#                                        device names converted loopN -> sda with cnvt-ocs-dev
#   testdata/clonezilla/expected.json    what vimage must find (see README.md there)
#
# Truth (formats/clonezilla.md section 11 steps 5-6): every savedisk directory is
# restored with "ocs-sr -j2 -k0 -scr -icds restoredisk" onto a second zeroed loop
# disk of the same size; the byte-exact truth disk is zeros + the restored
# disk's partition-table areas (LBA 0 .. first partition - 1, every EBR sector,
# on GPT LBA N-33 .. N-1) + every partition image restored by partclone.restore
# onto a zero-filled file + the swap range as the restore's mkswap wrote it.
# The saveparts directory is restored with "ocs-sr restoreparts"; its truth is
# one partclone.restore result per saved partition.
#
# Truth disks are NOT kept in the repository (only their sha256); gzip'ed copies
# go to $VIMAGE_CZ_TRUTH (default /work/scratch/clonezilla-truth).
#
# KEEP_WORK=1 keeps the temp dir (source/restored/truth disks, logs) for inspection.
#
# Needs root (loop devices). Debian 12 packages: clonezilla drbl partclone
# parted gdisk fdisk(util-linux) pigz zstd xz-utils e2fsprogs dosfstools mtools
# python3 gzip coreutils(b2sum).
#
# Determinism: the file systems, partition tables, the partclone streams and
# the zstd/xz files are the same on every run. Not reproducible: time stamps in
# clonezilla-img, Info-*.txt, Info-img-id.txt; the gzip header MTIME that pigz
# writes for stdin input (so the *.gz files and their checksums differ per
# run); blkid.list/blkdev.list list whatever block devices the host has; the
# loop device number (names follow the first free loop device, "losetup -f").
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=$HERE/clonezilla
TRUTH_OUT=${VIMAGE_CZ_TRUTH:-/work/scratch/clonezilla-truth}

export LC_ALL=C.UTF-8 TZ=UTC
EPOCH=1704164645                      # 2024-01-02 03:04:05 UTC
FIXED_DATE='2024-01-02 03:04:05 UTC'
export E2FSPROGS_FAKE_TIME=$EPOCH     # mke2fs, debugfs
export SOURCE_DATE_EPOCH=$EPOCH       # mtools (mmd/mcopy)
export MTOOLS_SKIP_CHECK=1

if [ "$(id -u)" != 0 ]; then
    echo "make-clonezilla.sh: must run as root (loop devices)" >&2
    exit 1
fi
for t in ocs-sr cnvt-ocs-dev parted sgdisk sfdisk partx losetup blockdev python3 truncate \
         sha256sum md5sum sha1sum b2sum gzip pigz zstd xz mkfs.ext4 mkfs.ext2 debugfs e2fsck \
         mkfs.vfat fsck.vfat mmd mcopy mkswap partclone.restore partclone.info partclone.chkimg; do
    command -v "$t" >/dev/null || { echo "missing tool: $t" >&2; exit 1; }
done

T0=$(date +%s)
WORK=$(mktemp -d /tmp/vimage-clonezilla.XXXXXX)
export TMPDIR=$WORK
LOOPS=()
MOUNTS=()
cleanup() {
    set +e
    local i
    type ocs_tmp_cleanup >/dev/null 2>&1 && ocs_tmp_cleanup
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
        umount "${MOUNTS[i]}" 2>/dev/null || umount -l "${MOUNTS[i]}" 2>/dev/null
    done
    for i in "${LOOPS[@]}"; do
        partx -d "$i" >/dev/null 2>&1
        losetup -d "$i" 2>/dev/null
    done
    if [ -n "${KEEP_WORK:-}" ]; then echo "work dir kept: $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

LOG=$WORK/logs
OCS=$WORK/ocsroot               # ocs-sr --ocsroot
DISKS=$WORK/disks               # backing files of the loop disks
TRUTH=$WORK/truth
REC=$WORK/records
mkdir -p "$LOG" "$OCS" "$DISKS" "$TRUTH" "$REC" "$WORK/fs" "$WORK/streams"

say() { printf '== %s\n' "$*" >&2; }
sha() { sha256sum "$1" | cut -d' ' -f1; }

# ---- loop disks ----------------------------------------------------------------
# attach FILE -> $DEV (/dev/loopN), with partition nodes /dev/loopNpM present.
# NOT "losetup -P": this kernel has no msdos partition parser (only EFI/GPT),
# so with partscan on, every BLKRRPART (sfdisk, "blockdev --rereadpt" in
# ocs-sr's inform_kernel_partition_table_changed) drops the partitions of an
# MBR disk again. Without partscan BLKRRPART fails harmlessly and the
# partitions come from partx/partprobe (BLKPG, parsed in user space).
attach() {
    local f=$1 n i p
    DEV=$(losetup -f --show "$f")
    LOOPS+=("$DEV")
    n=$(partx -g -o NR "$f" 2>/dev/null | wc -l || true)
    [ "$n" -gt 0 ] && partx -a "$DEV"
    for i in $(seq 50); do
        [ "$(ls "$DEV"p* 2>/dev/null | wc -l)" -ge "$n" ] && break
        sleep 0.2
    done
    # no devtmpfs node yet: make the nodes from sysfs
    for p in /sys/block/"${DEV#/dev/}"/"${DEV#/dev/}"p*; do
        [ -e "$p/dev" ] || continue
        [ -b "/dev/$(basename "$p")" ] ||
            mknod "/dev/$(basename "$p")" b "$(cut -d: -f1 "$p/dev")" "$(cut -d: -f2 "$p/dev")"
    done
}
detach() {
    local d=$1 i
    partx -d "$d" >/dev/null 2>&1 || true
    losetup -d "$d"
    for i in "${!LOOPS[@]}"; do [ "${LOOPS[i]}" = "$d" ] && unset 'LOOPS[i]'; done
    LOOPS=("${LOOPS[@]}")
}

# ocs-sr leaves temp files in /tmp (mktemp with fixed /tmp paths, so TMPDIR
# does not help; e.g. parttable-ocs.XXXXXX, and multipath_info.XXXXXX when it
# fails): remove the ones that appeared during our run and have ocs-sr's names.
OCS_TMP_RX='^(parttable-ocs|multipath_info|ocs_|ocs\.|img_out_err|hd_img|dd_info|dd_retcode|efi_info|new_sf|part_rec_f|vol_size_tmp|dsk_chk_tmp|root_reinst|ntfs_info|grub-efi|lshw-disk-info|menu|split_error|.*-tmp-cnvted$)'
TMP_BEFORE=
ocs_tmp_cleanup() {
    [ -n "$TMP_BEFORE" ] || return 0
    local f
    comm -13 <(echo "$TMP_BEFORE") <(ls -A /tmp | sort) | grep -E "$OCS_TMP_RX" |
        while IFS= read -r f; do rm -rf "/tmp/$f"; done || true
    TMP_BEFORE=
}
run_ocs() {     # run_ocs LOGNAME ocs-sr-args...
    local logname=$1; shift
    TMP_BEFORE=$(ls -A /tmp | sort)
    say "ocs-sr $*"
    if ! ocs-sr "$@" </dev/null >"$LOG/$logname.out" 2>&1; then
        tail -40 "$LOG/$logname.out" >&2
        echo "ocs-sr failed: $*" >&2
        exit 1
    fi
    cp /var/log/clonezilla.log "$LOG/$logname.clonezilla.log" 2>/dev/null || true
    ocs_tmp_cleanup
}

# ---- python helpers ----------------------------------------------------------
cat > "$WORK/czlib.py" <<'PYEOF'
"""Helpers for make-clonezilla.sh: boot-code patterns, truth disks, expected.json."""
import glob, hashlib, json, os, re, struct, subprocess, sys

S = 512


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_range(path, start, length):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        left = length
        while left:
            b = f.read(min(left, 1 << 20))
            if not b:
                raise SystemExit("short read in %s" % path)
            h.update(b)
            left -= len(b)
    return h.hexdigest()


def pattern(text, n):
    t = text.encode("ascii")
    return (t * (n // len(t) + 1))[:n]


def pwrite(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


# ---- markers written onto the source disks ----------------------------------
def cmd_bootcode(path, text):
    """440 bytes of boot-code-like bytes at LBA 0 (a jmp, then ASCII)."""
    pwrite(path, 0, (b"\xeb\x63\x90" + pattern(text, 437)))


def cmd_hidden(path):
    """Recognizable sectors in the gap between the MBR and the first partition:
    LBA 1-62 (where a grub core.img would be), LBA 1024 and LBA 2047."""
    for lba in list(range(1, 63)) + [1024, 2047]:
        pwrite(path, lba * S, pattern("VIMAGE HIDDEN DATA AFTER MBR, LBA %04d. " % lba, S))


def cmd_ebrcode(path, lba):
    """Boot-code-like bytes in the first 440 bytes of the first EBR."""
    pwrite(path, int(lba) * S, pattern("VIMAGE EBR BOOT CODE. ", 440))


# ---- image directory parsing -------------------------------------------------
KV = re.compile(r'\s*([A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,]*)\s*(?:,|$)')


def parse_ptsf(path):
    head, parts = {}, []
    with open(path) as f:
        text = f.read()
    for line in text.splitlines():
        if not line.strip():
            continue
        if " : " in line:
            dev, rest = line.split(" : ", 1)
            p = {"dev": dev.strip(), "bootable": False}
            for item in rest.split(","):
                item = item.strip()
                if item == "bootable":
                    p["bootable"] = True
            for m in KV.finditer(rest):
                k, v = m.group(1), m.group(2).strip()
                if v.startswith('"'):
                    v = v[1:-1]
                p[k] = v
            p["start"] = int(p["start"])
            p["size"] = int(p["size"])
            p["number"] = int(re.search(r"(\d+)$", p["dev"]).group(1))
            p["name_dev"] = p["dev"][len("/dev/"):].replace("/", "-") \
                if p["dev"].startswith("/dev/") else p["dev"]
            parts.append(p)
        elif ":" in line:
            k, v = line.split(":", 1)
            head[k.strip()] = v.strip()
    return head, parts, text


def parse_parted(path):
    with open(path) as f:
        t = f.read()
    n = int(re.search(r"^Disk /dev/\S+: (\d+)s$", t, re.M).group(1))
    m = re.search(r"^Sector size \(logical/physical\): (\d+)B/(\d+)B", t, re.M)
    return n, int(m.group(1)), int(m.group(2))


def is_extended(label, ptype):
    return label == "dos" and ptype.lower() in ("5", "f", "85")


COMP = {"gz": ("gzip", ["pigz", "-dc"]), "zst": ("zstd", ["zstd", "-dc"]),
        "xz": ("xz", ["xz", "-dc"]), "bz2": ("bzip2", ["bzip2", "-dc"]),
        "lz4": ("lz4", ["lz4", "-dc"]), "lzo": ("lzop", ["lzop", "-dc"]),
        "lzip": ("lzip", ["lzip", "-dc"]), "uncomp": ("none", ["cat"])}


def find_image(imgdir, dev):
    rx = re.compile(r"^%s\.([a-z0-9+]+)-ptcl-img\.([a-z0-9]+)(\.[a-z]{2,3})?$" % re.escape(dev))
    hits = []
    for n in sorted(os.listdir(imgdir)):
        m = rx.match(n)
        if m:
            hits.append((n, m.group(1), m.group(2)))
    if not hits:
        return None
    fs, comp = hits[0][1], hits[0][2]
    return {"files": [h[0] for h in hits], "filesystem": fs, "suffix": comp,
            "compression": COMP[comp][0]}


def decompress_stream(imgdir, img, out):
    """cat pieces | decompress > out (the raw partclone stream)."""
    with open(out, "wb") as o:
        cat = subprocess.Popen(["cat"] + [os.path.join(imgdir, n) for n in img["files"]],
                               stdout=subprocess.PIPE)
        dec = subprocess.Popen(COMP[img["suffix"]][1], stdin=cat.stdout, stdout=o)
        cat.stdout.close()
        if dec.wait() != 0 or cat.wait() != 0:
            raise SystemExit("decompression failed: %s" % img["files"])


def partclone_info(stream, work):
    p = subprocess.run(["partclone.info", "-s", stream, "-L", os.path.join(work, "pcinfo.log")],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = p.stdout.decode("utf-8", "replace")
    facts = {}

    def grab(rx, key, conv=str):
        m = re.search(rx, out, re.M)
        if m:
            facts[key] = conv(m.group(1).strip())
    num = lambda s: int(s) if s.isdigit() else None
    grab(r"^File system:\s*(\S+)", "partclone_filesystem")
    grab(r"^Device size:.*=\s*(\d+) Blocks", "total_blocks", int)
    grab(r"^Space in use:.*=\s*(\d+) Blocks", "used_blocks", int)
    grab(r"^Block size:\s*(\d+) Byte", "block_size", int)
    grab(r"^image format:\s*(\S+)", "image_version")
    grab(r"^with partclone:\s*(\S+)", "image_tool_version")
    grab(r"^checksum algo:\s*(\S+)", "checksum", lambda s: s.lower())
    grab(r"^checksum size:\s*(\S+)", "checksum_size", num)
    grab(r"^blocks/checksum:\s*(\S+)", "blocks_per_checksum", num)
    grab(r"^reseed checksum:\s*(\S+)", "reseed", lambda s: {"yes": True, "no": False}.get(s))
    if p.returncode != 0 or "block_size" not in facts:
        raise SystemExit("partclone.info failed on %s:\n%s" % (stream, out))
    with open(stream, "rb") as f:
        h = f.read(110)
    if h[30:34] == b"0002":
        dev_size, = struct.unpack_from("<Q", h, 52)
        ckm, cks, bpc = struct.unpack_from("<HHI", h, 52 + 8 * 4 + 4 + 4 + 2 + 2)
        facts["device_size"] = dev_size
        facts["header_checksum_mode"] = ckm
    return facts


def partclone_chkimg(stream, work):
    p = subprocess.run(["partclone.chkimg", "-s", stream, "-L", os.path.join(work, "chkimg.log")],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = p.stdout.decode("utf-8", "replace")
    if p.returncode != 0 or "Checked successfully" not in out:
        raise SystemExit("partclone.chkimg failed on %s:\n%s" % (stream, out))
    return "Checked successfully"


def partclone_restore(stream, size, out, work):
    with open(out, "wb") as f:
        f.truncate(size)
    p = subprocess.run(["partclone.restore", "-s", stream, "-O", out,
                        "-L", os.path.join(work, "restore.log")],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if p.returncode != 0:
        raise SystemExit("partclone.restore failed on %s:\n%s" % (stream, p.stdout.decode()))
    if os.path.getsize(out) != size:
        raise SystemExit("%s: restored size %d != %d" % (out, os.path.getsize(out), size))


def ebr_chain(disk, ext_start):
    """Walk the EBR chain of an extended partition starting at LBA ext_start."""
    out = []
    cur = ext_start
    with open(disk, "rb") as f:
        for _ in range(128):
            f.seek(cur * S)
            sec = f.read(S)
            if sec[510:512] != b"\x55\xaa":
                raise SystemExit("no 55AA in EBR at LBA %d of %s" % (cur, disk))
            e1 = struct.unpack_from("<B3sB3sII", sec, 446)
            e2 = struct.unpack_from("<B3sB3sII", sec, 462)
            ent = {"ebr_lba": cur}
            if e1[2]:
                ent["logical_start"] = cur + e1[4]
                ent["logical_size"] = e1[5]
                ent["logical_type"] = "%x" % e1[2]
            out.append(ent)
            if e2[2] in (0x05, 0x0F, 0x85) and e2[4]:
                cur = ext_start + e2[4]
            else:
                break
    return out


def swap_info(imgdir, dev):
    path = os.path.join(imgdir, "swappt-%s.info" % dev)
    if not os.path.exists(path):
        return None
    d = {"file": os.path.basename(path)}
    with open(path) as f:
        for line in f:
            m = re.match(r'^(UUID|LABEL)="(.*)"\s*$', line)
            if m:
                d[m.group(1).lower()] = m.group(2)
    return d


def diff_ranges(a, a_off, b, b_off, length, limit=12):
    """Compare two byte ranges sector by sector; return (differing bytes, ranges)."""
    nbytes, ranges = 0, []
    with open(a, "rb") as fa, open(b, "rb") as fb:
        fa.seek(a_off)
        fb.seek(b_off)
        pos = 0
        while pos < length:
            n = min(1 << 20, length - pos)
            x, y = fa.read(n), fb.read(n)
            if x != y:
                for s in range(0, n, S):
                    xs, ys = x[s:s + S], y[s:s + S]
                    if xs != ys:
                        nbytes += sum(1 for i in range(len(xs)) if xs[i] != ys[i])
                        o = pos + s
                        if ranges and ranges[-1][1] == o:
                            ranges[-1][1] = o + S
                        else:
                            ranges.append([o, o + S])
            pos += n
    out = [{"offset": r[0], "length": r[1] - r[0]} for r in ranges[:limit]]
    return nbytes, out, len(ranges)


def regions_of(label, n, parts, ebrs):
    """Cover LBA 0..n-1 with named regions (LBA units)."""
    regs = []
    data = sorted((p["start"], p["start"] + p["size"], p["name_dev"]) for p in parts
                  if not is_extended(label, p["type"]))
    first = min(p["start"] for p in parts)
    regs.append((0, first, "table-head (LBA 0 .. first partition - 1)"))
    for a, b, name in data:
        regs.append((a, b, "partition " + name))
    for e in ebrs:
        regs.append((e["ebr_lba"], e["ebr_lba"] + 1, "EBR at LBA %d" % e["ebr_lba"]))
    if label == "gpt":
        regs.append((n - 33, n, "GPT backup (LBA N-33 .. N-1)"))
    regs.sort()
    full, cur = [], 0
    for a, b, name in regs:
        if a > cur:
            full.append((cur, a, "unpartitioned LBA %d..%d" % (cur, a - 1)))
        full.append((a, b, name))
        cur = max(cur, b)
    if cur < n:
        full.append((cur, n, "unpartitioned LBA %d..%d" % (cur, n - 1)))
    return full


def compare_disks(a, b, label, n, parts, ebrs):
    res = []
    for lo, hi, name in regions_of(label, n, parts, ebrs):
        nb, rngs, nr = diff_ranges(a, lo * S, b, lo * S, (hi - lo) * S)
        if nb:
            res.append({"region": name, "start_lba": lo, "sectors": hi - lo,
                        "differing_bytes": nb, "differing_sector_ranges": nr,
                        "ranges_relative_to_region": rngs})
    return res


def checksum_files(imgdir):
    out = {}
    for name, tool in (("MD5SUMS", "md5sum"), ("SHA1SUMS", "sha1sum"),
                       ("B2SUMS", "b2sum"), ("B3SUMS", "b3sum")):
        if os.path.exists(os.path.join(imgdir, name)):
            p = subprocess.run([tool, "-c", name], cwd=imgdir,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            with open(os.path.join(imgdir, name)) as f:
                listed = sorted(l.split("  ", 1)[1].strip() for l in f if "  " in l)
            out[name] = {"verified": p.returncode == 0, "files_listed": len(listed)}
            if p.returncode != 0:
                raise SystemExit("%s -c %s failed in %s:\n%s" % (tool, name, imgdir, p.stdout.decode()))
    return out


def read_first_line(path):
    with open(path) as f:
        return f.readline().rstrip("\n")


def dir_facts(imgdir):
    rec = {}
    pk = os.path.join(imgdir, "Info-packages.txt")
    with open(pk) as f:
        lines = [l.strip() for l in f if l.strip()]
    pkgs = lines[1].split() if len(lines) > 1 else []
    rec["packages"] = pkgs
    rec["saved_by"] = next((p for p in pkgs if p.startswith("clonezilla-")), None)
    rec["command"] = read_first_line(os.path.join(imgdir, "Info-saved-by-cmd.txt"))
    rec["parts_file"] = read_first_line(os.path.join(imgdir, "parts")).split()
    diskf = os.path.join(imgdir, "disk")
    rec["disk_file"] = read_first_line(diskf).split() if os.path.exists(diskf) else None
    rec["checksum_files"] = checksum_files(imgdir)
    rec["files"] = {n: os.path.getsize(os.path.join(imgdir, n)) for n in sorted(os.listdir(imgdir))}
    return rec


def describe_partitions(imgdir, label, parts, work, tag, source_parts):
    """Decompress/check/restore every image; returns (partition records, restored files)."""
    recs, restored = [], {}
    for p in parts:
        dev = p["name_dev"]
        r = {"name": dev, "number": p["number"], "start": p["start"] * S, "size": p["size"] * S,
             "type": p["type"]}
        for k in ("uuid", "name", "attrs"):
            if k in p:
                r["gpt_" + k if k != "uuid" else "partuuid"] = p[k]
        if label == "dos":
            r["bootable"] = p["bootable"]
        img = find_image(imgdir, dev)
        sw = swap_info(imgdir, dev)
        if is_extended(label, p["type"]):
            r.update(filesystem=None, image=None, sha256=None,
                     reason="extended partition: never imaged; only its first EBR is saved (%s-ebr)" % dev
                     if os.path.exists(os.path.join(imgdir, dev + "-ebr")) else
                     "extended partition: never imaged")
        elif sw is not None:
            r.update(filesystem="swap", image=None,
                     reason="swap is never imaged; %s holds UUID/LABEL and the restore runs mkswap" % sw["file"],
                     swap_uuid=sw.get("uuid"), swap_label=sw.get("label"))
        elif img is None:
            r.update(filesystem=None, image=None, sha256=None,
                     reason="not saved in this image (not selected)")
        else:
            stream = os.path.join(work, "streams", "%s-%s.ptcl" % (tag, dev))
            decompress_stream(imgdir, img, stream)
            info = partclone_info(stream, work)
            chk = partclone_chkimg(stream, work)
            out = os.path.join(work, "truth", "%s-%s.raw" % (tag, dev))
            partclone_restore(stream, p["size"] * S, out, work)
            restored[dev] = out
            sha = sha256_file(out)
            r.update(filesystem=img["filesystem"], image=img["files"],
                     image_bytes=[os.path.getsize(os.path.join(imgdir, n)) for n in img["files"]],
                     compression=img["compression"], pieces=len(img["files"]),
                     checksum=info.get("checksum"), checksum_size=info.get("checksum_size"),
                     blocks_per_checksum=info.get("blocks_per_checksum"), reseed=info.get("reseed"),
                     partclone_filesystem=info.get("partclone_filesystem"),
                     block_size=info.get("block_size"), used_blocks=info.get("used_blocks"),
                     total_blocks=info.get("total_blocks"), device_size=info.get("device_size"),
                     image_version=info.get("image_version"),
                     image_tool_version=info.get("image_tool_version"),
                     stream_bytes=os.path.getsize(stream), stream_sha256=sha256_file(stream),
                     chkimg=chk, sha256=sha)
            src = source_parts.get(p["number"])
            if src:
                r["source_fs"] = os.path.basename(src["file"])
                r["source_tree"] = TREES[src["tree"]]
                r["equals_source"] = (sha256_file(src["file"]) == sha)
                r["restored_tree_ok"] = tree_ok(out, img["filesystem"], src["tree"], work,
                                                "%s-%s" % (tag, dev))
            if img["filesystem"] == "fat12":
                r["note"] = ("partclone 0.3.23 reads FAT12 tables as 16-bit entries (upstream "
                             "Thomas-Tsai/partclone#268), so its used-block bitmap is wrong and "
                             "about 200 KB of file data are not in the image: the restore (this "
                             "sha256, what Clonezilla writes) has damaged files. The image itself "
                             "is consistent (chkimg passes).")
        recs.append(r)
    return recs, restored


TREES = {"tree": "mktree.py output",
         "big": "mktree.py output + extra/random-1200000.bin (random.Random(20240103))"}


def tree_ok(raw, fs, tree, work, tag):
    """Extract the restored file system without mounting and diff it with the source tree."""
    src = os.path.join(os.environ["SRC"], tree)
    dst = os.path.join(work, "trees", tag)
    subprocess.run(["rm", "-rf", dst], check=True)
    os.makedirs(dst)
    if fs.startswith("ext"):
        cmd = ["debugfs", "-R", "rdump / %s" % dst, raw]
    elif fs in ("vfat", "fat12", "fat16", "fat32"):
        cmd = ["mcopy", "-s", "-n", "-m", "-i", raw, "::/*", dst + "/"]
    else:
        return None
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    p = subprocess.run(["diff", "-r", "-q", "-x", "lost+found", src, dst],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ok = p.returncode == 0
    subprocess.run(["rm", "-rf", dst], check=True)
    return ok


def parse_sources(args):
    """N=FILE:TREE ..."""
    out = {}
    for a in args:
        n, rest = a.split("=", 1)
        f, tree = rest.rsplit(":", 1)
        out[int(n)] = {"file": f, "tree": tree}
    return out


def cmd_savedisk(imgdir, tag, restored_disk, source_disk, truth_path, record, restore_cmd, *srcs):
    work = os.environ["WORK"]
    facts = dir_facts(imgdir)
    disks = facts["disk_file"]
    assert disks and len(disks) == 1, disks
    disk = disks[0]
    head, parts, sftext = parse_ptsf(os.path.join(imgdir, disk + "-pt.sf"))
    n, ss, pss = parse_parted(os.path.join(imgdir, disk + "-pt.parted"))
    assert ss == S, ss
    label = head["label"]
    assert os.path.getsize(restored_disk) == n * S, (os.path.getsize(restored_disk), n * S)
    recs, restored = describe_partitions(imgdir, label, parts, work, tag, parse_sources(srcs))
    # EBR chain on the restored disk
    ebrs = []
    for p in parts:
        if is_extended(label, p["type"]):
            ebrs += ebr_chain(restored_disk, p["start"])
    src_ebrs = []
    for p in parts:
        if is_extended(label, p["type"]):
            src_ebrs += ebr_chain(source_disk, p["start"])
    # ---- build the truth
    first = min(p["start"] for p in parts)
    with open(truth_path, "wb") as t, open(restored_disk, "rb") as r:
        t.truncate(n * S)

        def copy(lba, count):
            r.seek(lba * S)
            t.seek(lba * S)
            t.write(r.read(count * S))
        copy(0, first)
        for e in ebrs:
            copy(e["ebr_lba"], 1)
        if label == "gpt":
            copy(n - 33, 33)
        for p in parts:
            dev = p["name_dev"]
            if dev in restored:
                with open(restored[dev], "rb") as pf:
                    t.seek(p["start"] * S)
                    for chunk in iter(lambda: pf.read(1 << 20), b""):
                        t.write(chunk)
            elif swap_info(imgdir, dev) is not None:
                copy(p["start"], p["size"])
    for r in recs:
        if r.get("filesystem") == "swap":
            r["sha256"] = sha256_range(truth_path, r["start"], r["size"])
            r["swap_source_sha256"] = sha256_range(source_disk, r["start"], r["size"])
            r["equals_source"] = r["sha256"] == r["swap_source_sha256"]
    # ---- facts on the disk
    hd = os.path.join(imgdir, disk + "-hidden-data-after-mbr")
    hidden = None
    if os.path.exists(hd):
        with open(hd, "rb") as f:
            hdata = f.read()
        hidden = {"file": os.path.basename(hd), "bytes": len(hdata),
                  "sha256": hashlib.sha256(hdata).hexdigest(),
                  "nonzero_sectors": sum(1 for i in range(0, len(hdata), S) if hdata[i:i + S].strip(b"\0")),
                  "restored_at_lba_1": sha256_range(restored_disk, S, len(hdata)) == hashlib.sha256(hdata).hexdigest()}
    with open(os.path.join(imgdir, disk + "-mbr"), "rb") as f:
        mbr = f.read()
    with open(truth_path, "rb") as f:
        lba0 = f.read(S)
    drec = {"name": disk, "size": n * S, "sectors": n, "label": label, "sector_size": ss,
            "physical_sector_size": pss, "label_id": head.get("label-id"),
            "first_lba": int(head["first-lba"]) if "first-lba" in head else None,
            "last_lba": int(head["last-lba"]) if "last-lba" in head else None,
            "sha256": sha256_file(truth_path),
            "truth_file": os.path.basename(truth_path) + ".gz",
            "sfdisk_dump": sftext,
            "mbr_file_bytes_0_445_in_truth": mbr[:446] == lba0[:446],
            "mbr_file_equals_truth_lba0": mbr == lba0,
            "hidden_data_after_mbr": hidden,
            "ebrs": ebrs, "ebrs_on_source_disk": src_ebrs,
            "ebr_file_bytes_0_445_on_first_ebr": None}
    for p in parts:
        if is_extended(label, p["type"]):
            ef = os.path.join(imgdir, p["name_dev"] + "-ebr")
            if os.path.exists(ef):
                with open(ef, "rb") as f:
                    eb = f.read()
                with open(truth_path, "rb") as f:
                    f.seek(p["start"] * S)
                    te = f.read(S)
                drec["ebr_file_bytes_0_445_on_first_ebr"] = eb[:446] == te[:446]
                drec["ebr_file_equals_first_ebr"] = eb == te
    if label == "gpt":
        with open(truth_path, "rb") as f:
            g1 = f.read(34 * S)
            f.seek((n - 32) * S)
            g2 = f.read(32 * S)
            f.seek((n - 33) * S)
            bent = f.read(S)
        with open(os.path.join(imgdir, disk + "-gpt-1st"), "rb") as f:
            s1 = f.read()
        with open(os.path.join(imgdir, disk + "-gpt-2nd"), "rb") as f:
            s2 = f.read()
        drec["gpt_1st_equals_truth_lba_0_33_except_boot_code"] = s1[446:] == g1[446:]
        drec["gpt_2nd_equals_truth_lba_N-32_N-1"] = s2 == g2
        drec["truth_lba_N-33_equals_lba_2"] = bent == g1[2 * S:3 * S]
    # ---- comparisons
    cmp_restored = compare_disks(truth_path, restored_disk, label, n, parts, ebrs)
    cmp_source = compare_disks(truth_path, source_disk, label, n, parts, ebrs)
    rec = {"kind": "savedisk", "saved_by": facts["saved_by"], "packages": facts["packages"],
           "command": facts["command"], "restore_command": restore_cmd,
           "disk_file": facts["disk_file"], "parts_file": facts["parts_file"],
           "checksum_files": sorted(facts["checksum_files"]),
           "checksum_files_verified": facts["checksum_files"],
           "files": facts["files"],
           "disks": [drec], "partitions": recs,
           "truth_vs_restoredisk": cmp_restored, "truth_vs_source_disk": cmp_source}
    with open(record, "w") as f:
        json.dump(rec, f, indent=2, sort_keys=True)


def cmd_saveparts(imgdir, tag, target_disk, source_disk, record, restore_cmd, *srcs):
    """saveparts: truth = one partclone.restore per saved partition; compared
    with what ocs-sr restoreparts wrote on target_disk and with the source."""
    work = os.environ["WORK"]
    facts = dir_facts(imgdir)
    disks = sorted(f[:-len("-pt.sf")] for f in os.listdir(imgdir) if f.endswith("-pt.sf"))
    assert len(disks) == 1, disks
    disk = disks[0]
    head, parts, sftext = parse_ptsf(os.path.join(imgdir, disk + "-pt.sf"))
    n, ss, pss = parse_parted(os.path.join(imgdir, disk + "-pt.parted"))
    label = head["label"]
    recs, restored = describe_partitions(imgdir, label, parts, work, tag, parse_sources(srcs))
    cmp = []
    for r in recs:
        if r["name"] in restored:
            nb, rngs, nr = diff_ranges(restored[r["name"]], 0, target_disk, r["start"], r["size"])
            r["equals_restoreparts_output"] = nb == 0
            if nb:
                cmp.append({"region": "partition " + r["name"], "differing_bytes": nb,
                            "differing_sector_ranges": nr, "ranges_relative_to_region": rngs})
            r["truth_file"] = "%s-%s.raw.gz" % (tag, r["name"])
    drec = {"name": disk, "size": n * S, "sectors": n, "label": label, "sector_size": ss,
            "physical_sector_size": pss, "label_id": head.get("label-id"),
            "sha256": None, "sha256_note": "saveparts: no whole-disk truth (only the saved partitions)",
            "sfdisk_dump": sftext}
    conv = os.path.join(imgdir, "device_name_converted.info")
    rec = {"kind": "saveparts", "saved_by": facts["saved_by"], "packages": facts["packages"],
           "command": facts["command"], "restore_command": restore_cmd,
           "disk_file": facts["disk_file"], "parts_file": facts["parts_file"],
           "checksum_files": sorted(facts["checksum_files"]),
           "checksum_files_verified": facts["checksum_files"],
           "files": facts["files"], "device_name_converted": os.path.exists(conv),
           "disks": [drec], "partitions": recs, "truth_vs_restoreparts": cmp}
    with open(record, "w") as f:
        json.dump(rec, f, indent=2, sort_keys=True)


def cmd_finish(out, *records):
    manifest = {}
    for r in records:
        with open(r) as f:
            manifest[os.path.basename(r)[:-len(".json")]] = json.load(f)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    cmd = sys.argv[1].replace("-", "_")
    globals()["cmd_" + cmd](*sys.argv[2:])
PYEOF
export WORK SRC=$WORK/src
cz() { python3 "$WORK/czlib.py" "$@"; }

# ---- source trees (tmpfs: readdir order = creation order) ---------------------
SRC=$WORK/src
mkdir -p "$SRC"
mount -t tmpfs -o size=32m,mode=0755 vimage-cz-src "$SRC"
MOUNTS+=("$SRC")
mkdir "$SRC/tree" "$SRC/big"
python3 "$HERE/mktree.py" "$SRC/tree"
# "big": the same tree plus one 1.2 MB incompressible file, so that one image
# of the -i 1 directory is larger than 1 MB after zstd and splits into pieces.
python3 "$HERE/mktree.py" "$SRC/big"
python3 - "$SRC/big" <<'PYEOF'
import os, random, sys
rng = random.Random(20240103)
n = 1200000
os.makedirs(os.path.join(sys.argv[1], "extra"))
with open(os.path.join(sys.argv[1], "extra", "random-1200000.bin"), "wb") as f:
    f.write(rng.getrandbits(n * 8).to_bytes(n, "little"))
PYEOF
find "$SRC/tree" "$SRC/big" -exec touch -h -d "$FIXED_DATE" {} +

# ---- file systems (as files; copied into the disks afterwards) ----------------
FS=$WORK/fs
fix_ext_times() {   # fix_ext_times IMAGE TREE
    local cmds=$WORK/debugfs.cmds p
    {
        echo "sif / ctime @$EPOCH"
        echo "sif / atime @$EPOCH"
        (cd "$2" && find . -mindepth 1 | LC_ALL=C sort) | sed 's#^\.##' |
        while IFS= read -r p; do
            printf 'sif "%s" ctime @%s\nsif "%s" atime @%s\n' "$p" "$EPOCH" "$p" "$EPOCH"
        done
    } > "$cmds"
    debugfs -w -f "$cmds" "$1" >"$LOG/debugfs.out" 2>&1
    if grep -v '^debugfs[ :]' "$LOG/debugfs.out" | grep -q .; then
        cat "$LOG/debugfs.out" >&2; exit 1
    fi
}
# mkext IMAGE SECTORS MKFS UUID LABEL TREE [mkfs args]
mkext() {
    local img=$1 sectors=$2 mkfs=$3 uuid=$4 label=$5 tree=$6
    shift 6
    rm -f "$img"; truncate -s $((sectors * 512)) "$img"
    "$mkfs" -q -F -L "$label" -U "$uuid" -E hash_seed=0b7f6a52-3c1e-4d8a-a5b6-9e0f1d2c3b4a "$@" -d "$tree" "$img"
    fix_ext_times "$img" "$tree"
    e2fsck -fn "$img" >"$LOG/e2fsck.out" 2>&1 || { cat "$LOG/e2fsck.out" >&2; exit 1; }
}
# mkfat IMAGE SECTORS BITS SECTORS_PER_CLUSTER VOLUME_ID LABEL HIDDEN_SECTORS TREE
mkfat() {
    local img=$1 sectors=$2 bits=$3 spc=$4 id=$5 label=$6 hidden=$7 tree=$8
    rm -f "$img"; truncate -s $((sectors * 512)) "$img"
    mkfs.vfat -F "$bits" -s "$spc" -h "$hidden" --invariant -i "$id" -n "$label" "$img" >"$LOG/mkfs.vfat.out"
    (cd "$tree" && find . -mindepth 1 -type d | LC_ALL=C sort) | sed 's#^\./##' |
        while IFS= read -r d; do mmd -i "$img" "::/$d"; done
    (cd "$tree" && find . -type f | LC_ALL=C sort) | sed 's#^\./##' |
        while IFS= read -r f; do mcopy -m -i "$img" "$tree/$f" "::/$f"; done
    fsck.vfat -n "$img" >"$LOG/fsck.vfat.out" 2>&1 || { cat "$LOG/fsck.vfat.out" >&2; exit 1; }
}
# place FS_FILE DISK START_LBA
place() { dd if="$1" of="$2" bs=512 seek="$3" conv=notrunc,sparse status=none; }

# ---- disk layouts --------------------------------------------------------------
# GPT disk: 40 MiB = 81920 sectors
GPT_SECTORS=81920
GPT_P1=2048;  GPT_P1_SIZE=24576     # 12 MiB ext4 (1 KiB blocks, journal)
GPT_P2=26624; GPT_P2_SIZE=20480     # 10 MiB FAT16, type EFI System
GPT_P3=49152; GPT_P3_SIZE=16384     # 8 MiB ext2 (after a 1 MiB unpartitioned gap)
# MBR disk: 48 MiB = 98304 sectors
MBR_SECTORS=98304
MBR_P1=2048;  MBR_P1_SIZE=32768     # 16 MiB ext4, bootable, tree + 1.2 MB random file
MBR_P2=34816; MBR_P2_SIZE=63488     # extended up to the end of the disk
MBR_P5=36864; MBR_P5_SIZE=20480     # 10 MiB ext4 (EBR at 34816)
MBR_P6=59392; MBR_P6_SIZE=8192      # 4 MiB swap (EBR at 57344)
MBR_P7=69632; MBR_P7_SIZE=16384     # 8 MiB FAT16, type e (EBR at 67584)
MBR_P8=88064; MBR_P8_SIZE=8192      # 4 MiB FAT12, type 1 (EBR at 86016); 2048 free sectors after it
SWAP_UUID=5eed5a9e-0000-4000-8000-000000000006
SWAP_LABEL=VIMAGESWAP

say "building file systems"
mkext "$FS/gpt-p1-ext4.raw" $GPT_P1_SIZE mkfs.ext4 5eed0001-0000-4000-8000-0000000000a1 vimage-gpt-root "$SRC/tree"
mkfat "$FS/gpt-p2-fat16.raw" $GPT_P2_SIZE 16 2 5EEDA002 VIMAGE-EFI $GPT_P2 "$SRC/tree"
mkext "$FS/gpt-p3-ext2.raw" $GPT_P3_SIZE mkfs.ext2 5eed0003-0000-4000-8000-0000000000a3 vimage-gpt-data "$SRC/tree"
mkext "$FS/mbr-p1-ext4.raw" $MBR_P1_SIZE mkfs.ext4 5eed0001-0000-4000-8000-0000000000b1 vimage-mbr-root "$SRC/big"
mkext "$FS/mbr-p5-ext4.raw" $MBR_P5_SIZE mkfs.ext4 5eed0005-0000-4000-8000-0000000000b5 vimage-mbr-home "$SRC/tree"
mkfat "$FS/mbr-p7-fat16.raw" $MBR_P7_SIZE 16 2 5EEDB007 VIMAGEFAT16 $MBR_P7 "$SRC/tree"
mkfat "$FS/mbr-p8-fat12.raw" $MBR_P8_SIZE 12 4 5EEDB008 VIMAGEFAT12 $MBR_P8 "$SRC/tree"
rm -f "$FS/mbr-p6-swap.raw"; truncate -s $((MBR_P6_SIZE * 512)) "$FS/mbr-p6-swap.raw"
chmod 600 "$FS/mbr-p6-swap.raw"
mkswap -U "$SWAP_UUID" -L "$SWAP_LABEL" "$FS/mbr-p6-swap.raw" >"$LOG/mkswap.out" 2>&1

say "assembling the source disks"
GPT_DISK=$DISKS/gpt-source.img
rm -f "$GPT_DISK"; truncate -s $((GPT_SECTORS * 512)) "$GPT_DISK"
sfdisk -q "$GPT_DISK" >"$LOG/sfdisk-gpt.out" 2>&1 <<EOF
label: gpt
label-id: 5EED6A70-0000-4000-8000-000000000000

start=$GPT_P1, size=$GPT_P1_SIZE, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, uuid=5EED6A70-0000-4000-8000-000000000001, name="vimage root", attrs="LegacyBIOSBootable"
start=$GPT_P2, size=$GPT_P2_SIZE, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, uuid=5EED6A70-0000-4000-8000-000000000002, name="EFI System"
start=$GPT_P3, size=$GPT_P3_SIZE, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, uuid=5EED6A70-0000-4000-8000-000000000003, name="vimage-data"
EOF
place "$FS/gpt-p1-ext4.raw" "$GPT_DISK" $GPT_P1
place "$FS/gpt-p2-fat16.raw" "$GPT_DISK" $GPT_P2
place "$FS/gpt-p3-ext2.raw" "$GPT_DISK" $GPT_P3
cz bootcode "$GPT_DISK" "VIMAGE GPT PMBR BOOT CODE. "

MBR_DISK=$DISKS/mbr-source.img
rm -f "$MBR_DISK"; truncate -s $((MBR_SECTORS * 512)) "$MBR_DISK"
sfdisk -q "$MBR_DISK" >"$LOG/sfdisk-mbr.out" 2>&1 <<EOF
label: dos
label-id: 0x5eedb002

start=$MBR_P1, size=$MBR_P1_SIZE, type=83, bootable
start=$MBR_P2, size=$MBR_P2_SIZE, type=5
start=$MBR_P5, size=$MBR_P5_SIZE, type=83
start=$MBR_P6, size=$MBR_P6_SIZE, type=82
start=$MBR_P7, size=$MBR_P7_SIZE, type=e
start=$MBR_P8, size=$MBR_P8_SIZE, type=1
EOF
place "$FS/mbr-p1-ext4.raw" "$MBR_DISK" $MBR_P1
place "$FS/mbr-p5-ext4.raw" "$MBR_DISK" $MBR_P5
place "$FS/mbr-p6-swap.raw" "$MBR_DISK" $MBR_P6
place "$FS/mbr-p7-fat16.raw" "$MBR_DISK" $MBR_P7
place "$FS/mbr-p8-fat12.raw" "$MBR_DISK" $MBR_P8
cz bootcode "$MBR_DISK" "VIMAGE MBR BOOT CODE. "
cz hidden "$MBR_DISK"
cz ebrcode "$MBR_DISK" $MBR_P2
sfdisk -d "$GPT_DISK" > "$LOG/gpt-source.sf"
sfdisk -d "$MBR_DISK" > "$LOG/mbr-source.sf"

# ---- save ---------------------------------------------------------------------
GPT_SRC_SHA=$(sha "$GPT_DISK")
MBR_SRC_SHA=$(sha "$MBR_DISK")

say "savedisk gpt-pigz"
attach "$GPT_DISK"; D=${DEV#/dev/}
run_ocs save-gpt --ocsroot "$OCS" -q2 -b -j2 -z1p -i 0 -gb -sfsck -scs -senc -p true savedisk gpt-pigz "$D"
detach "$DEV"

say "savedisk mbr-zstd-split + saveparts"
attach "$MBR_DISK"; D=${DEV#/dev/}
run_ocs save-mbr --ocsroot "$OCS" -q2 -b -j2 -z9p -i 1 -gm -gs -sfsck -scs -senc -p true savedisk mbr-zstd-split "$D"
run_ocs save-parts --ocsroot "$OCS" -q2 -b -z5p -i 0 -sfsck -scs -senc -p true saveparts saveparts "${D}p5 ${D}p7"
detach "$DEV"
[ "$(sha "$GPT_DISK")" = "$GPT_SRC_SHA" ] || say "NOTE: the GPT source disk changed during the save"
[ "$(sha "$MBR_DISK")" = "$MBR_SRC_SHA" ] || say "NOTE: the MBR source disk changed during the save"

# saveparts: rename the loop device names to sda (sda5, sda7, sda-pt.sf, ...).
# Not done for the savedisk directories: cnvt-ocs-dev does not update the
# *SUMS files, so MD5SUMS/SHA1SUMS/B2SUMS would no longer verify.
SP_SRC_DISK=$(cat "$OCS/saveparts/parts" | awk '{print $1}' | sed -E 's/p?[0-9]+$//')
say "cnvt-ocs-dev saveparts $SP_SRC_DISK -> sda"
cnvt-ocs-dev -b -d "$OCS" saveparts "$SP_SRC_DISK" sda </dev/null >"$LOG/cnvt.out" 2>&1 ||
    { cat "$LOG/cnvt.out" >&2; exit 1; }

# ---- restore + truth ------------------------------------------------------------
# restore_disk NAME SECTORS SOURCE_DISK SOURCE_PARTS...
restore_disk() {
    local name=$1 sectors=$2 src=$3; shift 3
    local tgt=$DISKS/$name-restored.img
    rm -f "$tgt"; truncate -s $((sectors * 512)) "$tgt"
    attach "$tgt"
    local d=${DEV#/dev/}
    run_ocs "restore-$name" --ocsroot "$OCS" -q2 -b -j2 -k0 -scr -icds -p true restoredisk "$name" "$d"
    detach "$DEV"
    say "truth for $name"
    cz savedisk "$OCS/$name" "$name" "$tgt" "$src" "$TRUTH/$name.img" "$REC/$name.json" \
        "ocs-sr --ocsroot OCSROOT -q2 -b -j2 -k0 -scr -icds -p true restoredisk $name $d (onto a zeroed $((sectors * 512))-byte loop disk)" \
        "$@"
}
restore_disk gpt-pigz $GPT_SECTORS "$GPT_DISK" \
    "1=$FS/gpt-p1-ext4.raw:tree" "2=$FS/gpt-p2-fat16.raw:tree" "3=$FS/gpt-p3-ext2.raw:tree"
restore_disk mbr-zstd-split $MBR_SECTORS "$MBR_DISK" \
    "1=$FS/mbr-p1-ext4.raw:big" "5=$FS/mbr-p5-ext4.raw:tree" \
    "7=$FS/mbr-p7-fat16.raw:tree" "8=$FS/mbr-p8-fat12.raw:tree"

say "restoreparts saveparts"
SP_TGT=$DISKS/saveparts-restored.img
rm -f "$SP_TGT"; truncate -s $((MBR_SECTORS * 512)) "$SP_TGT"
# the target needs the partitions: write the saved table (device names stripped)
sed -E -e '/^device:/d' -e 's#^/dev/[^ ]+ : ##' "$OCS/saveparts/sda-pt.sf" |
    sfdisk -q "$SP_TGT" >"$LOG/sfdisk-sp.out" 2>&1
attach "$SP_TGT"; D=${DEV#/dev/}
run_ocs restore-parts --ocsroot "$OCS" -q2 -b -scr -p true restoreparts saveparts "${D}p5 ${D}p7"
detach "$DEV"
cz saveparts "$OCS/saveparts" saveparts "$SP_TGT" "$MBR_DISK" "$REC/saveparts.json" \
    "ocs-sr --ocsroot OCSROOT -q2 -b -scr -p true restoreparts saveparts \"${D}p5 ${D}p7\" (onto a zeroed loop disk partitioned from sda-pt.sf)" \
    "5=$FS/mbr-p5-ext4.raw:tree" "7=$FS/mbr-p7-fat16.raw:tree"

# ---- outputs --------------------------------------------------------------------
say "writing $OUT"
mkdir -p "$OUT"
rm -rf "$OUT/gpt-pigz" "$OUT/mbr-zstd-split" "$OUT/saveparts" "$OUT/expected.json"
for d in gpt-pigz mbr-zstd-split saveparts; do
    cp -a "$OCS/$d" "$OUT/$d"
    chmod 0755 "$OUT/$d"
    chmod 0644 "$OUT/$d"/*     # ocs-sr writes the image files with mode 0600
done
cz finish "$OUT/expected.json" "$REC/gpt-pigz.json" "$REC/mbr-zstd-split.json" "$REC/saveparts.json"

say "writing gzip'ed truths to $TRUTH_OUT"
mkdir -p "$TRUTH_OUT"
rm -f "$TRUTH_OUT"/*.img.gz "$TRUTH_OUT"/*.raw.gz
gzip -n -c "$TRUTH/gpt-pigz.img" > "$TRUTH_OUT/gpt-pigz.img.gz"
gzip -n -c "$TRUTH/mbr-zstd-split.img" > "$TRUTH_OUT/mbr-zstd-split.img.gz"
for f in "$TRUTH"/saveparts-*.raw; do gzip -n -c "$f" > "$TRUTH_OUT/$(basename "$f").gz"; done
(cd "$TRUTH_OUT" && sha256sum -- *.gz > SHA256SUMS.gz-files)

say "done in $(( $(date +%s) - T0 )) s; $(du -sh "$OUT" | cut -f1) in $OUT"
