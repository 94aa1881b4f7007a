#!/usr/bin/env bash
# Make .venv in the checkout and install meshgate into it (editable), with the
# extras named in $1 (e.g. "test"). Used by quickstart.sh and test.sh.
#
# llama-cpp-python compiles from source the first time (pip caches the wheel).
# Its default build tunes for the build machine (-march=native), which can emit
# instructions the running kernel does not allow: on a Sapphire Rapids VM
# without AMX permission every completion died with SIGILL in `tilezero`. So
# unless CMAKE_ARGS says otherwise, build a portable AVX2 CPU backend.
set -euo pipefail
cd "$(dirname "$0")/.."
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON}"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip >/dev/null
.venv/bin/python -m pip install --quiet -e ".${1:+[$1]}"
