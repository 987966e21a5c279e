#!/usr/bin/env bash
# Create (or reuse) .venv-specforge: CPU torch + SpecForge 0.2.0 for the SpecForge benchmarks
# (bench_train_step.py, bench_parity_specforge.py). Recipe measured in the shared notes
# (specforge-cpu.md): CPU torch first, SpecForge itself with --no-deps (its declared
# dependencies pull CUDA builds), then what it imports for the EAGLE-3 training objects, under a
# constraint pinning the CPU torch. gcc is needed at run time (it uses torch.compile).
#
# Cache-friendly like tests/sglang_lane/setup.sh: a stamp records a digest of this script; a
# second run with the same script returns at once. Prints the venv's python on the last line.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SPECFORGE_VENV:-.venv-specforge}
PY=${PY:-python3}
STAMP="$VENV/.specforge-stamp"
digest=$(sha256sum benchmarks/specforge_setup.sh | cut -d' ' -f1)

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$digest" ]]; then
  echo "$VENV/bin/python"
  exit 0
fi
start=$(date +%s)
echo "specforge venv: setting up $VENV (first run takes a few minutes)" >&2
test -d "$VENV" || "$PY" -m venv "$VENV"
BIN="$VENV/bin"
PIP=("$BIN/python" -m pip install --quiet --disable-pip-version-check)
CONSTRAINTS="$VENV/constraints.txt"
printf 'torch==2.13.0\ntransformers==5.8.1\n' >"$CONSTRAINTS"
"${PIP[@]}" "torch==2.13.0" >&2
"${PIP[@]}" --no-deps "specforge==0.2.0" >&2
"${PIP[@]}" -c "$CONSTRAINTS" transformers==5.8.1 safetensors huggingface-hub triton pyyaml pydantic psutil numpy >&2
"$BIN/python" - >&2 <<'PYEOF'
import torch
assert not torch.version.cuda, f"expected a CPU torch build, got CUDA {torch.version.cuda}"
from importlib.metadata import version
print("specforge venv: torch", torch.__version__, "specforge", version("specforge"))
PYEOF
echo "$digest" >"$STAMP"
echo "specforge venv: setup took $(( $(date +%s) - start ))s" >&2
echo "$VENV/bin/python"
