#!/usr/bin/env bash
# The one command for the device:  bash tests/device/run_gpu_tests.sh [pytest args, e.g. tests/test_oracle_gpu.py -k mimo]
# (device `run` with carry [".whl"]). Installs the oracle bundle if carried, installs this package (editable,
# offline), runs the GPU tests. Log and oracle_report.json go to $OUT (or ./out when OUT is unset).
# HM3_PYTEST_ARGS replaces the default "-x" (e.g. HM3_PYTEST_ARGS="" to run past a failure). With no path given,
# pytest takes testpaths (tests/). pytest gets SIGINT after HM3_TIMEOUT s (default 560, inside the device's
# 600 s), so it still prints its summary; oracle_report.json is rewritten after every figure anyway, and each failure
# goes to failures.log as it happens (a pytest stuck in a native compile ignores SIGINT and is killed).
# Cold-start compile is long (TileLang MIMO kernels, Triton): one call cannot hold it all, so split it, e.g.
#   run_gpu_tests.sh tests/test_oracle_gpu.py -k "mimo and not gradients"     (~270 s on a fresh H200)
#   run_gpu_tests.sh tests/test_oracle_gpu.py -k "mimo and gradients"         (~150 s per config: TileLang backward JIT)
#   run_gpu_tests.sh -k "not mimo"                                            (Triton tests + SISO oracle)
# on the same warm machine (TileLang's ~/.tilelang and Triton's ~/.triton caches stay while it is held).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HM3_REPORT_DIR="$OUT"
rm -f "$OUT/failures.log"  # tests/failure_log.py appends each failure there as it happens
nvidia-smi || true
python3 -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__, 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
if [ -f .whl/oracle.tar.xz ]; then
    t0=$(date +%s)
    source tests/device/install_oracle.sh
    echo "oracle bundle unpacked in $(( $(date +%s) - t0 )) s"
    cat "$HM3_ORACLE_SITE/ORACLE_BUNDLE.txt" 2>/dev/null
else
    echo "no .whl/oracle.tar.xz: oracle tests will skip"
fi
command -v nvcc && nvcc --version | tail -1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -3
TO=(); python3 -c "import pytest_timeout" 2>/dev/null && TO=(--timeout 900)
# the DeepSpeed tests import deepspeed at collection (in CI it must be there); they hold no GPU test
SKIP=(); python3 -c "import deepspeed" 2>/dev/null \
    || SKIP=(--ignore=tests/test_deepspeed.py --ignore=tests/test_sft_deepspeed.py)
timeout -s INT -k 20 "${HM3_TIMEOUT:-560}" \
    python3 -m pytest -m gpu -q ${HM3_PYTEST_ARGS--x} "${TO[@]}" "${SKIP[@]}" -rs "$@" 2>&1 | tee "$OUT/gpu_tests.log"
rc=${PIPESTATUS[0]}
[ -f "$OUT/oracle_report.json" ] && echo "report: $OUT/oracle_report.json"
if [ -f "$OUT/failures.log" ]; then  # kept even when pytest was killed before its summary
    echo "failures: $OUT/failures.log (last 6000 bytes:)"
    tail -c 6000 "$OUT/failures.log"
fi
exit "$rc"
