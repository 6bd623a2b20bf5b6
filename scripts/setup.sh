#!/usr/bin/env bash
# README command 1: on a fresh Debian 12 machine, install every apt package, configure, build,
# and run the main job. Idempotent: a second run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
voken_install_packages
voken_build

# Main job: MiniGPT-5 end to end. With a real bundle (VOKEN_BUNDLE=path/to/bundle.json, see
# docs/bundle.md) one story is generated from it; otherwise `voken demo` writes a tiny bundle with
# random weights in the real file formats and runs the same pipeline on it (labelled as such).
# OpenBLAS (libtorch's fp32 BLAS) picks AVX2 kernels on CPU models it does not know, e.g. in VMs;
# ask for its AVX-512 ones where the CPU has them (README, "fp32 GEMM and OpenBLAS").
if [ -z "${OPENBLAS_CORETYPE:-}" ] && grep -qw avx512f /proc/cpuinfo && grep -qw avx512bw /proc/cpuinfo &&
  grep -qw avx512dq /proc/cpuinfo && grep -qw avx512vl /proc/cpuinfo && grep -qw avx512cd /proc/cpuinfo; then
  export OPENBLAS_CORETYPE=SkylakeX
fi
echo "== voken info"
"$VOKEN_BUILD_DIR/voken" info
PYTHONPATH="$VOKEN_BUILD_DIR/python" "$VOKEN_PYTHON" -c \
  "import voken; print('python: import voken', voken.__version__, '(libtorch', voken.build_info()['torch_version'] + ')')"
out="$VOKEN_BUILD_DIR/demo"
if [ -n "${VOKEN_BUNDLE:-}" ]; then
  echo "== voken generate --bundle $VOKEN_BUNDLE"
  "$VOKEN_BUILD_DIR/voken" generate --bundle "$VOKEN_BUNDLE" --text "Tell me a short story about a cat and show it." \
    --force-image --out "$out/story.html"
  echo "open $out/story.html (or $out/story.md)"
else
  echo "== voken demo (tiny bundle, random weights)"
  "$VOKEN_BUILD_DIR/voken" demo --dir "$out/bundle" --out "$out/demo.html"
  echo "== voken inspect $out/bundle"
  "$VOKEN_BUILD_DIR/voken" inspect "$out/bundle" | tail -n 12
  echo "open $out/demo.html (or $out/demo.md)"
fi
