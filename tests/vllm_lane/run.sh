#!/usr/bin/env bash
# Run the vLLM CPU lane (args: pytest options and/or test paths; default path: the whole lane): set up (or reuse) .venv-vllm,
# then its pytest, then print wall time. Exits non-zero if the lane cannot be set up or any test
# fails; it never skips to green.
set -euo pipefail
cd "$(dirname "$0")/../.."
start=$(date +%s)
bash tests/vllm_lane/setup.sh
VENV=${VLLM_LANE_VENV:-.venv-vllm}

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# The engine core in this process: one engine per test module, no spawned core process to leak,
# and the tests can read what the draft receives (test_vllm_serves_draft.py).
export VLLM_ENABLE_V1_MULTIPROCESSING=0
# 1 GiB of KV cache (vLLM's CPU default takes most of the machine's memory) and no thread
# pinning on a shared machine.
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
export VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-nobind}
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1

# Without a test path pytest would run the whole suite (pyproject testpaths) in this venv.
has_path=0
for a in "$@"; do [[ "$a" == tests/* ]] && has_path=1; done
[[ $has_path -eq 1 ]] || set -- "$@" tests/vllm_lane
set +e
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -p no:warnings "$@"
rc=$?
set -e
echo "vllm lane: wall time $(( $(date +%s) - start ))s (exit $rc)"
exit $rc
