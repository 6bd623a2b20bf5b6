#!/usr/bin/env bash
# Checks that every src/**/*.cpp compiles for ARM64: each file is compiled with -fsyntax-only by
# Debian's cross compiler (aarch64-linux-gnu-g++, package g++-aarch64-linux-gnu) with the -I,
# -isystem, -D and -std flags CMake gives it (from <build>/compile_commands.json), minus x86-only
# flags. There is no <immintrin.h> or <cpuid.h> on ARM64 and no x86 target attribute, so an
# intrinsic, an x86 header or a VOKEN_TARGET_* function left outside #ifdef VOKEN_X86_KERNELS (or
# VOKEN_HAVE_AMX) fails here. The cross compiler finds libtorch's headers in this machine's
# /usr/include after its own ARM64 C and C++ headers.
#
# Usage: scripts/check_portable.sh [BUILD_DIR]   (default: build; it must have been configured)
# Exit status: 0 when every file compiles, 1 when one does not, 77 (ctest: skipped) when the cross
# compiler is absent. VOKEN_CROSS_CXX names another cross compiler.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=$(cd "${1:-$root/build}" && pwd)
cxx=${VOKEN_CROSS_CXX:-aarch64-linux-gnu-g++}

if ! command -v "$cxx" > /dev/null 2>&1; then
  echo "check_portable: skipped: no $cxx here (apt-get install g++-aarch64-linux-gnu)"
  exit 77
fi
# The check means something only if x86 code cannot compile here.
if echo '#include <immintrin.h>' | "$cxx" -x c++ -fsyntax-only - > /dev/null 2>&1; then
  echo "check_portable: $cxx accepts <immintrin.h>: not an ARM64 compiler" >&2
  exit 2
fi
database=$build/compile_commands.json
if [ ! -f "$database" ]; then
  echo "check_portable: no $database: configure the build first (cmake -S . -B build ...)" >&2
  exit 2
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/voken-check-portable.XXXXXX")
trap 'rm -rf "$work"' EXIT
start=$SECONDS

# One line per source file: "<group> <file>", per group of identical flags a file
# <work>/flags.<group> (one flag a line), and the flags every group has in <work>/flags_common.
# Dropped: the compiler, -o/-c and the source, CMake's precompiled header (-include ... and
# -Winvalid-pch: built for x86-64), -m* (x86 options) and -fPIC/-fpie (code generation only; a
# precompiled header is valid only for one setting of them, and one serves every group here).
/usr/bin/python3 - "$database" "$root/src/" "$work" << 'EOF'
import json, shlex, sys
database, src, work = sys.argv[1:4]
groups, lines = {}, []
for entry in json.load(open(database)):
    path = entry["file"]
    if not path.startswith(src) or not path.endswith(".cpp"):
        continue
    args = entry.get("arguments") or shlex.split(entry["command"])
    flags, skip = [], False
    for i, arg in enumerate(args[1:], 1):
        if skip:
            skip = False
        elif arg in ("-o", "-include"):
            skip = True
        elif arg == "-c" or arg == path or arg == entry["file"] or arg == "-Winvalid-pch":
            pass
        elif arg.startswith("-m") or arg.lower() in ("-fpic", "-fpie"):
            pass
        else:
            flags.append(arg)
    group = groups.setdefault(tuple(flags), len(groups))
    lines.append(f"{group} {path}")
for flags, group in groups.items():
    with open(f"{work}/flags.{group}", "w") as out:
        out.write("\n".join(flags) + "\n")
# -isystem/-I pairs stay pairs: compare whole "flag value" words.
def words(flags):
    out, i = [], 0
    while i < len(flags):
        if flags[i] in ("-isystem", "-I", "-D", "-include") and i + 1 < len(flags):
            out.append((flags[i], flags[i + 1])); i += 2
        else:
            out.append((flags[i],)); i += 1
    return out
common = None
for flags in groups:
    w = words(list(flags))
    common = w if common is None else [x for x in common if x in w]
with open(f"{work}/flags_common", "w") as out:
    out.write("\n".join(part for word in common for part in word) + "\n")
with open(f"{work}/files", "w") as out:
    out.write("\n".join(sorted(set(lines))) + "\n")
EOF

files=$(wc -l < "$work/files")
if [ "$files" -eq 0 ]; then
  echo "check_portable: no src/ files in $database" >&2
  exit 2
fi

# ATen's headers take most of each file's time: one precompiled header, with the flags every group
# shares (the others, e.g. -Dvoken_EXPORTS, are not used by ATen's headers, so it stays valid).
jobs=$(nproc)
echo '#include <ATen/ATen.h>' > "$work/aten.h"
mapfile -t common < "$work/flags_common"
"$cxx" "${common[@]}" -x c++-header "$work/aten.h" -o "$work/aten.h.gch" > "$work/pch.log" 2>&1 ||
  rm -f "$work/aten.h.gch"  # then every file parses ATen itself (slower, same result)

# Compiles one "<group> <file>" line; writes <work>/fail.* with the messages when it fails.
check_one() {
  local group=$1 file=$2 args=() include=()
  local name=${file#"$ROOT"/}
  local log="$WORK/fail.${name//\//_}"
  mapfile -t args < "$WORK/flags.$group"
  [ -f "$WORK/aten.h.gch" ] && include=(-include "$WORK/aten.h")
  if "$CXX" "${args[@]}" "${include[@]}" -fsyntax-only "$file" > "$log" 2>&1; then rm -f "$log"; fi
}
export -f check_one
export WORK=$work CXX=$cxx ROOT=$root
xargs -P "$jobs" -L 1 bash -c 'check_one "$@"' _ < "$work/files"

failed=$(find "$work" -maxdepth 1 -name 'fail.*' | sort)
if [ -n "$failed" ]; then
  for f in $failed; do
    echo "---- ${f##*/fail.}"
    grep -E "error|note: |^In file included" "$f" | head -20
  done
  echo "check_portable: $(echo "$failed" | wc -l) of $files files do not compile for ARM64 ($cxx)"
  exit 1
fi
echo "check_portable: all $files src/ files compile for ARM64 ($cxx, -fsyntax-only, $((SECONDS - start)) s)"
