// What every AMX (Advanced Matrix Extensions) bf16 kernel needs: the tile configuration, and the
// packing of row-major operands into "B" tiles. Internal header.
//
// Kernels are compiled for AMX per function (VOKEN_TARGET_AMX, core/cpu.h) and chosen at run time
// when cpu_tier() is CpuTier::amx, so the library still runs on CPUs without AMX.
#pragma once

#include <cstdint>
#include <type_traits>

#include "core/cpu.h"

#ifdef VOKEN_HAVE_AMX
#include <immintrin.h>

#include "core/simd_avx512.h"

// GCC 12 reports its own AVX-512 shuffles (inlined from transpose16 below) as possibly reading an
// uninitialised vector; they do not. (Every includer is a kernel file that ignores it as well.)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace voken::core::amx {

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
VOKEN_TARGET_AMX inline void configure_full_tiles() {
  TileConfig config;
  config.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = 16;
    config.colsb[t] = 64;
  }
  _tile_loadconfig(&config);
}

// One 64-byte tile row (a cache line) per step of 32 inputs; one packed block of 16 rows x 32
// inputs is 512 bf16 values.
constexpr int64_t kStep = 32;
constexpr int64_t kPackedBlock = 512;

// 16 x 16 transpose of 32-bit lanes (unpack, shuffle within 128-bit lanes, then across lanes).
VOKEN_TARGET_AMX inline void transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int g = 0; g < 4; ++g) {
    u[4 * g + 0] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
    u[4 * g + 1] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0xEE);
    u[4 * g + 2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
    u[4 * g + 3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
  }
  for (int j = 0; j < 4; ++j) {
    const __m512 v = _mm512_shuffle_f32x4(u[j], u[4 + j], 0x88);
    const __m512 w = _mm512_shuffle_f32x4(u[j], u[4 + j], 0xDD);
    const __m512 v2 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0x88);
    const __m512 w2 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0xDD);
    r[j] = _mm512_shuffle_f32x4(v, v2, 0x88);
    r[8 + j] = _mm512_shuffle_f32x4(v, v2, 0xDD);
    r[4 + j] = _mm512_shuffle_f32x4(w, w2, 0x88);
    r[12 + j] = _mm512_shuffle_f32x4(w, w2, 0xDD);
  }
}

// Rows x [M, K] (row stride ldx, float32 or bf16) -> B tiles [M/16][K/32][16 pairs][16 rows][2]
// bf16 (rounded to nearest even), zero padded, for the row blocks [mb_begin, mb_end).
template <typename T>
VOKEN_TARGET_AMX void pack_b_tiles(const T* x, int64_t ldx, int64_t m, int64_t k, int64_t k_steps,
                                   uint16_t* packed, int64_t mb_begin, int64_t mb_end) {
  for (int64_t mb = mb_begin; mb < mb_end; ++mb) {
    for (int64_t s = 0; s < k_steps; ++s) {
      const int64_t k0 = s * kStep;
      __m512 rows[16];
      for (int t = 0; t < 16; ++t) {
        const int64_t token = mb * 16 + t;
        if (token >= m) {
          rows[t] = _mm512_setzero_ps();
          continue;
        }
        const T* p = x + token * ldx + k0;
        if constexpr (std::is_same_v<T, float>) {
          const __m512 lo = _mm512_maskz_loadu_ps(simd::tail_mask(k - k0), p);
          const __m512 hi = _mm512_maskz_loadu_ps(simd::tail_mask(k - k0 - 16), p + 16);
          rows[t] = (__m512)_mm512_cvtne2ps_pbh(hi, lo);
        } else {
          rows[t] = _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(simd::tail_mask32(k - k0), p));
        }
      }
      transpose16(rows);
      uint16_t* out = packed + (mb * k_steps + s) * kPackedBlock;
      for (int i = 0; i < 16; ++i) _mm512_store_ps(reinterpret_cast<float*>(out + i * 32), rows[i]);
    }
  }
}

}  // namespace voken::core::amx
#endif
