#!/usr/bin/env bash
# Create (or reuse) .venv-sglang: CPU torch + SGLang 0.5.23 + the project's own dependencies.
#
# `pip install sglang` cannot work on a CPU-only machine: the wheel pins a CUDA torch build and
# CUDA-only kernel packages (~3 GB). So, as measured in the shared notes (notes/sglang.md):
#   1. CPU torch first (the same 2.13.0 the main venv uses);
#   2. `sglang` itself with --no-deps;
#   3. the pure-Python packages SGLang imports, under a constraint that pins the CPU torch so
#      nothing can pull a CUDA build;
#   4. a few packages whose own dependency pins would drag in CUDA wheels, with --no-deps.
# The stand-ins for the CUDA-only `sgl_kernel` and for `torchvision` live in
# tests/sglang_lane/stubs/ and are put on PYTHONPATH by run.sh (nothing in site-packages is
# patched). The project itself is not installed: run.sh puts the repo on PYTHONPATH.
#
# Cache-friendly: a stamp records a digest of this script and pyproject.toml; a second run with
# the same inputs returns at once. Exits non-zero (loudly) on any failure.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${SGLANG_LANE_VENV:-.venv-sglang}
PY=${PY:-python3}
STAMP="$VENV/.lane-stamp"
digest=$(cat tests/sglang_lane/setup.sh pyproject.toml | sha256sum | cut -d' ' -f1)

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$digest" ]]; then
  echo "sglang lane: $VENV is up to date"
  exit 0
fi

start=$(date +%s)
echo "sglang lane: setting up $VENV (first run takes a few minutes)"
test -d "$VENV" || "$PY" -m venv "$VENV"
BIN="$VENV/bin"
PIP=("$BIN/python" -m pip install --quiet --disable-pip-version-check)

TORCH_VERSION=2.13.0
SGLANG_VERSION=0.5.23
CONSTRAINTS="$VENV/constraints.txt"
cat >"$CONSTRAINTS" <<EOF
torch==$TORCH_VERSION
transformers==5.19.0
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

"${PIP[@]}" --no-deps "sglang==$SGLANG_VERSION"

# What SGLang imports for the text-only CPU path (measured; notes/sglang.md).
"${PIP[@]}" -c "$CONSTRAINTS" \
  transformers==5.19.0 tokenizers safetensors numpy aiohttp fastapi uvicorn uvloop pyzmq orjson \
  msgspec pydantic psutil requests setproctitle sentencepiece tiktoken interegular \
  partial_json_parser pybase64 python-multipart prometheus-client xxhash zstandard einops pillow \
  openai==2.8.0 packaging tqdm python-dateutil distro blobfile==3.0.0 scipy gguf watchfiles regex \
  triton IPython xgrammar==0.2.7 jsonschema cffi

# Their declared dependencies pull CUDA torch / kernels; what they need at import is above.
"${PIP[@]}" --no-deps dill apache-tvm-ffi==0.1.11 compressed-tensors==0.18.0 loguru soundfile==0.13.1

"$BIN/python" - <<'EOF'
import torch
assert not torch.version.cuda, "a dependency replaced the CPU torch with a CUDA build"
from importlib.metadata import version
print("sglang lane: torch", torch.__version__, "sglang", version("sglang"), "transformers", version("transformers"))
EOF

echo "$digest" >"$STAMP"
echo "sglang lane: setup took $(( $(date +%s) - start ))s"
