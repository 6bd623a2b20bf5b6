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
# OpenBLAS (libtorch's fp32 BLAS) takes some recent Intel CPUs for a Pentium 4; ask for the kernels
# its own fallback would pick, only on those models (README, "fp32 GEMM and OpenBLAS").
if [ -z "${OPENBLAS_CORETYPE:-}" ]; then
  coretype=$("$VOKEN_PYTHON" python/voken/_openblas.py)
  if [ -n "$coretype" ]; then export OPENBLAS_CORETYPE="$coretype"; fi
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
