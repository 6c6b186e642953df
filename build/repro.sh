#!/bin/sh
# Reproducibility check: build the committed tree (HEAD, exported without .git) twice from
# clean and compare the sha256 of the two binaries. Uncommitted work never enters the check.
# Usage: build/repro.sh PYTHON   (run from the repository root; make binary-repro)
set -eu

root=$(pwd)
py=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
work="$root/build/work/repro"
SOURCE_DATE_EPOCH=$(git log -1 --format=%ct)
CT_BUILD_COMMIT=$(git rev-parse --short=12 HEAD)
export SOURCE_DATE_EPOCH CT_BUILD_COMMIT

for i in 1 2; do
    rm -rf "$work/src"
    mkdir -p "$work/src"
    git archive HEAD | tar -x -C "$work/src"
    (cd "$work/src" && sh build/binary.sh "$py" >/dev/null)
    sha256sum "$work/src/dist/ct-appliance" | cut -d' ' -f1 > "$work/sha256.$i"
    echo "build $i of $CT_BUILD_COMMIT: $(cat "$work/sha256.$i")"
done
rm -rf "$work/src"
if cmp -s "$work/sha256.1" "$work/sha256.2"; then
    echo "reproducible: two clean builds gave the same sha256"
else
    echo "NOT reproducible: the two builds differ" >&2
    exit 1
fi
