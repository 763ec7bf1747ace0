#!/bin/bash
# make-rawdisk.sh - whole-disk raw ("dd") test images with REAL partition tables
# and file systems, for vimage's partition-table reader and superblock probing.
#
#   sudo bash testdata/make-rawdisk.sh
#
# Rebuilds testdata/rawdisk/*.img.gz and testdata/rawdisk/expected.json from
# scratch (testdata/rawdisk/README.md is hand-written and is kept):
#
#   mbr.img     32 MiB dos label: p1 ext4, p2 extended { p5 FAT16, p6 swap, p7 ext2 },
#               p3 small primary type 83 left empty (no file system)
#   gpt.img     64 MiB GPT: p1 "EFI system" FAT32, p2 ext4, p3 swap, p4 LUKS2, p5 exFAT
#   gpt4k.img   32 MiB GPT on a disk with 4096-byte logical sectors: ext4 (-b 4096),
#               FAT16 with 4096-byte sectors (5109 clusters)
#   hybrid.img  copy of gpt.img with a hybrid MBR written by `sgdisk -h 1:2:5`
#   fsonly.img  8 MiB ext4, no partition table
#   iso.img     ISO 9660 (+ Rock Ridge, Joliet) made by xorriso
#
# Every table is written by sfdisk, every file system by its mkfs on the loop
# partition device (losetup + partx -a: this kernel has no MSDOS/EFI partition
# parser, so `losetup -P` finds no partitions; partx adds them with BLKPG from
# libblkid's reading of the table). Each image is stored as NAME.img.gz (gzip -9n).
#
# Determinism: everything is byte-for-byte reproducible on the same tool versions
# except the LUKS2 partition (random salts and volume key), i.e. gpt.img and
# hybrid.img as whole disks and their partition 4; all other partition sha256 are
# stable. expected.json is always written from the same run as the images.
#
# Needs root. Debian 12 packages: util-linux fdisk(sfdisk) gdisk(sgdisk) e2fsprogs
# dosfstools mtools exfatprogs exfat-fuse cryptsetup-bin xorriso gzip python3
# (gcc optional: LD_PRELOAD clock shim for reproducible exFAT file times).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=$HERE/rawdisk

export LC_ALL=C.UTF-8 TZ=UTC
EPOCH=1704164645                      # 2024-01-02 03:04:05 UTC
FIXED_DATE='2024-01-02 03:04:05 UTC'
export E2FSPROGS_FAKE_TIME=$EPOCH     # mke2fs, debugfs
export SOURCE_DATE_EPOCH=$EPOCH       # mtools (mmd/mcopy), xorriso
export MTOOLS_SKIP_CHECK=1
HASH_SEED=0b7f6a52-3c1e-4d8a-a5b6-9e0f1d2c3b4a
LUKS_PASSPHRASE=vimage

if [ "$(id -u)" != 0 ]; then
    echo "make-rawdisk.sh: must run as root (loop devices, mounts)" >&2
    exit 1
fi
for t in python3 losetup partx delpart blockdev mount umount mountpoint truncate sha256sum gzip \
         sfdisk sgdisk blkid mkfs.ext4 mkfs.ext2 debugfs e2fsck dumpe2fs mkfs.vfat fsck.vfat \
         mmd mcopy minfo mkswap mkfs.exfat tune.exfat fsck.exfat dump.exfat mount.exfat-fuse \
         cryptsetup xorriso diff; do
    command -v "$t" >/dev/null || { echo "missing tool: $t" >&2; exit 1; }
done

T0=$(date +%s)
WORK=$(mktemp -d /tmp/vimage-rawdisk.XXXXXX)
LOOPS=()
MOUNTS=()
FUSEPIDS=()
cleanup() {
    set +e
    local i
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
        umount "${MOUNTS[i]}" 2>/dev/null || umount -l "${MOUNTS[i]}" 2>/dev/null
    done
    for i in "${FUSEPIDS[@]}"; do wait "$i" 2>/dev/null; done
    for i in "${LOOPS[@]}"; do
        clear_parts "$i" 2>/dev/null
        losetup -d "$i" 2>/dev/null
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

LOG=$WORK/logs
IMG=$WORK/img
REC=$WORK/records
mkdir -p "$LOG" "$IMG" "$REC" "$WORK/mnt"
say() { printf '== %s\n' "$*" >&2; }
run_logged() {  # run_logged LOGNAME CMD...: run, keep output; show it on failure
    local log=$LOG/$1; shift
    if ! "$@" >"$log" 2>&1; then
        cat "$log" >&2; echo "FAILED: $*" >&2; exit 1
    fi
}

# ---- loop devices ------------------------------------------------------------
# Partition nodes of a loop device survive `losetup -d` when they were added with
# partx (no LO_FLAGS_PARTSCAN), so a freshly attached loop device may carry stale
# partitions of somebody else's image: remove them all before `partx -a`.
clear_parts() {  # clear_parts DEV
    local dev=$1 base p n
    base=${dev#/dev/}
    for p in /sys/block/"$base"/"$base"p*; do
        [ -e "$p" ] || continue
        n=${p##*p}
        delpart "$dev" "$n"
    done
}
attach() {      # attach FILE SECTOR_SIZE [ro] -> sets $DEV (no partitions yet)
    local ro=()
    [ "${3:-}" = ro ] && ro=(-r)
    DEV=$(losetup -f --show -b "$2" "${ro[@]}" "$1")
    LOOPS+=("$DEV")
    clear_parts "$DEV"
}
add_parts() {   # add_parts DEV: make the partition nodes (libblkid's numbering)
    partx -a "$1"
    udevadm settle 2>/dev/null || true
}
detach() {      # detach DEV: flush partition + disk buffers, drop nodes, detach
    local d=$1 i p
    for p in "$d"p*; do [ -b "$p" ] && blockdev --flushbufs "$p"; done
    blockdev --flushbufs "$d"
    clear_parts "$d"
    losetup -d "$d"
    for i in "${!LOOPS[@]}"; do [ "${LOOPS[i]}" = "$d" ] && unset 'LOOPS[i]'; done
    LOOPS=("${LOOPS[@]}")
    sync
}
untrack_umount() {
    local m=$1 i
    umount "$m"
    for i in "${!MOUNTS[@]}"; do [ "${MOUNTS[i]}" = "$m" ] && unset 'MOUNTS[i]'; done
    MOUNTS=("${MOUNTS[@]}")
}

# ---- clock shim for exfat-fuse (it stamps create/access times with time()) ----
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
[ -n "$FAKETIME_SO" ] || say "WARNING: no gcc: the exFAT file times will not be reproducible"

# ---- source trees (tmpfs: readdir order = creation order, as in make-testdata.sh)
# full:  mktree.py output (~1.1 MB, 14 files)
# small: the same minus text/, bin/ and nested/a/b/sibling.bin (10 small files, a
#        few hundred bytes), used where another copy of the full tree would only
#        make the .gz files bigger
TREES=$WORK/trees
mkdir -p "$TREES"
mount -t tmpfs -o size=32m,mode=0755 vimage-rawdisk-src "$TREES"
MOUNTS+=("$TREES")
python3 "$HERE/mktree.py" "$TREES/full"
python3 "$HERE/mktree.py" "$TREES/small"
rm -rf "$TREES/small/text" "$TREES/small/bin" "$TREES/small/nested/a/b/sibling.bin"
settimes() { find "$TREES" -mindepth 1 -exec touch -h -d "$FIXED_DATE" {} +; }
settimes
tree() { SRC=$TREES/$1; }    # tree full|small: the tree the next mk*/verify_* use
tree full

# ---- file-system makers (TARGET is a partition node or a plain file) ----------
# ext*: mke2fs -d copies the source ctimes (which touch can not set): reset them,
# and the atimes, with debugfs afterwards.
fix_ext_times() {   # fix_ext_times TARGET
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
mkext() {   # mkext TARGET MKFS UUID LABEL [extra mkfs args]
    local target=$1 mkfs=$2 uuid=$3 label=$4
    shift 4
    settimes
    run_logged "$mkfs.$label" "$mkfs" -q -F -L "$label" -U "$uuid" \
        -E "hash_seed=$HASH_SEED,nodiscard" "$@" -d "$SRC" "$target"
    fix_ext_times "$target"
    run_logged "e2fsck.$label" e2fsck -fn "$target"
}
fill_fat() {    # fill_fat TARGET: mmd/mcopy the tree in sorted order
    local target=$1 d f
    (cd "$SRC" && find . -mindepth 1 -type d | LC_ALL=C sort) | sed 's#^\./##' |
        while IFS= read -r d; do mmd -i "$target" "::/$d" 2>>"$LOG/mtools.err"; done
    (cd "$SRC" && find . -type f | LC_ALL=C sort) | sed 's#^\./##' |
        while IFS= read -r f; do mcopy -m -i "$target" "$SRC/$f" "::/$f" 2>>"$LOG/mtools.err"; done
    run_logged "fsck.vfat.$(basename "$target")" fsck.vfat -n "$target"
}
mkfat() {   # mkfat TARGET SERIAL LABEL [mkfs.vfat args]
    local target=$1 serial=$2 label=$3
    shift 3
    run_logged "mkfs.vfat.$label" mkfs.vfat --invariant -i "$serial" -n "$label" "$@" "$target"
    fill_fat "$target"
}
fuse_exfat_mount() {    # fuse_exfat_mount DEV MNT [ro]: exfat-fuse in the foreground (-d), backgrounded
    local dev=$1 mnt=$2 opts=() i
    [ "${3:-}" = ro ] && opts=(-o ro)
    mkdir -p "$mnt"
    if [ -n "$FAKETIME_SO" ]; then
        LD_PRELOAD=$FAKETIME_SO VIMAGE_FAKE_TIME=$EPOCH \
            mount.exfat-fuse -d "${opts[@]}" "$dev" "$mnt" >"$LOG/exfat-fuse.$(basename "$mnt").log" 2>&1 &
    else
        mount.exfat-fuse -d "${opts[@]}" "$dev" "$mnt" >"$LOG/exfat-fuse.$(basename "$mnt").log" 2>&1 &
    fi
    FUSEPIDS+=($!)
    MOUNTS+=("$mnt")
    for i in $(seq 100); do mountpoint -q "$mnt" && return 0; sleep 0.1; done
    echo "exfat-fuse mount of $dev failed" >&2; cat "$LOG/exfat-fuse.$(basename "$mnt").log" >&2; exit 1
}
fuse_umount() {     # fuse_umount MNT: unmount and wait for the daemon to exit
    untrack_umount "$1"
    local p
    for p in "${FUSEPIDS[@]}"; do wait "$p" || true; done
    FUSEPIDS=()
}
mkexfat() {     # mkexfat DEV SERIAL LABEL: mkfs.exfat, fixed serial, tree via exfat-fuse
    local dev=$1 serial=$2 label=$3 m=$WORK/mnt/exfat d f
    run_logged "mkfs.exfat.$label" mkfs.exfat -L "$label" "$dev"
    run_logged "tune.exfat.$label" tune.exfat -I "$serial" "$dev"
    fuse_exfat_mount "$dev" "$m"
    (cd "$SRC" && find . -mindepth 1 -type d | LC_ALL=C sort) | sed 's#^\./##' |
        while IFS= read -r d; do mkdir "$m/$d"; done
    (cd "$SRC" && find . -type f | LC_ALL=C sort) | sed 's#^\./##' |
        while IFS= read -r f; do cp "$SRC/$f" "$m/$f"; touch -d "$FIXED_DATE" "$m/$f"; done
    (cd "$SRC" && find . -mindepth 1 -type d | LC_ALL=C sort -r) | sed 's#^\./##' |
        while IFS= read -r d; do touch -d "$FIXED_DATE" "$m/$d"; done
    fuse_umount "$m"
    run_logged "fsck.exfat.$label" fsck.exfat -n "$dev"
}
mkswap_fixed() {    # mkswap_fixed DEV UUID LABEL NAME: keeps mkswap's message for the manifest
    run_logged "mkswap.$4" mkswap -U "$2" -L "$3" "$1"
    grep -m1 'Setting up swapspace' "$LOG/mkswap.$4" > "$REC/$4.mkswap.txt"
}

sfdisk_file() {     # sfdisk_file IMAGE SCRIPTFILE: write the table into a plain file
    run_logged "sfdisk.$(basename "$1")" sfdisk --no-reread --no-tell-kernel "$1" < "$2"
}

rm -f "$OUT"/*.img "$OUT"/*.img.gz "$OUT"/expected.json
mkdir -p "$OUT"

# ==== 1. mbr.img ===============================================================
say "mbr.img: dos label, extended partition with 3 logical partitions"
MBR=$IMG/mbr.img
truncate -s 32M "$MBR"
cat > "$WORK/mbr.sfdisk" <<'EOF'
label: dos
label-id: 0x5eed0001
unit: sectors

mbr.img1 : start=2048, size=16384, type=83, bootable
mbr.img2 : start=18432, size=43008, type=5
mbr.img3 : start=61440, size=2048, type=83
mbr.img5 : size=16384, type=6
mbr.img6 : size=4096, type=82
mbr.img7 : size=16384, type=83
EOF
sfdisk_file "$MBR" "$WORK/mbr.sfdisk"
attach "$MBR" 512; add_parts "$DEV"
tree full;  mkext "${DEV}p1" mkfs.ext4 5eed0101-0000-4000-8000-0000000000e4 mbr-ext4
tree full;  mkfat "${DEV}p5" 5EED0105 MBRFAT16 -F 16 -s 2
mkswap_fixed "${DEV}p6" 5eed0106-0000-4000-8000-000000000005 mbr-swap mbr.6
tree small; mkext "${DEV}p7" mkfs.ext2 5eed0107-0000-4000-8000-0000000000e2 mbr-ext2 -b 1024
# p3: type 83 but no file system (all zeros)
detach "$DEV"

# ==== 2. gpt.img ===============================================================
say "gpt.img: GPT, ESP FAT32, ext4, swap, LUKS2, exFAT"
GPT=$IMG/gpt.img
truncate -s 64M "$GPT"
cat > "$WORK/gpt.sfdisk" <<'EOF'
label: gpt
label-id: 5EED0200-0000-4000-8000-000000000000
unit: sectors

gpt.img1 : start=2048, size=73728, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, uuid=5EED02A1-0000-4000-8000-000000000001, name="EFI system", attrs="RequiredPartition"
gpt.img2 : size=16384, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, uuid=5EED02A2-0000-4000-8000-000000000002, name="Linux filesystem partition 36 chars.", attrs="LegacyBIOSBootable"
gpt.img3 : size=4096, type=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F, uuid=5EED02A3-0000-4000-8000-000000000003, name="Linux swap"
gpt.img4 : size=8192, type=CA7D7CCB-63ED-4C53-861C-1742536059CC, uuid=5EED02A4-0000-4000-8000-000000000004, name="LUKS2 crypt"
gpt.img5 : size=16384, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7, uuid=5EED02A5-0000-4000-8000-000000000005, name="exFAT data ü", attrs="GUID:63"
EOF
sfdisk_file "$GPT" "$WORK/gpt.sfdisk"
attach "$GPT" 512; add_parts "$DEV"
# FAT32 for real: 73728 sectors, 1-sector clusters: 72562 clusters (>= 65525; a
# smaller FAT32 would count as FAT16 by the cluster-count rule)
tree small; mkfat "${DEV}p1" 5EED0201 ESP -F 32 -s 1
tree small; mkext "${DEV}p2" mkfs.ext4 5eed0202-0000-4000-8000-0000000000e4 gpt-ext4 -b 4096 -O ^has_journal
mkswap_fixed "${DEV}p3" 5eed0203-0000-4000-8000-000000000005 gpt-swap gpt.3
printf '%s' "$LUKS_PASSPHRASE" > "$WORK/luks.key"
# LUKS2 header: 2 x 16 KiB metadata + 128 KiB keyslots area (cryptsetup fills it
# with random bytes, so it is kept small: one 256-bit keyslot = 128000 bytes); data segment at 1 MiB
# (cryptsetup's default alignment). The data segment is never opened (no dm here),
# so it stays zero. Random salts/volume key: this partition is not reproducible.
run_logged luksFormat cryptsetup luksFormat --batch-mode --type luks2 \
    --key-size 256 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 --hash sha256 \
    --uuid 5eed0204-0000-4000-8000-0000000000c5 --label gpt-luks \
    --luks2-metadata-size 16k --luks2-keyslots-size 128k \
    --key-file "$WORK/luks.key" "${DEV}p4"
run_logged luksTest cryptsetup open --test-passphrase --key-file "$WORK/luks.key" "${DEV}p4"
tree full;  mkexfat "${DEV}p5" 0x5EED0205 GPTEXFAT
detach "$DEV"

# ==== 3. gpt4k.img =============================================================
say "gpt4k.img: GPT with 4096-byte logical sectors"
GPT4K=$IMG/gpt4k.img
truncate -s 32M "$GPT4K"
cat > "$WORK/gpt4k.sfdisk" <<'EOF'
label: gpt
label-id: 5EED0300-0000-4000-8000-000000000000
unit: sectors
sector-size: 4096

gpt4k.img1 : start=256, size=2560, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, uuid=5EED03A1-0000-4000-8000-000000000001, name="root4k"
gpt4k.img2 : start=2816, size=5120, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7, uuid=5EED03A2-0000-4000-8000-000000000002, name="fat16-4k"
EOF
# sfdisk has no --sector-size: it takes the sector size of the device, so it
# writes the table through a loop device with 4096-byte logical sectors.
attach "$GPT4K" 4096
[ "$(blockdev --getss "$DEV")" = 4096 ] || { echo "losetup -b 4096 did not work" >&2; exit 1; }
run_logged sfdisk.gpt4k sfdisk --no-reread --no-tell-kernel "$DEV" < "$WORK/gpt4k.sfdisk"
add_parts "$DEV"
tree small; mkext "${DEV}p1" mkfs.ext4 5eed0301-0000-4000-8000-0000000000e4 gpt4k-ext4 -b 4096
# mkfs.vfat takes the 4096-byte logical sector size from the device
tree full;  mkfat "${DEV}p2" 5EED0302 FAT16-4K -F 16 -s 1
detach "$DEV"

# ==== 4. hybrid.img ============================================================
say "hybrid.img: gpt.img + sgdisk -h 1:2:5"
HYB=$IMG/hybrid.img
cp --sparse=always "$GPT" "$HYB"
run_logged sgdisk.hybrid sgdisk -h 1:2:5 "$HYB"
sfdisk -d -Y dos "$HYB" > "$REC/hybrid.mbr-dump.txt" 2>"$LOG/sfdisk-Y.err"

# ==== 5. fsonly.img ============================================================
say "fsonly.img: ext4 without a partition table"
FSONLY=$IMG/fsonly.img
truncate -s 8M "$FSONLY"
tree small; mkext "$FSONLY" mkfs.ext4 5eed0501-0000-4000-8000-0000000000e4 fsonly-ext4

# ==== 6. iso.img ===============================================================
say "iso.img: xorriso -as mkisofs"
ISO=$IMG/iso.img
settimes
tree small
run_logged xorriso xorriso -as mkisofs -o "$ISO" -V VIMAGE_ISO -J -R "$SRC"

# ==== verify + facts ===========================================================
say "verifying the trees and collecting the facts"
cat > "$WORK/facts.py" <<'PYEOF'
import hashlib, json, os, re, struct, subprocess, sys, zlib

def sha256_range(path, start=0, size=None):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        left = os.path.getsize(path) - start if size is None else size
        while left:
            b = f.read(min(left, 1 << 20))
            if not b:
                raise SystemExit("short read in %s" % path)
            h.update(b)
            left -= len(b)
    return h.hexdigest()

def run(args, ok=(0,)):
    p = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if p.returncode not in ok:
        raise SystemExit("%s failed (%d): %s" % (args, p.returncode, p.stderr.decode("utf-8", "replace")))
    return p.returncode, p.stdout.decode("utf-8", "surrogateescape")

def blkid(target, offset=None, size=None):
    """blkid -p tags of a device (or of a byte range of a file); raw values."""
    extra = []
    if offset is not None:
        extra = ["-O", str(offset), "-S", str(size)]
    rc, out = run(["blkid", "-p", "-o", "export"] + extra + [target], ok=(0, 2))
    keys = [l.split("=", 1)[0] for l in out.splitlines() if "=" in l]
    tags = {}
    for k in keys:
        if k in ("DEVNAME", "PART_ENTRY_DISK"):
            continue
        _, v = run(["blkid", "-p", "-o", "value", "-s", k] + extra + [target], ok=(0, 2))
        tags[k] = v.rstrip("\n")
    return tags

def kv_grab(text, rx):
    m = re.search(rx, text, re.M)
    return m.group(1) if m else None

def fs_size(fstype, target, swap_msg=None):
    """(bytes, source) of the file system size as the file system's tool reports it."""
    if fstype in ("ext2", "ext3", "ext4"):
        _, out = run(["dumpe2fs", "-h", target])
        n = int(kv_grab(out, r"^Block count:\s+(\d+)"))
        bs = int(kv_grab(out, r"^Block size:\s+(\d+)"))
        return n * bs, "dumpe2fs -h: Block count %d x Block size %d" % (n, bs), {"block_size": bs, "block_count": n}
    if fstype == "vfat":
        _, out = run(["minfo", "-i", target, "::"])  # (stderr: "Could not get geometry" on block devices)
        ss = int(kv_grab(out, r"^sector size: (\d+) bytes"))
        small = int(kv_grab(out, r"^small size: (\d+) sectors") or 0)
        big = int(kv_grab(out, r"^big size: (\d+) sectors") or 0)
        n = small or big
        return n * ss, "minfo: %s size %d sectors x sector size %d" % ("small" if small else "big", n, ss), \
            {"sector_size": ss, "sectors": n, "cluster_sectors": int(kv_grab(out, r"^cluster size: (\d+) sectors"))}
    if fstype == "exfat":
        _, out = run(["dump.exfat", target])
        n = int(kv_grab(out, r"^Volume Length\(sectors\):\s+(\d+)"))
        bits = int(kv_grab(out, r"^Sector Size Bits:\s+(\d+)"))
        return n << bits, "dump.exfat: Volume Length %d sectors x 2^%d" % (n, bits), \
            {"sector_size": 1 << bits, "sectors": n, "cluster_size": int(kv_grab(out, r"^Cluster size:\s+(\d+)"))}
    if fstype == "swap":
        with open(target, "rb") as f:
            h = f.read(4096)
        assert h[4086:4096] == b"SWAPSPACE2", h[4086:4096]
        version, last_page = struct.unpack_from("<II", h, 1024)
        extra = {"version": version, "last_page": last_page, "page_size": 4096}
        if swap_msg:
            extra["mkswap_said"] = swap_msg
        return (last_page + 1) * 4096, "swap header: (last_page %d + 1) x 4096-byte pages (mkswap's 'size' leaves out the header page)" % last_page, extra
    if fstype == "iso9660":
        _, out = run(["isoinfo", "-d", "-i", target]) if has("isoinfo") else (0, "")
        if out:
            n = int(kv_grab(out, r"^Volume size is: (\d+)"))
            bs = int(kv_grab(out, r"^Logical block size is: (\d+)"))
            return n * bs, "isoinfo -d: Volume size %d x Logical block size %d" % (n, bs), {"block_size": bs, "blocks": n}
        with open(target, "rb") as f:
            f.seek(16 * 2048)
            pvd = f.read(2048)
        n = struct.unpack_from("<I", pvd, 80)[0]
        bs = struct.unpack_from("<H", pvd, 128)[0]
        return n * bs, "primary volume descriptor: volume space size %d x logical block size %d" % (n, bs), {"block_size": bs, "blocks": n}
    if fstype == "crypto_LUKS":
        _, out = run(["cryptsetup", "luksDump", target])
        off = int(kv_grab(out, r"^\s+offset: (\d+) \[bytes\]"))
        return None, "LUKS2 data segment length: (whole device)", {
            "version": int(kv_grab(out, r"^Version:\s+(\d+)")),
            "data_offset": off,
            "metadata_area": int(kv_grab(out, r"^Metadata area:\s+(\d+)")),
            "keyslots_area": int(kv_grab(out, r"^Keyslots area:\s+(\d+)")),
            "passphrase": os.environ.get("LUKS_PASSPHRASE")}
    return None, None, None

def has(tool):
    return any(os.access(os.path.join(d, tool), os.X_OK) for d in os.environ["PATH"].split(":"))

def sfdisk_json(target, name, nested=None):
    args = ["sfdisk", "-J"] + (["-Y", nested] if nested else []) + [target]
    p = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if p.returncode != 0:
        return None, p.stderr.decode().strip()
    j = json.loads(p.stdout)
    pt = j["partitiontable"]
    pt["device"] = name
    for part in pt.get("partitions", []):
        part["node"] = "%s%s" % (name, re.search(r"(\d+)$", part["node"]).group(1))
    return j, p.stderr.decode().strip() or None

def dos_entries(sector):
    out = []
    for i in range(4):
        e = sector[446 + 16 * i: 462 + 16 * i]
        if not any(e):
            continue
        out.append({"slot": i + 1, "boot": e[0], "type": "%02x" % e[4],
                    "chs_start": e[1:4].hex(), "chs_end": e[5:8].hex(),
                    "lba": struct.unpack_from("<I", e, 8)[0], "sectors": struct.unpack_from("<I", e, 12)[0]})
    return out

def dos_facts(img, ss):
    with open(img, "rb") as f:
        mbr = f.read(512)
        facts = {"disk_signature": "0x%08x" % struct.unpack_from("<I", mbr, 440)[0],
                 "boot_signature_ok": mbr[510:512] == b"\x55\xaa", "entries": dos_entries(mbr)}
        ext = [e for e in facts["entries"] if e["type"] in ("05", "0f", "85")]
        if ext:
            chain, base, cur = [], ext[0]["lba"], ext[0]["lba"]
            while True:
                f.seek(cur * ss)
                ebr = f.read(512)
                ents = dos_entries(ebr)
                chain.append({"lba": cur, "byte_offset": cur * ss, "entries": ents})
                nxt = [e for e in ents if e["type"] in ("05", "0f", "85")]
                if not nxt:
                    break
                cur = base + nxt[0]["lba"]
            facts["ebr_chain"] = chain
    return facts

def gpt_header(buf):
    (sig, rev, hsize, crc, _r, cur, alt, first, last, guid, elba, n, esize, ecrc) = \
        struct.unpack_from("<8sIIIIQQQQ16sQIII", buf, 0)
    h = bytearray(buf[:hsize]); h[16:20] = b"\0\0\0\0"
    assert sig == b"EFI PART" and zlib.crc32(bytes(h)) == crc, "bad GPT header"
    import uuid
    return {"my_lba": cur, "alternate_lba": alt, "first_usable_lba": first, "last_usable_lba": last,
            "disk_guid": str(uuid.UUID(bytes_le=guid)).upper(), "entries_lba": elba,
            "entries": n, "entry_size": esize, "header_size": hsize, "revision": "0x%08x" % rev}

def gpt_facts(img, ss):
    size = os.path.getsize(img)
    with open(img, "rb") as f:
        f.seek(ss); prim = gpt_header(f.read(ss))
        f.seek(size - ss); back = gpt_header(f.read(ss))
        f.seek(0); pmbr = f.read(512)
    assert prim["alternate_lba"] == size // ss - 1 == back["my_lba"]
    return {"primary": dict(prim, byte_offset=prim["my_lba"] * ss, entries_byte_offset=prim["entries_lba"] * ss),
            "backup": dict(back, byte_offset=back["my_lba"] * ss, entries_byte_offset=back["entries_lba"] * ss),
            "mbr": {"disk_signature": "0x%08x" % struct.unpack_from("<I", pmbr, 440)[0],
                    "entries": dos_entries(pmbr)}}

def part_record(img, name, ss, p, dev, sysblock, made, ptlabel, extended_numbers):
    num = int(re.search(r"(\d+)$", p["node"]).group(1))
    start, size = p["start"] * ss, p["size"] * ss
    rec = {"number": num, "start": start, "size": size,
           "start_sector": p["start"], "sectors": p["size"],
           "type": p["type"].upper() if ptlabel == "gpt" else "%02x" % int(p["type"], 16),
           "name": p.get("name") if ptlabel == "gpt" else None,
           "sha256": sha256_range(img, start, size)}
    if ptlabel == "gpt":
        rec["uuid"] = p.get("uuid")
        rec["attrs"] = p.get("attrs")
    else:
        rec["bootable"] = bool(p.get("bootable"))
        rec["kind"] = "extended" if rec["type"] in ("05", "0f", "85") else ("logical" if num >= 5 else "primary")
    node = None
    if dev:
        node = "%sp%d" % (dev, num)
        base = os.path.basename(dev)
        sysd = os.path.join(sysblock, base, "%sp%d" % (base, num))
        kstart = int(open(os.path.join(sysd, "start")).read())
        ksize = int(open(os.path.join(sysd, "size")).read())
        assert kstart * 512 == start, (node, kstart, start)
        if rec.get("kind") == "extended":
            rec["kernel_size"] = ksize * 512     # the kernel (and partx) show an extended partition as 1 KiB
        else:
            assert ksize * 512 == size, (node, ksize, size)
    m = made.get(str(num), {})
    if node:
        tags = blkid(node)
    else:
        tags = blkid(img, start, size)
    slice_tags = blkid(img, start, size)
    if rec.get("kind") != "extended":
        assert slice_tags.get("TYPE") == tags.get("TYPE"), (num, slice_tags, tags)
    rec["filesystem"] = tags.get("TYPE")
    rec["fs_version"] = tags.get("VERSION")
    rec["fs_uuid"] = tags.get("UUID")
    rec["fs_label"] = tags.get("LABEL")
    rec["blkid"] = tags
    if m.get("filesystem", None) != rec["filesystem"]:
        raise SystemExit("%s p%d: made %r but blkid says %r" % (name, num, m.get("filesystem"), rec["filesystem"]))
    target = node or None
    if rec["filesystem"]:
        if target is None:
            target = os.path.join(os.environ["WORK"], "slice.%s.%d" % (name, num))
            with open(img, "rb") as f, open(target, "wb") as g:
                f.seek(start); g.write(f.read(size))
        n, src, extra = fs_size(rec["filesystem"], target, m.get("mkswap_said"))
        rec["fs_size"] = n
        rec["fs_size_source"] = src
        rec["fs_facts"] = extra
        if target != node:
            os.unlink(target)
    else:
        rec["fs_size"] = None
    rec["made_with"] = m.get("made_with")
    if m.get("tree"):
        rec["tree"] = m["tree"]
    if m.get("reproducible") is False:
        rec["reproducible"] = False
    return rec

def cmd_image(name, img, ss, dev, sysblock, meta_path, out_path):
    meta = json.load(open(meta_path))
    rec = {"size": os.path.getsize(img), "sha256": sha256_range(img), "sector_size": ss,
           "label": meta.get("label"), "made_with": meta.get("made_with"),
           "blkid_disk": blkid(img if ss == 512 or not dev else dev)}
    if meta.get("label"):
        target = dev if (ss != 512 and dev) else img
        j, err = sfdisk_json(target, name)
        rec["sfdisk_json"] = j
        rec["sfdisk_json_source"] = ("sfdisk -J %s (a loop device made with losetup -b %d; node/device names "
                                     "replaced by the image name)" % ("/dev/loopN", ss)) if target == dev else \
                                    "sfdisk -J %s (device name = image name)" % name
        pt = j["partitiontable"]
        assert pt["label"] == meta["label"] and pt["sectorsize"] == ss, pt
        rec["partitions"] = [part_record(img, name, ss, p, dev, sysblock, meta["parts"], pt["label"], None)
                             for p in pt["partitions"]]
        if dev:
            base = os.path.basename(dev)
            kparts = sorted(int(d[len(base) + 1:]) for d in os.listdir(os.path.join(sysblock, base))
                            if re.fullmatch(re.escape(base) + r"p\d+", d))
            assert kparts == [p["number"] for p in sorted(rec["partitions"], key=lambda r: r["number"])], kparts
            rec["partx_numbers"] = kparts
        if pt["label"] == "dos":
            rec["dos"] = dos_facts(img, ss)
        else:
            rec["gpt"] = gpt_facts(img, ss)
            assert rec["gpt"]["primary"]["first_usable_lba"] == pt["firstlba"]
            assert rec["gpt"]["primary"]["last_usable_lba"] == pt["lastlba"]
        if ss != 512:
            j512, err512 = sfdisk_json(img, name)
            rec["sfdisk_json_as_512"] = j512
            rec["sfdisk_json_as_512_note"] = (
                "sfdisk -J on the plain file (512-byte sectors): no GPT at byte 512, so libfdisk shows the "
                "protective MBR as a dos label; it prints the EE size as the disk size in 512-byte sectors "
                "minus 1 (the on-disk value is %d)" % rec["gpt"]["mbr"]["entries"][0]["sectors"])
            if err512:
                rec["sfdisk_json_as_512_stderr"] = err512
        if meta.get("hybrid"):
            jd, _ = sfdisk_json(img, name, nested="dos")
            rec["mbr_view_sfdisk_json"] = jd
            dump = open(meta["hybrid"]["dump"]).read().replace(img, name)
            rec["mbr_view_sfdisk_dump"] = dump
            rec["mbr_view_source"] = "sfdisk -J -Y dos / sfdisk -d -Y dos (the nested MBR of a GPT disk)"
            mparts = []
            for p in jd["partitiontable"]["partitions"]:
                num = int(re.search(r"(\d+)$", p["node"]).group(1))
                start, size = p["start"] * ss, p["size"] * ss
                tags = blkid(img, start, size)
                mparts.append({"number": num, "start": start, "size": size, "type": "%02x" % int(p["type"], 16),
                               "filesystem": tags.get("TYPE"), "sha256": sha256_range(img, start, size)})
            rec["mbr_partitions"] = mparts
            rec["hybrid_of"] = meta["hybrid"]["of"]
            rec["hybrid_command"] = meta["hybrid"]["command"]
    else:
        rec["sfdisk_json"] = None
        rc = subprocess.run(["sfdisk", "-J", img], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        rec["sfdisk_json_note"] = "sfdisk -J exits %d: %s" % (rc.returncode, rc.stderr.decode().strip().replace(img, name))
        rec["partitions"] = []
        t = rec["blkid_disk"].get("TYPE")
        if t != meta["filesystem"]:
            raise SystemExit("%s: made %s, blkid says %s" % (name, meta["filesystem"], t))
        rec["filesystem"] = t
        n, src, extra = fs_size(t, img)
        rec["fs_size"], rec["fs_size_source"], rec["fs_facts"] = n, src, extra
        rec["tree"] = meta.get("tree")
    json.dump(rec, open(out_path, "w"), indent=1, ensure_ascii=False)

def cmd_finish(recdir, outdir, tools_path, names):
    manifest = {"_about": json.load(open(tools_path))}
    for n in names:
        rec = json.load(open(os.path.join(recdir, n + ".json")))
        gz = os.path.join(outdir, n + ".gz")
        rec["file"] = {"name": n + ".gz", "bytes": os.path.getsize(gz), "sha256": sha256_range(gz),
                       "compression": "gzip -9n"}
        manifest[n] = rec
    with open(os.path.join(outdir, "expected.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")

if __name__ == "__main__":
    if sys.argv[1] == "image":
        cmd_image(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] or None, "/sys/block",
                  sys.argv[6], sys.argv[7])
    elif sys.argv[1] == "finish":
        cmd_finish(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:])
PYEOF
export WORK LUKS_PASSPHRASE

# ---- what was made (the manifest's "made_with" / expected filesystem) -------
FULL='"tree": "full"'
SMALL='"tree": "small"'
MKSWAP_MBR=$(python3 -c 'import json,sys; print(json.dumps(open(sys.argv[1]).read().strip()))' "$REC/mbr.6.mkswap.txt")
MKSWAP_GPT=$(python3 -c 'import json,sys; print(json.dumps(open(sys.argv[1]).read().strip()))' "$REC/gpt.3.mkswap.txt")
EXT_E="-E hash_seed=$HASH_SEED,nodiscard -d TREE, E2FSPROGS_FAKE_TIME=$EPOCH, then debugfs sif ctime/atime"
cat > "$WORK/mbr.meta" <<EOF
{"label": "dos", "made_with": "truncate -s 32M; sfdisk --no-reread --no-tell-kernel mbr.img < script (see README); losetup + partx -a; mkfs on each partition node",
 "parts": {
  "1": {"filesystem": "ext4", "made_with": "mkfs.ext4 -q -F -L mbr-ext4 -U 5eed0101-0000-4000-8000-0000000000e4 $EXT_E", $FULL},
  "2": {"filesystem": null, "made_with": "extended partition (type 05), EBR chain written by sfdisk"},
  "3": {"filesystem": null, "made_with": "primary, type 83, left empty (all zero bytes)"},
  "5": {"filesystem": "vfat", "made_with": "mkfs.vfat --invariant -i 5EED0105 -n MBRFAT16 -F 16 -s 2; mmd + mcopy -m in sorted order, SOURCE_DATE_EPOCH=$EPOCH", $FULL},
  "6": {"filesystem": "swap", "made_with": "mkswap -U 5eed0106-0000-4000-8000-000000000005 -L mbr-swap", "mkswap_said": $MKSWAP_MBR},
  "7": {"filesystem": "ext2", "made_with": "mkfs.ext2 -q -F -L mbr-ext2 -U 5eed0107-0000-4000-8000-0000000000e2 -b 1024 $EXT_E", $SMALL}
 }}
EOF
cat > "$WORK/gpt.meta" <<EOF
{"label": "gpt", "made_with": "truncate -s 64M; sfdisk --no-reread --no-tell-kernel gpt.img < script (see README); losetup + partx -a; mkfs on each partition node",
 "parts": {
  "1": {"filesystem": "vfat", "made_with": "mkfs.vfat --invariant -i 5EED0201 -n ESP -F 32 -s 1; mmd + mcopy -m in sorted order", $SMALL},
  "2": {"filesystem": "ext4", "made_with": "mkfs.ext4 -q -F -L gpt-ext4 -U 5eed0202-0000-4000-8000-0000000000e4 -b 4096 -O ^has_journal $EXT_E", $SMALL},
  "3": {"filesystem": "swap", "made_with": "mkswap -U 5eed0203-0000-4000-8000-000000000005 -L gpt-swap", "mkswap_said": $MKSWAP_GPT},
  "4": {"filesystem": "crypto_LUKS", "reproducible": false, "made_with": "cryptsetup luksFormat --batch-mode --type luks2 --key-size 256 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 --hash sha256 --uuid 5eed0204-0000-4000-8000-0000000000c5 --label gpt-luks --luks2-metadata-size 16k --luks2-keyslots-size 128k --key-file KEY (passphrase '$LUKS_PASSPHRASE', no newline); data segment never written (zeros)"},
  "5": {"filesystem": "exfat", "made_with": "mkfs.exfat -L GPTEXFAT; tune.exfat -I 0x5EED0205; files via mount.exfat-fuse (clock shim at $EPOCH), mkdir/cp in sorted order + touch", $FULL}
 }}
EOF
cat > "$WORK/gpt4k.meta" <<EOF
{"label": "gpt", "made_with": "truncate -s 32M; losetup -b 4096; sfdisk --no-reread --no-tell-kernel /dev/loopN < script (see README); partx -a; mkfs on each partition node",
 "parts": {
  "1": {"filesystem": "ext4", "made_with": "mkfs.ext4 -q -F -L gpt4k-ext4 -U 5eed0301-0000-4000-8000-0000000000e4 -b 4096 $EXT_E (journal of 1024 blocks)", $SMALL},
  "2": {"filesystem": "vfat", "made_with": "mkfs.vfat --invariant -i 5EED0302 -n FAT16-4K -F 16 -s 1 on a 4096-byte-sector device; mmd + mcopy -m in sorted order", $FULL}
 }}
EOF
python3 - "$WORK/gpt.meta" "$WORK/hybrid.meta" "$REC/hybrid.mbr-dump.txt" <<'PYEOF'
import json, sys
m = json.load(open(sys.argv[1]))
m["made_with"] = "cp gpt.img hybrid.img; sgdisk -h 1:2:5 hybrid.img (only sector 0 changes)"
m["hybrid"] = {"of": "gpt.img", "command": "sgdisk -h 1:2:5 hybrid.img", "dump": sys.argv[3]}
json.dump(m, open(sys.argv[2], "w"))
PYEOF
cat > "$WORK/fsonly.meta" <<EOF
{"label": null, "filesystem": "ext4", "made_with": "truncate -s 8M; mkfs.ext4 -q -F -L fsonly-ext4 -U 5eed0501-0000-4000-8000-0000000000e4 $EXT_E", $SMALL}
EOF
cat > "$WORK/iso.meta" <<EOF
{"label": null, "filesystem": "iso9660", "made_with": "SOURCE_DATE_EPOCH=$EPOCH xorriso -as mkisofs -o iso.img -V VIMAGE_ISO -J -R TREE", $SMALL}
EOF

# ---- verification: attach each final image read-only, check trees, facts -----
verify_ext() {  # verify_ext NODE
    local m=$WORK/mnt/v
    mkdir -p "$m"
    local opts=ro
    [ "$(blkid -p -o value -s TYPE "$1")" = ext2 ] || opts=ro,noload    # ext2 driver: no noload
    mount -o "$opts" "$1" "$m"; MOUNTS+=("$m")
    diff -r -x lost+found "$SRC" "$m" >"$LOG/diff.out" 2>&1 || { cat "$LOG/diff.out" >&2; echo "tree differs: $1" >&2; exit 1; }
    untrack_umount "$m"
}
verify_fat() {  # verify_fat NODE (no vfat in this kernel: extract with mtools)
    local x=$WORK/mnt/x
    rm -rf "$x"; mkdir -p "$x"
    mcopy -s -n -i "$1" '::/*' "$x/" 2>>"$LOG/mtools.err"
    diff -r "$SRC" "$x" >"$LOG/diff.out" 2>&1 || { cat "$LOG/diff.out" >&2; echo "tree differs: $1" >&2; exit 1; }
    rm -rf "$x"
}
verify_exfat() {
    local m=$WORK/mnt/vx
    fuse_exfat_mount "$1" "$m" ro
    diff -r "$SRC" "$m" >"$LOG/diff.out" 2>&1 || { cat "$LOG/diff.out" >&2; echo "tree differs: $1" >&2; exit 1; }
    fuse_umount "$m"
}
verify_iso() {
    local x=$WORK/mnt/iso
    rm -rf "$x"
    run_logged xorriso-extract xorriso -osirrox on -indev "$1" -extract / "$x"
    chmod -R u+w "$x"
    diff -r "$SRC" "$x" >"$LOG/diff.out" 2>&1 || { cat "$LOG/diff.out" >&2; echo "tree differs: $1" >&2; exit 1; }
    rm -rf "$x"
}

facts() {   # facts NAME SECTOR_SIZE [DEV]
    python3 "$WORK/facts.py" image "$1" "$IMG/$1" "$2" "${3:-}" "$WORK/${1%.img}.meta" "$REC/$1.json"
}
for name in mbr.img gpt.img gpt4k.img hybrid.img; do
    ss=512; [ "$name" = gpt4k.img ] && ss=4096
    attach "$IMG/$name" "$ss" ro
    add_parts "$DEV"
    case $name in
        mbr.img)    tree full; verify_ext "${DEV}p1"; verify_fat "${DEV}p5"; tree small; verify_ext "${DEV}p7" ;;
        gpt.img|hybrid.img) tree small; verify_fat "${DEV}p1"; verify_ext "${DEV}p2"; tree full; verify_exfat "${DEV}p5" ;;
        gpt4k.img)  tree small; verify_ext "${DEV}p1"; tree full; verify_fat "${DEV}p2" ;;
    esac
    facts "$name" "$ss" "$DEV"
    detach "$DEV"
done
tree small
attach "$FSONLY" 512 ro; verify_ext "$DEV"; detach "$DEV"
facts fsonly.img 512
verify_iso "$ISO"
facts iso.img 2048

# hybrid.img = gpt.img except sector 0
cmp -s <(tail -c +513 "$GPT") <(tail -c +513 "$HYB") || { echo "sgdisk -h changed more than the MBR" >&2; exit 1; }

# ---- compress + manifest ------------------------------------------------------
say "compressing"
NAMES=(mbr.img gpt.img gpt4k.img hybrid.img fsonly.img iso.img)
for name in "${NAMES[@]}"; do
    gzip -9n -c "$IMG/$name" > "$OUT/$name.gz"
done
first_line() { printf '%s\n' "$2" | grep -a -E "$1" | sed -n '1{s/[[:space:]]*$//;p}'; }
python3 - "$WORK/tools.json" \
    sfdisk "$(sfdisk --version)" \
    sgdisk "$(first_line 'GPT fdisk' "$(sgdisk --version 2>&1)")" \
    blkid "$(blkid --version)" \
    mke2fs "$(first_line '^mke2fs' "$(mke2fs -V 2>&1)")" \
    mkfs.fat "$(first_line '^mkfs.fat' "$(mkfs.vfat --help 2>&1 || true)")" \
    mtools "$(first_line 'mtools' "$(mcopy --version 2>&1)")" \
    mkswap "$(mkswap --version)" \
    exfatprogs "$(first_line 'exfatprogs' "$(mkfs.exfat -V 2>&1 || true)")" \
    exfat-fuse "$(first_line 'FUSE exfat' "$(mount.exfat-fuse -V 2>&1 || true)")" \
    cryptsetup "$(cryptsetup --version)" \
    xorriso "$(first_line '^xorriso' "$(xorriso -version 2>&1)")" \
    gzip "$(first_line '^gzip' "$(gzip --version)")" <<'PYEOF'
import json, sys
args = sys.argv[2:]
tools = dict(zip(args[0::2], args[1::2]))
about = {"made_by": "testdata/make-rawdisk.sh", "tools": tools,
 "keys": "per image: size/sha256 of the uncompressed disk, sector_size, label (dos/gpt/null), sfdisk_json (sfdisk -J, names normalised), "
         "partitions: number (libblkid/kernel numbering, logical from 5), start/size in bytes, type (dos: 2 hex digits; gpt: type GUID upper case), "
         "name (GPT name or null), filesystem (blkid -p TYPE or null), fs_size (bytes, see fs_size_source), sha256 of the partition's bytes; "
         "file = the stored .gz",
 "trees": {"full": "python3 testdata/mktree.py DIR (all times 2024-01-02 03:04:05 UTC)",
           "small": "the full tree minus text/, bin/ and nested/a/b/sibling.bin"},
 "not_reproducible": "gpt.img and hybrid.img sha256 and their partition 4 (LUKS2: random salts and key); everything else is byte-for-byte reproducible"}
json.dump(about, open(sys.argv[1], "w"))
PYEOF
python3 "$WORK/facts.py" finish "$REC" "$OUT" "$WORK/tools.json" "${NAMES[@]}"
ls -l "$OUT" >&2
say "done in $(( $(date +%s) - T0 )) s"
