#!/usr/bin/env bash
# The format interop check (issue 18): converted adapters loaded by the real consumers — llama.cpp through
# llama-cpp-python, mlx-lm on mlx's CPU build, torchtune 0.6.1 — against PEFT's logits for the original adapter.
# Creates (or reuses) a separate venv, installs the `interop` extra and runs tests/test_formats_interop.py.
# llama-cpp-python builds from source (5+ minutes on 2 cores), which is why CI does not run this.
#
#   bash benchmarks/interop.sh                 # venv in ${INTEROP_VENV:-../interop-venv}
#   INTEROP_VENV=/tmp/iv bash benchmarks/interop.sh -k mlx
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${INTEROP_VENV:-../interop-venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
. "$VENV/bin/activate"
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DLLAMA_CURL=OFF}"
pip install -q -e '.[interop,test]'
python - <<'PY'
from importlib.metadata import version
print("consumers:", ", ".join(f"{p} {version(p)}" for p in ("llama_cpp_python", "mlx", "mlx-lm", "torchtune", "gguf", "peft", "transformers", "torch")))
PY
mkdir -p benchmarks/_work
LOG=benchmarks/_work/interop.log
set +e
python -m pytest tests/test_formats_interop.py -p no:cacheprovider -q -rs -s "$@" > "$LOG" 2>&1
rc=$?
set -e
grep -a -E "max \||SKIPPED|FAILED|Error:| passed| failed" "$LOG" || true
echo "full log: $LOG"
exit $rc
