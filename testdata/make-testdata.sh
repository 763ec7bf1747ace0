#!/bin/bash
# make-testdata.sh - regenerate vimage's test images with the REAL tools.
#
#   sudo bash testdata/make-testdata.sh
#
# Builds small filesystems from the tree written by mktree.py, saves them with
# partclone (Debian 12: 0.3.23), ntfsclone (ntfs-3g 2022.10.3) and partimage
# (0.6.9), restores every image again with the same tool and writes
# testdata/expected.json (sha256/size of each restored partition + header facts).
# Also copies the partclone-modern images from $SHARED (made elsewhere with
# partclone 0.3.47 / 0.2.89, which Debian 12 cannot produce).
#
# Needs root (loop devices, mounts). Debian 12 packages: partclone partimage
# ntfs-3g dosfstools mtools e2fsprogs btrfs-progs gzip gcc (gcc is optional:
# it builds a tiny LD_PRELOAD clock shim that makes the ntfs-3g writes
# reproducible).
#
# Determinism: the ext*, vfat, ntfs filesystems and the partclone/ntfsclone
# images are byte-for-byte reproducible on the same kernel/tool versions.
# partimage images are NOT (they store the creation date, a random
# identificator, the host name and the device path); btrfs is not either
# (mkfs.btrfs makes random device/chunk-tree UUIDs). Their restored results are
# still reproducible except btrfs.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=$HERE
SHARED=${VIMAGE_SHARED_PARTCLONE_MODERN:-/work/shared/testdata/partclone-modern}

export LC_ALL=C.UTF-8 TZ=UTC
EPOCH=1704164645                      # 2024-01-02 03:04:05 UTC
FIXED_DATE='2024-01-02 03:04:05 UTC'
export E2FSPROGS_FAKE_TIME=$EPOCH     # mke2fs, debugfs
export SOURCE_DATE_EPOCH=$EPOCH       # mtools (mmd/mcopy)
export MTOOLS_SKIP_CHECK=1

if [ "$(id -u)" != 0 ]; then
    echo "make-testdata.sh: must run as root (loop devices, mounts)" >&2
    exit 1
fi
for t in python3 losetup mount umount truncate sha256sum gzip mkfs.ext4 mkfs.ext3 \
         mkfs.ext2 debugfs e2fsck mkfs.vfat mmd mcopy fsck.vfat mkntfs ntfs-3g ntfsclone \
         partclone.ext4 partclone.vfat partclone.ntfs partclone.dd partclone.restore \
         partclone.chkimg partclone.info partimage; do
    command -v "$t" >/dev/null || { echo "missing tool: $t" >&2; exit 1; }
done
HAVE_BTRFS=0
if command -v mkfs.btrfs >/dev/null && command -v partclone.btrfs >/dev/null; then HAVE_BTRFS=1; fi

WORK=$(mktemp -d /tmp/vimage-testdata.XXXXXX)
export TMPDIR=$WORK
LOOPS=()
MOUNTS=()
cleanup() {
    set +e
    local i
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
        umount "${MOUNTS[i]}" 2>/dev/null || umount -l "${MOUNTS[i]}" 2>/dev/null
    done
    for i in "${LOOPS[@]}"; do losetup -d "$i" 2>/dev/null; done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

LOG=$WORK/logs
mkdir -p "$LOG" "$WORK/fs" "$WORK/out" "$WORK/restore" "$WORK/mnt"
RECORDS=$WORK/records.jsonl
: > "$RECORDS"

say() { printf '== %s\n' "$*" >&2; }

# ---- loop devices / mounts (tracked for the trap) ---------------------------
attach() {      # attach FILE  -> sets $DEV
    DEV=$(losetup -f --show "$1")
    LOOPS+=("$DEV")
}
detach() {      # detach DEV
    local d=$1 i
    losetup -d "$d"
    for i in "${!LOOPS[@]}"; do [ "${LOOPS[i]}" = "$d" ] && unset 'LOOPS[i]'; done
    LOOPS=("${LOOPS[@]}")
}
track_mount() { MOUNTS+=("$1"); }
untrack_umount() {
    local m=$1 i
    umount "$m"
    for i in "${!MOUNTS[@]}"; do [ "${MOUNTS[i]}" = "$m" ] && unset 'MOUNTS[i]'; done
    MOUNTS=("${MOUNTS[@]}")
}

sha() { sha256sum "$1" | cut -d' ' -f1; }
bytes() { stat -c %s "$1"; }

# ---- python helper (manifest records) ----------------------------------------
cat > "$WORK/tdlib.py" <<'PYEOF'
import hashlib, json, os, re, struct, subprocess, sys

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
        f.write(json.dumps(rec, sort_keys=True, ensure_ascii=False) + "\n")

def partclone_info(path):
    """Run the real partclone.info and parse what it prints."""
    log = os.path.join(os.environ.get("TMPDIR", "/tmp"), "pcinfo.log")
    p = subprocess.run(["partclone.info", "-s", path, "-L", log],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = p.stdout.decode("utf-8", "replace")
    facts = {}
    def grab(rx, key, conv=str):
        m = re.search(rx, out, re.M)
        if m:
            facts[key] = conv(m.group(1).strip())
    num = lambda s: int(s) if s.isdigit() else None
    grab(r"^File system:\s*(\S+)", "filesystem")
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
        raise SystemExit("partclone.info failed on %s:\n%s" % (path, out))
    return facts

def partclone_header(path):
    with open(path, "rb") as f:
        h = f.read(110)
    if h[30:34] != b"0002":
        return {}
    dev, total, used, used_bm, bs, feat, iver, bits, ckm, cks, bpc, reseed, bmm, crc = \
        struct.unpack_from("<QQQQIIHHHHIBBI", h, 52)
    return {"device_size": dev,
            "header": {"checksum_mode": ckm, "checksum_size": cks, "blocks_per_checksum": bpc,
                       "reseed": reseed, "bitmap_mode": bmm, "cpu_bits": bits}}

def ntfsclone_header(path):
    with open(path, "rb") as f:
        h = f.read(50)
    magic, major, minor, csize, dev_size, nr_clusters, inuse, off = \
        struct.unpack("<16sBBIQqQI", h)
    assert magic == b"\0ntfsclone-image", magic
    return {"image_version": "%d.%d" % (major, minor), "block_size": csize,
            "device_size": dev_size, "total_blocks": nr_clusters,
            "used_blocks": inuse, "offset_to_image_data": off,
            "filesystem": "NTFS", "checksum": "none", "blocks_per_checksum": None}

def cmd_finish(records, outdir):
    manifest = {}
    with open(records) as f:
        for line in f:
            rec = json.loads(line)
            name = rec.pop("name")
            path = os.path.join(outdir, name)
            if rec.get("format") == "partclone" and "origin" not in rec:
                for k, v in partclone_info(path).items():
                    rec.setdefault(k, v)
                rec.update(partclone_header(path))
            elif rec.get("format") == "ntfsclone":
                for k, v in ntfsclone_header(path).items():
                    rec.setdefault(k, v)
            files = rec.get("files") or [name]
            rec["files"] = [{"name": n,
                             "bytes": os.path.getsize(os.path.join(outdir, n)),
                             "sha256": sha256_file(os.path.join(outdir, n))}
                            for n in files]
            for k in ("filesystem", "block_size", "used_blocks", "total_blocks",
                      "checksum", "blocks_per_checksum"):
                rec.setdefault(k, None)
            manifest[name] = rec
    with open(os.path.join(outdir, "expected.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")

if __name__ == "__main__":
    if sys.argv[1] == "rec":
        cmd_rec(sys.argv[2], sys.argv[3], sys.argv[4:])
    elif sys.argv[1] == "finish":
        cmd_finish(sys.argv[2], sys.argv[3])
PYEOF
rec() { python3 "$WORK/tdlib.py" rec "$RECORDS" "$@"; }
jstr() { python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$1"; }

# ---- tool versions -----------------------------------------------------------
# (outputs are captured completely first: "tool | grep -m1" can die of SIGPIPE under pipefail)
first_line() {  # first_line REGEX TEXT
    printf '%s\n' "$2" | grep -a -E "$1" | sed -n '1{s/[[:space:]]*$//;p}'
}
PC_VER=$(first_line 'Partclone :' "$(partclone.ext4 -v 2>&1 || true)")
NC_VER=$(first_line '^ntfsclone' "$(ntfsclone --version 2>&1 || true)")
PI_VER=$(first_line 'Partition Image version' "$(partimage -v 2>&1 || true)")
GZ_VER=$(first_line '^gzip' "$(gzip --version 2>&1 || true)")
say "partclone: $PC_VER / ntfsclone: $NC_VER / partimage: $PI_VER"

# ---- optional clock shim (reproducible ntfs-3g timestamps) ------------------
FAKETIME_SO=
if command -v gcc >/dev/null; then
    cat > "$WORK/faketime.c" <<'CEOF'
#define _GNU_SOURCE
#include <time.h>
#include <sys/time.h>
#include <dlfcn.h>
#include <stdlib.h>
static time_t fixed(void) { const char *s = getenv("VIMAGE_FAKE_TIME"); return s ? (time_t)atoll(s) : 0; }
time_t time(time_t *t) { time_t v = fixed(); if (t) *t = v; return v; }
int gettimeofday(struct timeval *tv, void *tz) { (void)tz; if (tv) { tv->tv_sec = fixed(); tv->tv_usec = 0; } return 0; }
int clock_gettime(clockid_t c, struct timespec *ts) {
    static int (*real)(clockid_t, struct timespec *);
    if (c == CLOCK_REALTIME || c == CLOCK_REALTIME_COARSE) { ts->tv_sec = fixed(); ts->tv_nsec = 0; return 0; }
    if (!real) real = (int (*)(clockid_t, struct timespec *))dlsym(RTLD_NEXT, "clock_gettime");
    return real(c, ts);
}
CEOF
    if gcc -shared -fPIC -O2 -o "$WORK/faketime.so" "$WORK/faketime.c" -ldl 2>"$LOG/gcc.log"; then
        FAKETIME_SO=$WORK/faketime.so
    fi
fi
[ -n "$FAKETIME_SO" ] || say "WARNING: no gcc: the NTFS filesystem will not be reproducible"

# ---- clean old outputs -------------------------------------------------------
say "removing old generated files from $OUT"
( cd "$OUT" && rm -f -- *.ptcl-img *.ptcl-img.* *.ntfsclone-img *.partimg.* *.partimg \
      *.dd-img.gz *.dd-img.gz.* sda1.ext4-ptcl-img.* expected.json )

# ---- source tree (on a tmpfs: readdir order = creation order) ---------------
SRC=$WORK/src
mkdir -p "$SRC"
mount -t tmpfs -o size=32m,mode=0755 vimage-src "$SRC"
track_mount "$SRC"
python3 "$HERE/mktree.py" "$SRC"
settimes() { find "$SRC" -exec touch -h -d "$FIXED_DATE" {} +; }
settimes

# ext*: mke2fs -d copies atime/mtime/ctime of the source files; ctime can not
# be set with touch, so set it (and re-set atime) afterwards with debugfs.
fix_ext_times() {   # fix_ext_times IMAGE
    local cmds=$WORK/debugfs.cmds p
    {
        echo "sif / ctime @$EPOCH"
        echo "sif / atime @$EPOCH"
        (cd "$SRC" && find . -mindepth 1 | LC_ALL=C sort) | sed 's#^\.##' |
        while IFS= read -r p; do
            printf 'sif "%s" ctime @%s\nsif "%s" atime @%s\n' "$p" "$EPOCH" "$p" "$EPOCH"
        done
    } > "$cmds"
    debugfs -w -f "$cmds" "$1" >"$LOG/debugfs.out" 2>&1
    if grep -v '^debugfs[ :]' "$LOG/debugfs.out" | grep -q .; then
        cat "$LOG/debugfs.out" >&2; exit 1
    fi
}

# mkext IMAGE SIZE MKFS UUID LABEL [extra mkfs args]
mkext() {
    local img=$1 size=$2 mkfs=$3 uuid=$4 label=$5
    shift 5
    rm -f "$img"; truncate -s "$size" "$img"
    settimes
    "$mkfs" -q -F -L "$label" -U "$uuid" -E hash_seed=0b7f6a52-3c1e-4d8a-a5b6-9e0f1d2c3b4a "$@" -d "$SRC" "$img"
    fix_ext_times "$img"
    e2fsck -fn "$img" >"$LOG/e2fsck.out" 2>&1 || { cat "$LOG/e2fsck.out" >&2; exit 1; }
}

# verify_tree IMAGE MOUNTCMD...: mount a copy read-only and diff it with $SRC
verify_tree() {
    local img=$1; shift
    local copy=$WORK/verify.raw m=$WORK/mnt/verify
    cp --sparse=always "$img" "$copy"
    mkdir -p "$m"
    attach "$copy"
    "$@" "$DEV" "$m"
    track_mount "$m"
    if ! diff -r -x lost+found "$SRC" "$m" >"$LOG/diff.out" 2>&1; then
        cat "$LOG/diff.out" >&2; echo "tree check failed for $img" >&2; exit 1
    fi
    untrack_umount "$m"
    detach "$DEV"
    rm -f "$copy"
}
# FAT: the kernel may lack vfat (e.g. minimal VM kernels): then extract with mtools
verify_fat_tree() {
    local img=$1
    if grep -qw vfat /proc/filesystems; then
        verify_tree "$img" mount_vfat_ro
        return
    fi
    local x=$WORK/mnt/fat-extract
    rm -rf "$x"; mkdir -p "$x"
    mcopy -s -n -i "$img" '::/*' "$x/"
    if ! diff -r "$SRC" "$x" >"$LOG/diff.out" 2>&1; then
        cat "$LOG/diff.out" >&2; echo "tree check failed for $img" >&2; exit 1
    fi
    rm -rf "$x"
}
mount_ro() { mount -o ro "$1" "$2"; }
mount_ext_ro() { mount -o ro,noload "$1" "$2"; }
mount_vfat_ro() { mount -t vfat -o ro,utf8,shortname=mixed "$1" "$2"; }
mount_ntfs_ro() { ntfs-3g -o ro "$1" "$2"; }

# ---- filesystems -------------------------------------------------------------
FS=$WORK/fs
say "building filesystems"
# ext4, 1 KiB blocks, with journal (has_journal, 64bit, metadata_csum, flex_bg)
mkext "$FS/ext4-1k.raw" 8M mkfs.ext4 11111111-2222-4333-8444-000000000001 vimage-ext4-1k -b 1024
# ext4, 4 KiB blocks, no journal (a 4 KiB-block journal would be >= 4 MiB)
mkext "$FS/ext4-4k.raw" 8M mkfs.ext4 11111111-2222-4333-8444-000000000004 vimage-ext4-4k -b 4096 -O ^has_journal
# ext2 for partimage (partimage 0.6.9 knows ext2/ext3, not ext4 features)
mkext "$FS/ext2.raw" 8M mkfs.ext2 11111111-2222-4333-8444-000000000002 vimage-ext2 -b 1024

# FAT16, 8 MiB, 2 sectors per cluster; populated in sorted order with mtools
FAT=$FS/fat16.raw
rm -f "$FAT"; truncate -s 8M "$FAT"
mkfs.vfat -F 16 -s 2 --invariant -i 5EED1234 -n VIMAGEFAT "$FAT" >"$LOG/mkfs.vfat.out"
(cd "$SRC" && find . -mindepth 1 -type d | LC_ALL=C sort) | sed 's#^\./##' |
    while IFS= read -r d; do mmd -i "$FAT" "::/$d"; done
(cd "$SRC" && find . -type f | LC_ALL=C sort) | sed 's#^\./##' |
    while IFS= read -r f; do mcopy -m -i "$FAT" "$SRC/$f" "::/$f"; done
fsck.vfat -n "$FAT" >"$LOG/fsck.vfat.out" 2>&1 || { cat "$LOG/fsck.vfat.out" >&2; exit 1; }

# NTFS: 2 MiB + 1536 bytes = 4099 sectors, i.e. NOT a multiple of the 4 KiB
# cluster size (the backup boot sector lives in a partial last cluster)
NTFS_BYTES=2098688
NTFS=$FS/ntfs.raw
rm -f "$NTFS"; truncate -s $NTFS_BYTES "$NTFS"
mkntfs -F -Q -T -q -L VIMAGENTFS "$NTFS" >"$LOG/mkntfs.out" 2>&1
NM=$WORK/mnt/ntfs; mkdir -p "$NM"
if [ -n "$FAKETIME_SO" ]; then
    VIMAGE_FAKE_TIME=$EPOCH LD_PRELOAD=$FAKETIME_SO ntfs-3g "$NTFS" "$NM"
else
    ntfs-3g "$NTFS" "$NM"
fi
track_mount "$NM"
cp -r "$SRC/." "$NM/"
# also set all four NTFS times through ntfs-3g's system.ntfs_times xattr
python3 - "$NM" "$EPOCH" <<'PYEOF'
import os, struct, sys
t = (int(sys.argv[2]) + 11644473600) * 10**7
v = struct.pack("<4Q", t, t, t, t)
root = sys.argv[1]
for d, dirs, files in os.walk(root, topdown=False):
    for n in files + dirs:
        os.setxattr(os.path.join(d, n), "system.ntfs_times", v, follow_symlinks=False)
os.setxattr(root, "system.ntfs_times", v)
PYEOF
untrack_umount "$NM"

if [ $HAVE_BTRFS = 1 ]; then
    BTRFS=$FS/btrfs.raw
    rm -f "$BTRFS"; truncate -s 128M "$BTRFS"
    settimes
    mkfs.btrfs -q -f -r "$SRC" -U 11111111-2222-4333-8444-0000000000bf -L vimage-btrfs "$BTRFS" >"$LOG/mkfs.btrfs.out" 2>&1
fi

say "checking the trees on the source filesystems"
verify_tree "$FS/ext4-1k.raw" mount_ext_ro
verify_tree "$FS/ext4-4k.raw" mount_ext_ro
verify_tree "$FS/ext2.raw" mount_ro
verify_fat_tree "$FAT"
verify_tree "$NTFS" mount_ntfs_ro
[ $HAVE_BTRFS = 1 ] && verify_tree "$BTRFS" mount_ro

declare -A SRC_SHA
for f in "$FS"/*.raw; do SRC_SHA[$(basename "$f" .raw)]=$(sha "$f"); done

cd "$WORK/out"
R=$WORK/restore

# ---- partclone ---------------------------------------------------------------
# pc_image NAME SRCFS TOOL [extra clone options]
pc_image() {
    local name=$1 fs=$2 tool=$3; shift 3
    local img=$FS/$fs.raw size
    size=$(bytes "$img")
    attach "$img"
    local cmd=("$tool" -c "$@" -s "$DEV" -O "$name")
    say "${cmd[*]}"
    "${cmd[@]}" -L "$LOG/$name.clone.log" >"$LOG/$name.clone.out" 2>&1 ||
        { tail "$LOG/$name.clone.log" >&2; exit 1; }
    detach "$DEV"
    partclone.chkimg -s "$name" -L "$LOG/$name.chk.log" >"$LOG/$name.chk.out" 2>&1 ||
        { tail "$LOG/$name.chk.log" >&2; echo "chkimg failed: $name" >&2; exit 1; }
    grep -q 'Checked successfully' "$LOG/$name.chk.out" "$LOG/$name.chk.log"
    local out=$R/$name.raw extra=()
    [ -n "$NOTE" ] && extra=(note="$NOTE")
    rm -f "$out"; truncate -s "$size" "$out"
    partclone.restore -s "$name" -O "$out" -L "$LOG/$name.restore.log" >"$LOG/$name.restore.out" 2>&1 ||
        { tail "$LOG/$name.restore.log" >&2; exit 1; }
    finish_restore "$name" "$fs" "$out" "$size" partclone "$PC_VER" "${cmd[*]}" \
        "truncate -s $size out.raw && partclone.restore -s $name -O out.raw" \
        chkimg="partclone.chkimg -s $name: Checked successfully" "${extra[@]}"
    NOTE=
}

# finish_restore NAME FS OUTFILE SIZE FORMAT TOOL SAVECMD RESTORECMD [rec args]
finish_restore() {
    local name=$1 fs=$2 out=$3 size=$4 format=$5 tool=$6 save=$7 restore=$8; shift 8
    local got eq note=
    [ "$(bytes "$out")" = "$size" ] || { echo "$name: restored size $(bytes "$out") != $size" >&2; exit 1; }
    got=$(sha "$out")
    if [ "$got" = "${SRC_SHA[$fs]}" ]; then eq=true; else eq=false; fi
    local tree=null
    if [ $eq = false ]; then
        # not byte-identical: at least the file tree must be intact
        case $fs in
            ntfs) verify_tree "$out" mount_ntfs_ro ;;
            btrfs) verify_tree "$out" mount_ro ;;
            fat16) verify_fat_tree "$out" ;;
            ext2) verify_tree "$out" mount_ro ;;
            *) verify_tree "$out" mount_ext_ro ;;
        esac
        tree=true
    fi
    rec "$name" format="$format" tool="$tool" command="$save" restore="$restore" \
        size:="$size" sha256="$got" source_fs="$fs.raw" source_sha256="${SRC_SHA[$fs]}" \
        equals_source:=$eq restored_tree_ok:=$tree "$@"
    rm -f "$out"
}

say "partclone images"
NOTE=
pc_image ext4-1k.ptcl-img     ext4-1k partclone.ext4
pc_image ext4-4k.ptcl-img     ext4-4k partclone.ext4
pc_image ext4-4k-a0.ptcl-img  ext4-4k partclone.ext4 -a0
pc_image ext4-4k-k7.ptcl-img  ext4-4k partclone.ext4 -a1 -k 7
pc_image fat16.ptcl-img       fat16   partclone.vfat
NOTE="partclone 0.3.23 only saves whole clusters: the backup boot sector in the partial last cluster (last 512 bytes of the 4099-sector device) is not in the image, so the restored partition differs from the source there (it stays zero)"
pc_image ntfs.ptcl-img        ntfs    partclone.ntfs
if [ $HAVE_BTRFS = 1 ]; then
    NOTE="partclone.btrfs only saves allocated extents; mkfs.btrfs -r leaves stale data in unallocated space, so the restore differs from the source but the file tree is identical"
    pc_image btrfs.ptcl-img   btrfs   partclone.btrfs
fi

# ---- ntfsclone ---------------------------------------------------------------
say "ntfsclone"
attach "$NTFS"
NC_SAVE=(ntfsclone --save-image -o ntfs.ntfsclone-img "$DEV")
"${NC_SAVE[@]}" >"$LOG/ntfsclone.save.out" 2>&1 || { cat "$LOG/ntfsclone.save.out" >&2; exit 1; }
detach "$DEV"
rm -f "$R/ntfs.nc.raw"
ntfsclone --restore-image -O "$R/ntfs.nc.raw" ntfs.ntfsclone-img >"$LOG/ntfsclone.restore.out" 2>&1 ||
    { cat "$LOG/ntfsclone.restore.out" >&2; exit 1; }
finish_restore ntfs.ntfsclone-img ntfs "$R/ntfs.nc.raw" $NTFS_BYTES ntfsclone "$NC_VER" "${NC_SAVE[*]}" \
    "ntfsclone --restore-image -O out.raw ntfs.ntfsclone-img" \
    note="device is 4099 sectors: the last image cluster (backup boot sector) is a partial cluster of 1536 bytes"

# ---- partimage ---------------------------------------------------------------
# pi_info FS: block size / counts from partimage's own debug log (-g3)
pi_info() {
    local fs=$1 dbg=/var/log/partimage/partimage-debug.log
    attach "$FS/$fs.raw"
    partimage -B x=y -g3 -d -z0 -o save "$DEV" "$WORK/pi-info-$fs" </dev/null >"$LOG/pi-info.out" 2>&1
    detach "$DEV"
    PI_TOTAL=$(grep -a -o 'qwBlocksCount = [0-9]*' "$dbg" | tail -1 | awk '{print $3}')
    PI_USED=$(grep -a -o 'qwUsedBlocks = [0-9]*' "$dbg" | tail -1 | awk '{print $3}')
    local usedbytes
    usedbytes=$(grep -a -o 'qwBitmapUsedSize\.*[0-9]*' "$dbg" | tail -1 | sed 's/.*\.//')
    PI_BS=$((usedbytes / PI_USED))
    # (the debug log is rewritten by every partimage run, so read it first)
    # (partimage 0.6.9 "imginfo" hangs forever on -z2/bzip2 images, so the
    # file system name is read from this uncompressed one)
    timeout 60 partimage -B x=y imginfo "$WORK/pi-info-$fs.000" </dev/null >"$LOG/imginfo.out" 2>&1 || true
    PI_FSNAME=$(first_line '^Filesystem:' "$(cat "$LOG/imginfo.out")" | sed 's/^Filesystem:\.*//')
    cp "$LOG/imginfo.out" "$LOG/imginfo-$fs.out"
    rm -f "$WORK/pi-info-$fs".*
}

# pi_image BASENAME FS [partimage options...]  (the image is BASENAME.000, ...)
pi_image() {
    local base=$1 fs=$2; shift 2
    local img=$FS/$fs.raw size
    size=$(bytes "$img")
    attach "$img"
    local cmd=(partimage -B x=y -d "$@" -o save "$DEV" "$base")
    say "${cmd[*]}"
    "${cmd[@]}" </dev/null >"$LOG/$base.save.out" 2>&1 || { tail "$LOG/$base.save.out" >&2; exit 1; }
    detach "$DEV"
    local vols=() v
    for v in "$base".[0-9][0-9][0-9]; do vols+=("$v"); done
    local first=${vols[0]}
    local out=$R/$base.raw
    rm -f "$out"; truncate -s "$size" "$out"
    attach "$out"
    partimage -B x=y restore "$DEV" "$first" </dev/null >"$LOG/$base.restore.out" 2>&1 ||
        { tail "$LOG/$base.restore.out" >&2; exit 1; }
    detach "$DEV"
    pi_info "$fs"
    local files
    files=$(python3 -c 'import json,sys; print(json.dumps(sys.argv[1:]))' "${vols[@]}")
    finish_restore "$first" "$fs" "$out" "$size" partimage "$PI_VER" "${cmd[*]}" \
        "truncate -s $size out.raw && losetup -f --show out.raw (-> /dev/loopN) && partimage -B x=y restore /dev/loopN $first" \
        filesystem="$PI_FSNAME" block_size:=$PI_BS used_blocks:=$PI_USED total_blocks:=$PI_TOTAL \
        checksum=none blocks_per_checksum:=null files:="$files" volumes:=${#vols[@]} \
        compression="$PI_COMP" "${PI_EXTRA[@]}"
}

say "partimage images"
PI_EXTRA=()
PI_COMP=none;  pi_image ext2.partimg       ext2  -z0
PI_COMP=gzip;  pi_image ext2.partimg.gz    ext2  -z1
PI_COMP=bzip2; pi_image ext2.partimg.bz2   ext2  -z2
PI_COMP=none;  PI_EXTRA=(volume_size_mib:=1)
               pi_image ext2-split.partimg ext2  -z0 -V1
PI_EXTRA=()
PI_COMP=gzip;  pi_image fat16.partimg.gz   fat16 -z1

# ---- raw (Clonezilla dd-img style) -------------------------------------------
say "raw dd-img"
attach "$FAT"
DD_SAVE="partclone.dd -s $DEV -o - | gzip -n -9 -c > sdb1.dd-img.gz"
partclone.dd -s "$DEV" -o - -L "$LOG/dd.log" 2>"$LOG/dd.err" | gzip -n -9 -c > sdb1.dd-img.gz
detach "$DEV"
gzip -dc sdb1.dd-img.gz > "$R/dd.raw"
finish_restore sdb1.dd-img.gz fat16 "$R/dd.raw" "$(bytes "$FAT")" raw "$PC_VER; $GZ_VER" "$DD_SAVE" \
    "gzip -dc sdb1.dd-img.gz > out.raw" filesystem=raw contains=FAT16 compression=gzip \
    block_size:=512 checksum=none

# ---- partclone-modern images from $SHARED -------------------------------------
if [ -d "$SHARED" ]; then
    say "copying $SHARED"
    EXT4_SHA=3c8b6ca89d3adc5844393caa3ecd6007330a111568efd54bbb7d0823e52b33bc
    FAT32_SHA=3bdccd7956ccc9541ed3973574eb7cda4d640fe4a26d17ec7011b3f4901b3c01
    V47="Partclone : v0.3.47 (198be48)"
    shared_rec() {  # shared_rec NAME CMD CHECKSUM CSIZE BPC RESEED [extra]
        local name=$1 cmd=$2 ck=$3 cs=$4 bpc=$5 reseed=$6; shift 6
        local fsn=EXTFS bs=1024 used=2630 total=16384 size=16777216 sh=$EXT4_SHA
        case $name in fat32*) fsn=FAT32 bs=512 used=2072 total=81920 size=41943040 sh=$FAT32_SHA;; esac
        rec "$name" format=partclone origin=shared/partclone-modern filesystem=$fsn \
            block_size:=$bs used_blocks:=$used total_blocks:=$total size:=$size sha256=$sh \
            equals_source:=true checksum="$ck" checksum_size:=$cs blocks_per_checksum:=$bpc reseed:=$reseed \
            tool="$V47" command="$cmd" \
            restore="truncate -s $size out.raw && partclone.restore -C -s $name -O out.raw" "$@"
    }
    # VIMAGE_SHARED=all copies every file; the default leaves out the two
    # 2.7 MB images that other files already cover: ext4-a0-none (NONE is
    # also in ext4-4k-a0.ptcl-img) and ext4-a2-xxh64 (== the split .gz.a?
    # pieces after gunzip).
    SHARED_SKIP=" ext4-a0-none.ptcl-img ext4-a2-xxh64.ptcl-img "
    [ "${VIMAGE_SHARED:-}" = all ] && SHARED_SKIP=" "
    for f in "$SHARED"/*; do
        b=$(basename "$f")
        case $b in *.md) continue;; esac
        case $SHARED_SKIP in *" $b "*) continue;; esac
        install -m 0644 "$f" "$OUT/$b"
    done
    shared() {
        case $SHARED_SKIP in *" $1 "*) return 0;; esac
        shared_rec "$@"
    }
    P=partclone-0.3.47/partclone
    shared ext4-a0-none.ptcl-img "$P.ext4 -c -a0 -s ext4.raw -O ext4-a0-none.ptcl-img" none null 0 true image_version=0002
    shared ext4-a1-crc32-k7.ptcl-img "$P.ext4 -c -a1 -k 7 -s ext4.raw -O ext4-a1-crc32-k7.ptcl-img" crc32 4 7 true image_version=0002
    shared ext4-a2-xxh64.ptcl-img "$P.ext4 -c -a2 -s ext4.raw -O ext4-a2-xxh64.ptcl-img" xxh64 8 1024 true image_version=0002
    shared ext4-a2-xxh64-k7-noreseed.ptcl-img "$P.ext4 -c -a2 -k 7 -K -s ext4.raw -O ext4-a2-xxh64-k7-noreseed.ptcl-img" xxh64 8 7 false image_version=0002
    shared ext4-a3-xxh128.ptcl-img "$P.ext4 -c -a3 -s ext4.raw -O ext4-a3-xxh128.ptcl-img" xxh128 16 1024 true image_version=0002
    shared ext4-a3-xxh128-noreseed.ptcl-img "$P.ext4 -c -a3 -K -s ext4.raw -O ext4-a3-xxh128-noreseed.ptcl-img" xxh128 16 1024 false image_version=0002
    shared fat32-a3-xxh128.ptcl-img "$P.fat32 -c -a3 -s fat32.raw -O fat32-a3-xxh128.ptcl-img" xxh128 16 2048 true image_version=0002
    shared ext4-v1-0.2.89.ptcl-img "partclone-0.2.89/partclone.extfs -c -s ext4.raw -O ext4-v1-0.2.89.ptcl-img" crc32-0001 4 1 false \
        image_version=0001 tool="partclone 0.2.89" \
        note="format 0001: 1 byte per block bitmap + BiTmAgIc, CRC32 after every block, CRC fed with the first byte of each block only (0001 bug), never reset"
    shared sda1.ext4-ptcl-img.zst "$P.ext4 -c -a3 -s ext4.raw -o - | zstd -T0 -3 -q -c > sda1.ext4-ptcl-img.zst" xxh128 16 1024 true \
        image_version=0002 compression=zstd \
        restore="truncate -s 16777216 out.raw && zstd -dc sda1.ext4-ptcl-img.zst | partclone.restore -C -s - -O out.raw" \
        note="zstd -dc gives exactly ext4-a3-xxh128.ptcl-img"
    shared sda1.ext4-ptcl-img.gz.aa "$P.ext4 -c -a2 -s ext4.raw -o - | pigz --fast -b 1024 -c > sda1.ext4-ptcl-img.gz; split -a 2 -b 100KB sda1.ext4-ptcl-img.gz sda1.ext4-ptcl-img.gz." xxh64 8 1024 true \
        image_version=0002 compression=gzip \
        files:='["sda1.ext4-ptcl-img.gz.aa", "sda1.ext4-ptcl-img.gz.ab", "sda1.ext4-ptcl-img.gz.ac"]' \
        restore="truncate -s 16777216 out.raw && cat sda1.ext4-ptcl-img.gz.a? | gzip -dc | partclone.restore -C -s - -O out.raw" \
        note="cat .aa .ab .ac | gzip -dc gives exactly ext4-a2-xxh64.ptcl-img (2695306 bytes)"
else
    say "WARNING: $SHARED not found, partclone-modern images not copied"
fi

# ---- install -----------------------------------------------------------------
say "installing into $OUT"
for f in "$WORK/out"/*; do
    install -m 0644 "$f" "$OUT/"
done
python3 "$WORK/tdlib.py" finish "$RECORDS" "$OUT"
cd "$OUT"
say "done; testdata size: $(du -sh --apparent-size "$OUT" | cut -f1)"
