#!/usr/bin/env bash
# The wheels a bare GPU machine lacks for benchmarks/gpu_suite.sh, into .whl/ (run here, with PyPI).
#
# That machine has torch, transformers, pyarrow, numpy, pyyaml, tqdm and matplotlib, and no network.
# The suite needs besides: fsspec (the prior cache module) and pytest with its two dependencies. All are
# pure-Python wheels, pinned to the versions in requirements.lock.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
pins=()
for name in fsspec pytest pluggy iniconfig packaging; do
  pin=$(grep -E "^${name}==" requirements.lock) || { echo "error: $name is not pinned in requirements.lock" >&2; exit 2; }
  pins+=("$pin")
done
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${pins[@]}"
# The hard-label anchors of the loss benchmark (issue 23): pure-Python + Triton wheels, not in the lock
# (the CPU install never needs them), pinned here.
"$PY" -m pip download -q --no-deps --only-binary=:all: -d .whl liger-kernel==0.8.5 cut-cross-entropy==25.1.1
ls -1 .whl
