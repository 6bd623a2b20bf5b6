# Shared by scripts/setup.sh and scripts/test.sh (sourced, not run).
# Debian 12 packages voken needs to build, test and run. libopenblas0-pthread matters: without
# it libtorch's fp32 GEMM falls back to the reference BLAS (~5 instead of ~240 GFLOP/s here).
VOKEN_APT_PACKAGES=(
  build-essential cmake ninja-build ccache pkg-config git
  libtorch-dev libopenblas0-pthread
  pybind11-dev python3-dev
  libopencv-core-dev libopencv-imgproc-dev libopencv-imgcodecs-dev
  nlohmann-json3-dev zlib1g-dev libgtest-dev libgmock-dev
  python3-torch python3-numpy python3-pytest python3-pil python3-sentencepiece
  python3-nbclient python3-ipykernel
)
VOKEN_BUILD_DIR=${VOKEN_BUILD_DIR:-build}
# ccache keys on paths relative to the checkout, so fresh clones (CI) reuse earlier compilations.
# Without the sloppiness below ccache refuses every compilation that uses a precompiled header,
# i.e. all of voken's (the PCH is rebuilt, and checked, by the build itself).
export CCACHE_BASEDIR="${CCACHE_BASEDIR:-$PWD}"
export CCACHE_SLOPPINESS="${CCACHE_SLOPPINESS:-pch_defines,time_macros,include_file_mtime,include_file_ctime}"
VOKEN_PYTHON=/usr/bin/python3

voken_install_packages() {
  local missing=()
  for package in "${VOKEN_APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    echo "apt packages: all ${#VOKEN_APT_PACKAGES[@]} present"
    return
  fi
  echo "apt packages: installing ${missing[*]}"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
}

voken_build() {
  cmake -S . -B "$VOKEN_BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$VOKEN_PYTHON"
  cmake --build "$VOKEN_BUILD_DIR"
}
