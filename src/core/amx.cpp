#include "core/amx.h"

#ifdef VOKEN_HAVE_AMX
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace voken::core {
namespace {

#ifdef VOKEN_HAVE_AMX
bool detect_amx_bf16() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !(ecx & (1u << 27))) return false;  // OSXSAVE
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool avx512 = (ebx & (1u << 16)) && (ebx & (1u << 30)) && (ebx & (1u << 17)) && (ebx & (1u << 31));
  const bool amx = (edx & (1u << 24)) && (edx & (1u << 22));  // AMX-TILE, AMX-BF16
  if (!avx512 || !amx) return false;
  if (!__get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) || !(eax & (1u << 5))) return false;  // AVX512-BF16
  uint32_t xcr0_lo = 0, xcr0_hi = 0;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  const uint32_t avx512_state = 0xE6;                   // SSE, AVX, opmask, ZMM halves
  const uint32_t tile_state = (1u << 17) | (1u << 18);  // XTILECFG, XTILEDATA
  if ((xcr0_lo & avx512_state) != avx512_state || (xcr0_lo & tile_state) != tile_state) return false;
  // Linux hands out the (8 KiB) tile data state only to processes that ask for it.
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}
#else
bool detect_amx_bf16() { return false; }
#endif

}  // namespace

bool has_amx_bf16() {
  static const bool available = detect_amx_bf16();  // a CPU/OS property
  return available;
}

}  // namespace voken::core
