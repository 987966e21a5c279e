#!/usr/bin/env bash
# Run the SGLang CPU lane (args: pytest args; default the whole lane): set up (or reuse) .venv-sglang, then its pytest, then print wall time.
# Exits non-zero if the lane cannot be set up or any test fails; it never skips to green.
set -euo pipefail
cd "$(dirname "$0")/../.."
start=$(date +%s)
bash tests/sglang_lane/setup.sh
VENV=${SGLANG_LANE_VENV:-.venv-sglang}

# Stand-ins first on the path (tests/sglang_lane/stubs/README.md says why), then the repo.
export PYTHONPATH="$PWD/tests/sglang_lane/stubs:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export SGLANG_USE_CPU_ENGINE=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

# Without a test path pytest would run the whole suite (pyproject testpaths) in this venv.
has_path=0
for a in "$@"; do [[ "$a" == tests/* ]] && has_path=1; done
[[ $has_path -eq 1 ]] || set -- "$@" tests/sglang_lane
set +e
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -p no:warnings "$@"
rc=$?
set -e
echo "sglang lane: wall time $(( $(date +%s) - start ))s (exit $rc)"
exit $rc
