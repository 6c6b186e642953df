#!/bin/sh
# Build dist/ct-appliance, a PyInstaller onefile binary, reproducibly:
# SOURCE_DATE_EPOCH is the last commit's time and PYTHONHASHSEED=0, so two clean builds of
# one commit give the same sha256 (`make binary-repro` checks it). A tree with uncommitted
# changes under appliance/ is marked "<commit>-dirty" in `ct-appliance --version`.
# Usage: build/binary.sh PYTHON   (run from the repository root)
set -eu

py=${1:-.venv/bin/python}
root=$(pwd)
work="$root/build/work/pyinstaller"

# Both can be given from outside (build/repro.sh builds an exported tree without .git).
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct)}
PYTHONHASHSEED=0
# Dates, paths and locale must not leak into the bytes.
TZ=UTC
LC_ALL=C.UTF-8
export SOURCE_DATE_EPOCH PYTHONHASHSEED TZ LC_ALL

if [ -n "${CT_BUILD_COMMIT:-}" ]; then
    commit=$CT_BUILD_COMMIT
else
    commit=$(git rev-parse --short=12 HEAD)
    if [ -n "$(git status --porcelain -- appliance build/ct-appliance.py build/ct-appliance.spec)" ]; then
        commit="$commit-dirty"
    fi
fi
build_date=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)

# appliance/version.py reads this module when present; it is gitignored and removed after the
# build, so a development checkout keeps asking git.
buildinfo="$root/appliance/_buildinfo.py"
trap 'rm -f "$buildinfo"' EXIT INT TERM
cat > "$buildinfo" <<PY
"""Written by build/binary.sh for a release build; not under version control."""

COMMIT = "$commit"
BUILD_DATE = "$build_date"
PY

rm -rf "$work" dist/ct-appliance
mkdir -p "$work" dist

"$py" -m PyInstaller --noconfirm --clean --log-level WARN \
    --workpath "$work" --distpath "$root/dist" \
    build/ct-appliance.spec

echo "built dist/ct-appliance ($commit, $build_date):"
ls -l dist/ct-appliance
sha256sum dist/ct-appliance
