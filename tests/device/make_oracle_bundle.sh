#!/usr/bin/env bash
# Build .whl/oracle.tar.xz: the official Mamba-3 oracle for the GPU device (python 3.12, x86-64, no internet).
# Run HERE (needs pip and a package index; the CPU torch installed, for the sdist's metadata step). Contents, in site-packages layout (what `pip install --target` gives):
#   - the python package `mamba_ssm` from the mamba-ssm 2.3.2.post1 sdist (its CUDA extension is not built;
#     tests import its submodules through a stand-in package, see tests/oracle.py)
#   - the unpacked wheels of its MIMO dependencies: tilelang 0.1.8, apache-tvm-ffi 0.1.9, z3-solver 4.15.4.0
#     (tilelang 0.1.8 needs >=4.13,<4.15.5), torch-c-dlpack-ext 0.1.5.
# Not included: nvidia-cutlass-dsl + quack-kernels (the CuTe decode `step`): the cutlass DSL libs wheel alone is
# ~87 MiB zipped, beyond the 64 MiB a device call may carry; the decode oracle uses prefill states instead.
# Wheels are zips; unpacked and re-packed with xz they shrink from ~76 MB to well under the limit. Dropped to
# save room: tilelang's AMD composable_kernel headers (ROCm only; tilelang only logs a warning) and z3's
# command-line binary (the z3_solver-*.data/ scripts; tilelang needs only libz3.so).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT_FILE="${1:-$ROOT/.whl/oracle.tar.xz}"
MAMBA_SDIST_SHA256="104cc47e9101e5401a675fa2b784f2952b9b037f3b1dd83b5ac544394e95d028"
WHEELS=(tilelang==0.1.8 apache-tvm-ffi==0.1.9 z3-solver==4.15.4.0 torch-c-dlpack-ext==0.1.5)

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$TMP/whl" "$TMP/site" "$(dirname "$OUT_FILE")"

PLAT=()
for n in 17 24 27 28 31 34 35; do PLAT+=(--platform "manylinux_2_${n}_x86_64"); done
PLAT+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLAT[@]}" -d "$TMP/whl" "${WHEELS[@]}"

# Unpack each wheel; a wheel's <name>.data/{purelib,platlib} belong in site-packages, its scripts/headers/data
# are not needed.
for w in "$TMP"/whl/*.whl; do
    python3 -m zipfile -e "$w" "$TMP/site"
done
for d in "$TMP"/site/*.data; do
    [ -d "$d" ] || continue
    for sub in purelib platlib; do
        if [ -d "$d/$sub" ]; then cp -a "$d/$sub/." "$TMP/site/"; fi
    done
    rm -rf "$d"
done
rm -rf "$TMP/site/tilelang/3rdparty/composable_kernel"
# zip extraction loses the executable bit; shared libraries do not need it, but keep them as wheels install them
find "$TMP/site" -name '*.so*' -type f -exec chmod 755 {} +
# libz3.so and libz3.so.4.15 are two copies of one file: keep one, link the other
if cmp -s "$TMP/site/z3/lib/libz3.so" "$TMP/site/z3/lib/libz3.so.4.15" 2>/dev/null; then
    ln -sf libz3.so.4.15 "$TMP/site/z3/lib/libz3.so"
fi

# mamba_ssm python files from the sdist, fetched by pip from the configured index (setup.py would try to build the CUDA
# extension: skipped, and --no-build-isolation uses this machine's torch for the metadata step; we need none of it)
MAMBA_SKIP_CUDA_BUILD=TRUE python3 -m pip download -q --no-deps --no-binary mamba-ssm --no-build-isolation \
    -d "$TMP/sdist" mamba-ssm==2.3.2.post1
echo "$MAMBA_SDIST_SHA256  $TMP/sdist/mamba_ssm-2.3.2.post1.tar.gz" | sha256sum -c --quiet
tar -xzf "$TMP/sdist/mamba_ssm-2.3.2.post1.tar.gz" -C "$TMP"
cp -a "$TMP/mamba_ssm-2.3.2.post1/mamba_ssm" "$TMP/site/mamba_ssm"
find "$TMP/site" -name '__pycache__' -type d -prune -exec rm -rf {} +

{
    echo "mamba-ssm 2.3.2.post1 (sdist python files; CUDA extension not built)"
    for w in "$TMP"/whl/*.whl; do basename "$w"; done
} > "$TMP/site/ORACLE_BUNDLE.txt"

echo "unpacked: $(du -sh "$TMP/site" | cut -f1)"
tar -C "$TMP/site" -cf - . | xz -T0 -9e > "$OUT_FILE.tmp"
mv "$OUT_FILE.tmp" "$OUT_FILE"
echo "wrote $OUT_FILE: $(du -h "$OUT_FILE" | cut -f1) ($(stat -c %s "$OUT_FILE") bytes)"
