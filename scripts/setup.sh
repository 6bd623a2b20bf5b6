#!/usr/bin/env bash
# README command 1: on a fresh Debian 12 machine, install every apt package, configure, build,
# and run the main job. Idempotent: a second run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
voken_install_packages
voken_build

# Main job. Until the MiniGPT-5 pipeline exists, a smoke run of what does: build facts, the
# Python module, and every checkpoint of the golden folder read through the C++ loader.
echo "== voken info"
"$VOKEN_BUILD_DIR/voken" info
PYTHONPATH="$VOKEN_BUILD_DIR/python" "$VOKEN_PYTHON" -c \
  "import voken; print('python: import voken', voken.__version__, '(libtorch', voken.build_info()['torch_version'] + ')')"
golden=${VOKEN_GOLDEN_DIR:-../shared/golden}
if [ -d "$golden" ]; then
  find "$golden" -path '*/model/*' \( -name '*.pth' -o -name '*.ckpt' -o -name '*.safetensors' \) | sort |
    while read -r checkpoint; do
      echo "== voken inspect $checkpoint"
      "$VOKEN_BUILD_DIR/voken" inspect "$checkpoint" | tail -n 3
    done
else
  echo "(no golden folder at $golden: skipping the checkpoint smoke run)"
fi
