// What every AMX (Advanced Matrix Extensions) bf16 kernel needs: run-time detection, the
// function attribute and the tile configuration. Internal header.
//
// Kernels are compiled for AMX per function (VOKEN_AMX) and chosen at run time with
// has_amx_bf16(), so the library still runs on CPUs without AMX (through libtorch's own ops).
#pragma once

#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__linux__)
#define VOKEN_HAVE_AMX 1
#include <immintrin.h>
#define VOKEN_AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#endif

namespace voken::core {

// Whether the CPU has AMX-TILE, AMX-BF16, AVX-512 F/BW/VL/DQ/BF16, the OS saves their state and
// Linux granted this process the tile data state (asked for on the first call). Detected once.
bool has_amx_bf16();

#ifdef VOKEN_HAVE_AMX
namespace amx {

// The 64-byte operand of _tile_loadconfig (palette 1).
struct alignas(64) TileConfig {
  uint8_t palette_id = 0;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// All eight tiles as full 16 rows x 64 bytes, the shape every voken kernel uses. Configuration
// is per thread: call it in each worker before its first tile instruction, and _tile_release()
// when done.
VOKEN_AMX inline void configure_full_tiles() {
  TileConfig config;
  config.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = 16;
    config.colsb[t] = 64;
  }
  _tile_loadconfig(&config);
}

}  // namespace amx
#endif

}  // namespace voken::core
