#!/usr/bin/env bash
# README command 2: the whole test suite (ctest, then pytest with Debian's python3), building
# first if needed. Goldens come from $VOKEN_GOLDEN_DIR (default ../shared/golden); tests that need
# them skip with a message when absent. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
voken_install_packages
voken_build
status=0
ctest --test-dir "$VOKEN_BUILD_DIR" --output-on-failure -j2 -LE python || status=1
PYTHONPATH="$VOKEN_BUILD_DIR/python" "$VOKEN_PYTHON" -m pytest -q -p no:cacheprovider tests/python || status=1
exit $status
