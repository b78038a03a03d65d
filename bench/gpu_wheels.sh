#!/usr/bin/env bash
# Download the wheels listed in bench/gpu_wheels.txt into .whl/ (git-ignored) for the lent GPU machine.
#   bash bench/gpu_wheels.sh            Python 3.12, manylinux x86-64 (the H200 machine)
#   PYVER=3.11 DEST=/tmp/w bash ...     another interpreter version / folder (e.g. to rehearse here)
# Prints the total size: it travels with the working tree, 64 MiB per call in all.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
DEST=${DEST:-.whl}
PY=${PYTHON:-python3}
LIST=bench/gpu_wheels.txt
mkdir -p "$DEST"
binary=$(grep -v -e '^#' -e '^$' -e '^deepspeed==' "$LIST")
$PY -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$DEST" $binary
# DeepSpeed publishes an sdist only: build the pure-Python wheel (ops JIT-compile where needed)
DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps -w "$DEST" "$(grep '^deepspeed==' "$LIST")"
ls -l "$DEST"
du -ch "$DEST"/*.whl | tail -1
