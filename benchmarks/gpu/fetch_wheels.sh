#!/usr/bin/env bash
# Downloads, here (where pip reaches the package index), the wheels listed in benchmarks/gpu/wheels.txt for the GPU
# machine (CPython 3.12, manylinux x86-64), without dependencies, into .whl/ (git-ignored); "cellpose3:" lines go
# to .whl/cellpose3/. Then name .whl in the device tool's carry list (benchmarks/gpu/README.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=${1:-.whl}
rm -rf "$DEST"
mkdir -p "$DEST/cellpose3"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64 linux_x86_64; do
    platforms+=(--platform "$p")
done
grep -v '^\s*#' benchmarks/gpu/wheels.txt | grep -v '^\s*$' | while read -r line; do
    target=$DEST
    if [[ "$line" == cellpose3:* ]]; then target=$DEST/cellpose3; line=${line#cellpose3: }; fi
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d "$target" "$line" 2>&1 | grep -v "is ignored" || true
    ls "$target" | grep -qi "^$(echo "${line%%==*}" | tr '.-' '__')-" \
        || { echo "no Python 3.12 wheel found for $line" >&2; exit 1; }
done
du -sh "$DEST"
