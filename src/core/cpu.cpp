#include "core/cpu.h"

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>

#include "voken/error.h"

#ifdef VOKEN_X86_KERNELS
#include <cpuid.h>
#endif
#if defined(VOKEN_HAVE_AMX)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace voken::core {
namespace {

constexpr CpuTier kTiers[] = {CpuTier::generic, CpuTier::avx2, CpuTier::avx512, CpuTier::avx512_bf16,
                              CpuTier::amx};

std::string trimmed(std::string s) {
  const auto first = s.find_first_not_of(" \t");
  const auto last = s.find_last_not_of(" \t\n");
  return first == std::string::npos ? std::string() : s.substr(first, last - first + 1);
}

// "model name" (x86) or "Model name"/"CPU part" style fields of /proc/cpuinfo, for CPUs whose
// brand string CPUID does not give (ARM64).
std::string proc_cpuinfo_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    const auto colon = line.find(':');
    if (colon == std::string::npos) continue;
    const std::string key = trimmed(line.substr(0, colon));
    if (key == "model name" || key == "Model name" || key == "Processor" || key == "cpu model")
      return trimmed(line.substr(colon + 1));
  }
  return {};
}

#ifdef VOKEN_X86_KERNELS
struct Registers {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
};
Registers cpuid(unsigned leaf, unsigned subleaf = 0) {
  Registers r;
  if (!__get_cpuid_count(leaf, subleaf, &r.eax, &r.ebx, &r.ecx, &r.edx)) r = Registers();
  return r;
}
bool bit(unsigned word, int index) { return (word >> index) & 1u; }

uint64_t xcr0() {
  uint32_t lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

// Linux hands the 8 KiB AMX tile data state only to processes that ask for it.
bool request_amx_tile_permission() {
#ifdef VOKEN_HAVE_AMX
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

void detect_x86(CpuInfo& info) {
  const unsigned max_leaf = __get_cpuid_max(0, nullptr);
  const Registers vendor = cpuid(0);
  char name[13] = {};
  std::memcpy(name, &vendor.ebx, 4);
  std::memcpy(name + 4, &vendor.edx, 4);
  std::memcpy(name + 8, &vendor.ecx, 4);
  info.vendor = name;

  const Registers leaf1 = cpuid(1);
  const unsigned base_family = (leaf1.eax >> 8) & 0xF, base_model = (leaf1.eax >> 4) & 0xF;
  info.family = static_cast<int>(base_family == 0xF ? base_family + ((leaf1.eax >> 20) & 0xFF) : base_family);
  info.model = static_cast<int>(
      base_family == 0x6 || base_family == 0xF ? base_model + (((leaf1.eax >> 16) & 0xF) << 4) : base_model);
  info.stepping = static_cast<int>(leaf1.eax & 0xF);

  if (__get_cpuid_max(0x80000000, nullptr) >= 0x80000004) {
    char brand[49] = {};
    for (unsigned i = 0; i < 3; ++i) {
      const Registers r = cpuid(0x80000002 + i);
      std::memcpy(brand + 16 * i, &r, 16);
    }
    info.model_name = trimmed(brand);
  }

  // Register state the OS saves (XCR0): SSE+AVX (bits 1-2), AVX-512 opmask/ZMM (5-7), AMX (17-18).
  const bool osxsave = bit(leaf1.ecx, 27);
  const uint64_t state = osxsave ? xcr0() : 0;
  const bool avx_state = (state & 0x6) == 0x6;
  const bool avx512_state = (state & 0xE6) == 0xE6;
  const bool tile_state = (state & 0x60000) == 0x60000;

  const Registers leaf7 = max_leaf >= 7 ? cpuid(7, 0) : Registers();
  const Registers leaf7_1 = max_leaf >= 7 && leaf7.eax >= 1 ? cpuid(7, 1) : Registers();
  CpuFeatures& f = info.detected;
  f.avx2 = avx_state && bit(leaf1.ecx, 28) /*AVX*/ && bit(leaf1.ecx, 12) /*FMA*/ &&
           bit(leaf1.ecx, 29) /*F16C*/ && bit(leaf7.ebx, 5) /*AVX2*/;
  f.avx512 = f.avx2 && avx512_state && bit(leaf7.ebx, 16) /*F*/ && bit(leaf7.ebx, 17) /*DQ*/ &&
             bit(leaf7.ebx, 30) /*BW*/ && bit(leaf7.ebx, 31) /*VL*/;
  f.avx512_bf16 = f.avx512 && bit(leaf7_1.eax, 5);
  f.avx512_vnni = f.avx512 && bit(leaf7.ecx, 11);
  f.avx_vnni = f.avx2 && bit(leaf7_1.eax, 4);
  const bool amx_tile = bit(leaf7.edx, 24), amx_bf16 = bit(leaf7.edx, 22), amx_int8 = bit(leaf7.edx, 25);
  // The tile permission is asked for only when some AMX kernel could use it.
  const bool tiles =
      f.avx512_bf16 && amx_tile && tile_state && (amx_bf16 || amx_int8) && request_amx_tile_permission();
  f.amx_bf16 = tiles && amx_bf16;
  f.amx_int8 = tiles && amx_int8;
}
#endif

CpuTier native_tier(const CpuFeatures& f) {
#ifdef VOKEN_HAVE_AMX
  if (f.amx_bf16) return CpuTier::amx;
#endif
  if (f.avx512_bf16) return CpuTier::avx512_bf16;
  if (f.avx512) return CpuTier::avx512;
  if (f.avx2) return CpuTier::avx2;
  return CpuTier::generic;
}

CpuFeatures limited_to(const CpuFeatures& f, CpuTier tier) {
  CpuFeatures e;
  e.avx2 = f.avx2 && tier >= CpuTier::avx2;
  e.avx_vnni = f.avx_vnni && tier >= CpuTier::avx2;
  e.avx512 = f.avx512 && tier >= CpuTier::avx512;
  e.avx512_vnni = f.avx512_vnni && tier >= CpuTier::avx512;
  e.avx512_bf16 = f.avx512_bf16 && tier >= CpuTier::avx512_bf16;
  e.amx_bf16 = f.amx_bf16 && tier >= CpuTier::amx;
  e.amx_int8 = f.amx_int8 && tier >= CpuTier::amx;
  return e;
}

std::string tier_list() {
  std::string names;
  for (CpuTier t : kTiers) names += std::string(names.empty() ? "" : ", ") + tier_name(t);
  return names;
}

CpuInfo detect() {
  CpuInfo info;
#ifdef VOKEN_X86_KERNELS
  detect_x86(info);
#elif defined(__aarch64__)
  info.vendor = "aarch64";
#endif
  if (info.model_name.empty()) info.model_name = proc_cpuinfo_model();
  if (info.model_name.empty()) info.model_name = "unknown CPU";
  info.native = native_tier(info.detected);
  info.tier = info.native;
  if (const char* requested = std::getenv("VOKEN_CPU"); requested && *requested) {
    CpuTier tier;
    if (!tier_from_name(requested, tier))
      throw ConfigError(std::string("VOKEN_CPU=") + requested + " names no CPU tier; expected one of " +
                        tier_list());
    if (tier > info.native)
      throw ConfigError(std::string("VOKEN_CPU=") + requested + ": this CPU (" + info.model_name +
                        ") offers tiers up to " + tier_name(info.native) + " in this build");
    info.tier = tier;
    info.forced = true;
  }
  info.enabled = limited_to(info.detected, info.tier);
  return info;
}

}  // namespace

const char* tier_name(CpuTier tier) {
  switch (tier) {
    case CpuTier::generic:
      return "generic";
    case CpuTier::avx2:
      return "avx2";
    case CpuTier::avx512:
      return "avx512";
    case CpuTier::avx512_bf16:
      return "avx512_bf16";
    case CpuTier::amx:
      return "amx";
  }
  return "unknown";
}

bool tier_from_name(const std::string& name, CpuTier& tier) {
  for (CpuTier t : kTiers)
    if (name == tier_name(t)) {
      tier = t;
      return true;
    }
  return false;
}

const CpuInfo& cpu_info() {
  // A function-local static: initialised once, thread-safe; if VOKEN_CPU is invalid the
  // initialisation throws and every later call throws the same error again.
  static const CpuInfo info = detect();
  return info;
}

CpuTier cpu_tier() { return cpu_info().tier; }

std::vector<CpuTier> runnable_tiers() {
  std::vector<CpuTier> tiers;
  for (CpuTier t : kTiers)
    if (t <= cpu_tier()) tiers.push_back(t);
  return tiers;
}

std::string cpu_summary() {
  const CpuInfo& info = cpu_info();
  std::string s = info.model_name;
  if (info.family || info.model)
    s += " (" + info.vendor + " family " + std::to_string(info.family) + " model " +
         std::to_string(info.model) + ")";
  s += std::string(", tier ") + tier_name(info.tier);
  if (info.forced) s += std::string(" (VOKEN_CPU; native ") + tier_name(info.native) + ")";
  return s;
}

}  // namespace voken::core
