#!/bin/sh
# Runs a test with voken's kernels forced to a CPU tier: run_at_tier.sh TIER COMMAND [ARGS...].
# Exits 77 (ctest's SKIP_RETURN_CODE for these tests) when this CPU cannot run TIER, so that the
# tier passes of the suite skip on, e.g., an ARM64 machine instead of failing.
tier=$1
shift
flags=$(grep -m1 -E '^flags' /proc/cpuinfo 2>/dev/null)
has() { case " $flags " in *" $1 "*) return 0 ;; esac; return 1; }
runnable=yes
case "$tier" in
  generic) ;;
  avx2) has avx2 && has fma && has f16c || runnable=no ;;
  avx512) has avx512f && has avx512bw && has avx512vl && has avx512dq || runnable=no ;;
  avx512_bf16) has avx512f && has avx512bw && has avx512vl && has avx512dq && has avx512_bf16 || runnable=no ;;
  *) echo "run_at_tier.sh: unknown tier '$tier'" >&2; exit 2 ;;
esac
if [ "$runnable" = no ]; then
  echo "SKIP: this CPU cannot run the $tier kernel tier"
  exit 77
fi
VOKEN_CPU=$tier
export VOKEN_CPU
exec "$@"
