// The one CPU dispatch answer every voken kernel reads: which instruction-set tier this process
// runs its kernels at. Internal header.
//
// Tiers, from the most capable down (each includes the ones below it):
//   amx          AMX-TILE + AMX-BF16 (Sapphire Rapids and later Xeons)
//   avx512_bf16  AVX-512 F/BW/VL/DQ + AVX512-BF16 (vdpbf16ps: Cooper Lake, Zen 4/5)
//   avx512       AVX-512 F/BW/VL/DQ (Skylake-SP .. Ice Lake)
//   avx2         AVX2 + FMA + F16C (Haswell and later, Zen 1-3, most laptops)
//   generic      ATen ops and plain C++ (any CPU, ARM64 included): the reference path
//
// The tier is detected once, at the first call of cpu_info(), from CPUID and the OS's register
// state (and, for AMX, Linux's permission for the tile data). The environment variable VOKEN_CPU
// (read at that moment) chooses a lower tier, so that every kernel path can be run and tested on
// one machine. Kernels are compiled for their instruction sets per function (the VOKEN_TARGET_*
// attributes below), so one build runs on every CPU and picks its code at run time.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

// ---- compile time: what this build can emit -------------------------------------------------
// x86-64 kernels need GCC or Clang function-level target attributes. Elsewhere (ARM64, ...) every
// intrinsic stays out of the build and the generic tier is the only one.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define VOKEN_X86_KERNELS 1
#define VOKEN_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define VOKEN_TARGET_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")))
#define VOKEN_TARGET_AVX512_BF16 \
  __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#endif
// The AMX intrinsics (_tile_*) need GCC 11 or later, and the tile permission is asked of Linux.
#if defined(VOKEN_X86_KERNELS) && !defined(__clang__) && __GNUC__ >= 11 && defined(__linux__)
#define VOKEN_HAVE_AMX 1
#define VOKEN_TARGET_AMX \
  __attribute__((target("amx-tile,amx-bf16,avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#endif

namespace voken::core {

enum class CpuTier : int { generic = 0, avx2 = 1, avx512 = 2, avx512_bf16 = 3, amx = 4 };

// "generic", "avx2", "avx512", "avx512_bf16", "amx".
const char* tier_name(CpuTier tier);
// The tier of a name as tier_name gives it; false when the name is none of them.
bool tier_from_name(const std::string& name, CpuTier& tier);

// Instruction-set features, each true only when the CPU has it and the OS saves its register
// state. The int8 flags are for int8 kernels (VNNI dot products, AMX-INT8 tiles).
struct CpuFeatures {
  bool avx2 = false;         // AVX2 + FMA + F16C
  bool avx512 = false;       // AVX-512 F/BW/VL/DQ
  bool avx512_bf16 = false;  // AVX512-BF16
  bool amx_bf16 = false;     // AMX-TILE + AMX-BF16, tile data granted by the OS
  bool avx512_vnni = false;  // AVX512-VNNI (vpdpbusd on zmm)
  bool avx_vnni = false;     // AVX-VNNI (vpdpbusd on ymm, VEX encoded)
  bool amx_int8 = false;     // AMX-INT8, tile data granted by the OS
};

struct CpuInfo {
  std::string vendor;      // CPUID vendor ("GenuineIntel", "AuthenticAMD"), or the architecture
  std::string model_name;  // the CPU's brand string, e.g. "AMD EPYC 9R45 96-Core Processor"
  int family = 0;          // CPUID display family and model (x86; 0 elsewhere)
  int model = 0;
  int stepping = 0;
  CpuFeatures detected;               // everything the CPU and OS offer
  CpuTier native = CpuTier::generic;  // the best tier this build can run on this CPU
  CpuTier tier = CpuTier::generic;    // the tier in use: native, or lower through VOKEN_CPU
  bool forced = false;                // VOKEN_CPU chose `tier`
  // `detected` limited to what `tier` may use (e.g. no AVX512-VNNI when avx2 is forced): what
  // kernels test before using an optional instruction.
  CpuFeatures enabled;
};

// Detected at the first call (thread-safe; the answer never changes afterwards). Throws
// ConfigError when VOKEN_CPU names no tier, or a tier above the native one.
const CpuInfo& cpu_info();

// cpu_info().tier.
CpuTier cpu_tier();

// Every tier this process can run kernels at, generic first, up to cpu_tier(): what tests loop
// over.
std::vector<CpuTier> runnable_tiers();

// One line for logs and benchmarks: model, family/model, and the tier in use (with the native
// tier when VOKEN_CPU forced a lower one), e.g.
// "Intel(R) Xeon(R) Processor (GenuineIntel family 6 model 207), tier amx".
std::string cpu_summary();

}  // namespace voken::core
