#!/usr/bin/env bash
# The GPU check in one command (see benchmarks/gpu/README.md):
#   benchmarks/gpu/run.sh            on a GPU machine: tests marked gpu, then the scoring and fine-tuning benchmarks
#                                    on CUDA (U-Net, CPSAM full/head in float32 and bfloat16, CPnet), written to
#                                    benchmarks/results/gpu.json (and copied to $OUT when set)
#   benchmarks/gpu/run.sh --cpu      the same script in a small setting on the CPU (reduced networks, few patches),
#                                    so CI keeps it working; writes to a temporary file unless --out is given
# Wheels carried in .whl/ (benchmarks/gpu/fetch_wheels.sh) are installed into a folder first; .whl/cellpose3/
# holds Cellpose 3, installed apart (the CPnet part runs in its own process). Without .whl/, the Python at hand
# ($PYTHON, default python3) must already have them; $PYTHON_CP3 may name a Python with cellpose<4 for CPnet.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
MODE=gpu
OUT_JSON=""
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) MODE=cpu ;;
        --out) OUT_JSON=$2; shift ;;
        *) echo "usage: $0 [--cpu] [--out results.json]" >&2; exit 2 ;;
    esac
    shift
done
PYTHON=${PYTHON:-python3}
PYTHON_CP3=${PYTHON_CP3:-}
SITE=${BIOADAPT_SITE:-/tmp/bioadapt-site}
STARTED=$(date +%s)
# time limits (s) of the steps: tests, tests under Cellpose 3, benchmarks, CPnet benchmark; on the GPU machine
# they keep the whole check under 10 minutes (one call of the device tool), on a shared CPU they only catch hangs
if [ "$MODE" = gpu ]; then
    DEVICE=cuda; SMALL=""; OUT_JSON=${OUT_JSON:-benchmarks/results/gpu.json}; LIMITS=(120 60 270 90)
else
    DEVICE=cpu; SMALL="--small"; OUT_JSON=${OUT_JSON:-$(mktemp -d)/gpu_cpu_check.json}; LIMITS=(900 600 2400 1200)
fi
rm -f "$OUT_JSON"

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || { echo "installing the carried wheels failed" >&2; exit 1; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
CP3_PATH=""
if compgen -G ".whl/cellpose3/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE-cp3" \
        .whl/cellpose3/*.whl || { echo "installing Cellpose 3 failed" >&2; exit 1; }
    CP3_PATH="$SITE-cp3"
    PYTHON_CP3=${PYTHON_CP3:-$PYTHON}
fi
# bioadapt runs from this tree (not installed); the tests import their helpers from tests/
export PYTHONPATH="$ROOT:$ROOT/benchmarks:$ROOT/tests${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
RESULTS_DIR=$(dirname "$OUT_JSON")
mkdir -p "$RESULTS_DIR"
status=0

echo "== tests marked gpu ($DEVICE; they skip without CUDA)"
timeout ${LIMITS[0]} "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests/test_adapters_cellpose.py tests/test_gpu.py \
    --junitxml "$RESULTS_DIR/gpu_tests.xml" || status=$?
[ $status -eq 5 ] && status=0  # nothing selected is not a failure
tests_status=$status
if [ -n "$PYTHON_CP3" ]; then
    echo "== tests marked gpu under Cellpose 3"
    PYTHONPATH="${CP3_PATH:+$CP3_PATH:}$PYTHONPATH" timeout ${LIMITS[1]} "$PYTHON_CP3" -m pytest -q -p no:cacheprovider \
        -m gpu tests/test_adapters_cellpose.py || { rc=$?; [ $rc -eq 5 ] || tests_status=$rc; }
fi

echo "== benchmarks ($DEVICE)"
timeout ${LIMITS[2]} "$PYTHON" benchmarks/gpu/bench_gpu.py --device "$DEVICE" $SMALL --models unet,cpsam --out "$OUT_JSON" \
    || status=1
if [ -n "$PYTHON_CP3" ]; then
    PYTHONPATH="${CP3_PATH:+$CP3_PATH:}$PYTHONPATH" timeout ${LIMITS[3]} "$PYTHON_CP3" benchmarks/gpu/bench_gpu.py \
        --device "$DEVICE" $SMALL --models cpnet --out "$OUT_JSON" || status=1
else
    echo "(CPnet skipped: no Cellpose 3 here; carry .whl/cellpose3 or set PYTHON_CP3)"
fi
"$PYTHON" - "$OUT_JSON" "$tests_status" "$(( $(date +%s) - STARTED ))" <<'EOF'
import json, sys
path, tests, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
report = json.load(open(path)) if __import__("os").path.exists(path) else {"models": {}}
report["gpu_tests_exit_code"], report["seconds_total"] = tests, seconds
json.dump(report, open(path, "w"), indent=2)
print(f"written to {path} ({seconds} s in all)")
EOF
[ -n "${OUT:-}" ] && cp "$OUT_JSON" "$RESULTS_DIR/gpu_tests.xml" "$OUT/" 2>/dev/null
[ $tests_status -ne 0 ] && status=$tests_status
exit $status
