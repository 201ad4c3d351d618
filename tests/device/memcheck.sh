#!/usr/bin/env bash
# GPU tests under compute-sanitizer memcheck: every out-of-range global, shared or local access of every kernel, also
# those that do not fault (an access that lands in mapped memory reads garbage silently; which ones fault depends on
# what else is allocated). Needs a CUDA machine with compute-sanitizer (the device has /usr/local/cuda/bin).
#   bash tests/device/memcheck.sh                                   # tests/test_triton_gpu.py
#   bash tests/device/memcheck.sh "tests/test_triton_gpu.py::test_forward_and_gradients_vs_chunked[300-4-1-64-32-False-True-True-True-64]"
# Prints, per kernel and source line, how many accesses were out of range, then the error summary and pytest's
# result line; the full log goes to $OUT/memcheck.log. Exit status: pytest's, or 3 when memcheck found errors.
# Kernels run ~10-100x slower under it: keep the selection small (one grid case takes ~25 s on an H200).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
CS="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
[ -x "$CS" ] || { echo "memcheck: compute-sanitizer not found" >&2; exit 2; }
[ $# -gt 0 ] || set -- tests/test_triton_gpu.py
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -3
"$CS" --tool memcheck --print-limit 10000 python3 -m pytest -q -m gpu -p no:cacheprovider "$@" >"$OUT/memcheck.log" 2>&1
rc=$?
# "=========     at _bwd_dq_kernel+0x4bd0 in triton_backward.py:211" -> one line per kernel and source line
grep -E "^=========     at " "$OUT/memcheck.log" | sed -E 's/\+0x[0-9a-f]+//; s/^=+ +at //' | sort | uniq -c | sort -rn
grep -E "^========= (ERROR SUMMARY|Invalid|Out-of-range)" "$OUT/memcheck.log" | sort | uniq -c
grep -E "(passed|failed|error)( |,).* in [0-9.]+s" "$OUT/memcheck.log" | tail -1
if grep -qE "^========= ERROR SUMMARY: [1-9]" "$OUT/memcheck.log"; then exit 3; fi
exit "$rc"
