#!/usr/bin/env bash
# manual_restore.sh VOLDIR SESSION OUT CHUNKSIZE
#
# The sparsebak README's (2018-09-09, 6a4e75a) seven-step manual restore for
# the gzip + bucket era (variants C and D of testdata/sparsebak), with the
# corrections of /work/shared/formats/sparsebak-wyng.md section 1:
#   * the S_* session directories are inside the volume directory VOLDIR;
#   * step 4 MOVES the zero-length (zero chunk) files aside, so that they are
#     not renamed to .gz and gunzipped;
#   * the chunks are NOT joined with `cat full/* | dd`: every chunk is written
#     at the byte address in its name (dd seek), so addresses that no session
#     has (growth before 616dd91) stay zeros instead of shifting everything
#     after them; then the image is cut to the session's size (info: volsize,
#     or size in c490aeb), which also drops chunks beyond a shrunk volume's end.
# It works on a COPY of VOLDIR in a temporary directory; VOLDIR is not changed.
#
#   VOLDIR     volume directory holding the S_YYYYmmdd-HHMMSS session folders
#   SESSION    the session to restore: S_YYYYmmdd-HHMMSS or YYYYmmdd-HHMMSS
#              (sessions are taken in name order up to and including it;
#              S_*-tmp folders are ignored)
#   OUT        the image file to write (replaced if it exists)
#   CHUNKSIZE  chunk size in bytes (262144 up to 837e075, else info:chunksize)
#
# Needs: bash, coreutils (cp -l, dd, truncate), findutils, gzip.
set -euo pipefail

if [ $# -ne 4 ]; then
    echo "usage: $0 VOLDIR SESSION OUT CHUNKSIZE" >&2
    exit 2
fi
voldir=$1 session=$2 out=$3 chunksize=$4
case $session in S_*) ;; *) session=S_$session ;; esac
case $chunksize in ''|*[!0-9]*) echo "$0: bad CHUNKSIZE $chunksize" >&2; exit 2 ;; esac
[ -d "$voldir/$session" ] || { echo "$0: no session $session in $voldir" >&2; exit 1; }
out=$(realpath -m -- "$out")

work=$(mktemp -d "${TMPDIR:-/tmp}/manual_restore.XXXXXX")
trap 'rm -rf "$work"' EXIT

# Work on a copy (cp -a keeps the hard links between sessions).
cp -a -- "$voldir" "$work/vol"
cd "$work/vol"

# Sessions up to SESSION, newest first (the names sort by time).
sessions=$(find . -mindepth 1 -maxdepth 1 -type d -name 'S_*' ! -name '*-tmp' \
           -printf '%f\n' | LC_ALL=C sort -r | awk -v s="$session" '$0 <= s')
[ -n "$sessions" ] || { echo "$0: no finished session up to $session" >&2; exit 1; }

# Step 1-3: hard-link the chunk files of every session into full/, newest
# session first; a name already there (from a newer session) is kept.
mkdir full
for s in $sessions; do
    for f in "$s"/*/x* "$s"/*; do
        [ -f "$f" ] || continue
        n=${f##*/}
        [[ $f =~ ^S_[^/]+/[0-9a-f]{9}/x[0-9a-f]{16}$ || $f =~ ^S_[^/]+/[0-9a-f]{16}$ ]] || continue
        n=x${n#x}
        [ -e "full/$n" ] || ln "$f" "full/$n"
    done
done

# Step 4 (corrected): move the zero-length files (zero chunks) aside.
mkdir z
find full -type f -size 0 -exec mv {} z/ \;

# Step 5-6: rename the rest to .gz and decompress them (-f: they are hard
# links of the session files).
find full -type f -name 'x*' -exec mv {} {}.gz \;
if [ -n "$(ls full)" ]; then gunzip -f full/*.gz; fi

# Step 7: a chunk of zeros for every zero-length file.
dd if=/dev/zero of=zero bs="$chunksize" count=1 status=none
for f in z/*; do
    [ -e "$f" ] || continue
    ln -f zero "full/$(basename "$f")"
done

# Size of the volume as of SESSION.
volsize=$(sed -n -E 's/^(volsize|size) = ([0-9]+).*/\2/p' "$session/info" 2>/dev/null | head -n1)

# Step 8 (corrected): every chunk at its address, never `cat` across gaps.
rm -f -- "$out"
: > "$out"
for f in full/x*; do
    [ -e "$f" ] || continue
    addr=$((16#${f##*/x}))
    if [ -n "$volsize" ] && [ "$addr" -ge "$volsize" ]; then
        continue                        # beyond a shrunk volume's end
    fi
    dd if="$f" of="$out" bs="$chunksize" seek=$((addr / chunksize)) conv=notrunc,sparse \
       status=none
done
if [ -n "$volsize" ]; then
    truncate -s "$volsize" "$out"
fi
