// The CPU dispatch layer (core/cpu.h): tier names, detection against /proc/cpuinfo, VOKEN_CPU
// (checked in child processes, since the answer is fixed at the first call), and the AVX2 helpers
// (core/simd_avx2.h) against scalar float64 references, on CPUs that have AVX2.
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "core/cpu.h"
#include "core/simd_avx2.h"
#include "voken/error.h"

namespace voken::core {
namespace {

TEST(Cpu, TierNamesRoundTrip) {
  for (CpuTier tier :
       {CpuTier::generic, CpuTier::avx2, CpuTier::avx512, CpuTier::avx512_bf16, CpuTier::amx}) {
    CpuTier parsed = CpuTier::generic;
    ASSERT_TRUE(tier_from_name(tier_name(tier), parsed)) << tier_name(tier);
    EXPECT_EQ(parsed, tier);
  }
  CpuTier parsed = CpuTier::amx;
  EXPECT_FALSE(tier_from_name("AVX2", parsed));
  EXPECT_FALSE(tier_from_name("", parsed));
  EXPECT_EQ(parsed, CpuTier::amx);
}

std::set<std::string> proc_cpuinfo_flags() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("flags", 0) == 0) {
      std::istringstream words(line.substr(line.find(':') + 1));
      std::set<std::string> flags;
      for (std::string w; words >> w;) flags.insert(w);
      return flags;
    }
  return {};
}

// The tier agrees with what the kernel reports (Linux lists a flag only when the OS enabled its
// state too), and the tiers below it are all runnable.
TEST(Cpu, TierMatchesProcCpuinfo) {
  const CpuInfo& info = cpu_info();
  std::printf("CPU %s\n", cpu_summary().c_str());
  const auto flags = proc_cpuinfo_flags();
  if (flags.empty()) GTEST_SKIP() << "no x86 flags line in /proc/cpuinfo";
  const auto has = [&](const char* f) { return flags.count(f) > 0; };
  EXPECT_EQ(info.detected.avx2, has("avx2") && has("fma") && has("f16c"));
  EXPECT_EQ(info.detected.avx512, has("avx512f") && has("avx512bw") && has("avx512vl") && has("avx512dq"));
  EXPECT_EQ(info.detected.avx512_bf16, info.detected.avx512 && has("avx512_bf16"));
  EXPECT_EQ(info.detected.avx512_vnni, info.detected.avx512 && has("avx512_vnni"));
  EXPECT_EQ(info.detected.avx_vnni, info.detected.avx2 && has("avx_vnni"));
  if (!(has("amx_bf16") && has("amx_tile"))) EXPECT_FALSE(info.detected.amx_bf16);
  EXPECT_GE(info.native, info.tier);
  const auto tiers = runnable_tiers();
  ASSERT_FALSE(tiers.empty());
  EXPECT_EQ(tiers.front(), CpuTier::generic);
  EXPECT_EQ(tiers.back(), info.tier);
  // The enabled features never exceed the tier.
  if (info.tier < CpuTier::avx512) EXPECT_FALSE(info.enabled.avx512_vnni);
  if (info.tier < CpuTier::amx) EXPECT_FALSE(info.enabled.amx_int8);
}

// In a child process (this test binary run again with VOKEN_CPU set and only this test):
// prints the tier in use or the error, for VokenCpuForcesALowerTierOrIsRefused.
TEST(Cpu, ChildReport) {
  if (!std::getenv("VOKEN_TEST_CPU_CHILD")) GTEST_SKIP() << "runs only as the child of VokenCpu...";
  try {
    std::printf("TIER %s FORCED %d\n", tier_name(cpu_tier()), cpu_info().forced ? 1 : 0);
  } catch (const ConfigError& e) {
    std::printf("ERROR %s\n", e.what());
  }
}

std::string child_output(const std::string& voken_cpu) {
  char self[4096] = {};
  if (readlink("/proc/self/exe", self, sizeof self - 1) <= 0) return "readlink failed";
  const std::string command =
      "VOKEN_TEST_CPU_CHILD=1 VOKEN_CPU=" + voken_cpu + " '" + self + "' --gtest_filter=Cpu.ChildReport 2>&1";
  FILE* pipe = popen(command.c_str(), "r");
  if (!pipe) return "popen failed";
  std::string output;
  char buffer[512];
  while (std::fgets(buffer, sizeof buffer, pipe)) output += buffer;
  pclose(pipe);
  return output;
}

// The tier is fixed at the first call, so VOKEN_CPU is checked in child processes: a lower tier
// is used and reported, an unknown name or a tier above the CPU's is refused with a message
// naming the variable.
TEST(Cpu, VokenCpuForcesALowerTierOrIsRefused) {
  for (CpuTier tier : runnable_tiers()) {
    const std::string out = child_output(tier_name(tier));
    EXPECT_NE(out.find(std::string("TIER ") + tier_name(tier) + " FORCED 1"), std::string::npos) << out;
  }
  const std::string unknown = child_output("avx1024");
  EXPECT_NE(unknown.find("ERROR VOKEN_CPU=avx1024 names no CPU tier"), std::string::npos) << unknown;
  if (cpu_info().native != CpuTier::amx) {
    const std::string above = child_output("amx");
    EXPECT_NE(above.find(std::string("offers tiers up to ") + tier_name(cpu_info().native)),
              std::string::npos)
        << above;
  }
}

#ifdef VOKEN_X86_KERNELS

bool avx2_here() { return cpu_tier() >= CpuTier::avx2; }

std::vector<float> test_values() {
  std::vector<float> values = {0.0f,   -0.0f, 1.0f,   -1.0f, 0.5f,   3.0f,  -3.0f,  10.0f,
                               -10.0f, 80.0f, -80.0f, 1e-3f, -1e-3f, 87.0f, -86.5f, 1e-30f};
  std::mt19937 random(7);
  std::normal_distribution<float> normal(0.0f, 4.0f);
  for (int i = 0; i < 4000; ++i) values.push_back(normal(random));
  while (values.size() % 8) values.push_back(0.25f);
  return values;
}

VOKEN_TARGET_AVX2 void apply8(const std::vector<float>& in, std::vector<float>& out, int which) {
  out.resize(in.size());
  for (size_t i = 0; i < in.size(); i += 8) {
    const __m256 x = simd8::load8(in.data() + i);
    const __m256 y = which == 0   ? simd8::exp8(x)
                     : which == 1 ? simd8::gelu8(x)
                     : which == 2 ? simd8::silu8(x)
                     : which == 3 ? simd8::exp2_fast8(_mm256_min_ps(x, _mm256_set1_ps(100.0f)))
                                  : simd8::reciprocal8(x);
    simd8::store8(out.data() + i, y);
  }
}

TEST(SimdAvx2, ElementwiseFunctionsAgainstFloat64) {
  if (!avx2_here()) GTEST_SKIP() << "the CPU tier here is below avx2";
  const auto values = test_values();
  std::vector<float> out;
  struct Case {
    const char* name;
    double (*reference)(double);
    double relative;
  };
  const Case cases[] = {
      {"exp", [](double x) { return std::exp(std::min(88.0, std::max(-87.0, x))); }, 4e-7},
      {"gelu", [](double x) { return 0.5 * x * std::erfc(-x / std::sqrt(2.0)); }, 6e-7},
      {"silu", [](double x) { return x / (1.0 + std::exp(-x)); }, 6e-7},
      {"exp2_fast", [](double x) { return std::exp2(std::min(100.0, x)); }, 4e-6},
      {"reciprocal", [](double x) { return 1.0 / x; }, 3e-7},
  };
  for (int which = 0; which < 5; ++which) {
    apply8(values, out, which);
    const Case& c = cases[which];
    for (size_t i = 0; i < values.size(); ++i) {
      if (which == 4 && values[i] == 0.0f) continue;
      const double ref = c.reference(values[i]);
      if (which == 3 && ref < 1e-37) {  // denormal results may flush to zero
        EXPECT_LE(std::abs(out[i]), 2e-38) << c.name << "(" << values[i] << ")";
        continue;
      }
      // GELU of negative x is x erfc(|x| / sqrt 2) / 2 = x t exp(-x^2 / 2 + P(t)) / 2: the float32
      // rounding of the exponent's argument (a few ulps of x^2 / 2) becomes a relative error of the result.
      const double relative = which == 1 ? c.relative + 1.5e-7 * values[i] * values[i] : c.relative;
      EXPECT_LE(std::abs(out[i] - ref), relative * std::abs(ref) + 1e-30)
          << c.name << "(" << values[i] << ")";
    }
  }
}

VOKEN_TARGET_AVX2 void round_trip_bf16(const std::vector<float>& in, std::vector<uint16_t>& bits,
                                       std::vector<float>& back, int64_t n) {
  bits.assign(in.size() + 8, 0xABCD);
  back.assign(in.size() + 8, -7.0f);
  for (int64_t i = 0; i < n; i += 8) {
    simd8::store8(bits.data() + i, simd8::load8(in.data() + i, n - i), n - i);
    simd8::store8(back.data() + i, simd8::load8(bits.data() + i, n - i), n - i);
  }
}

TEST(SimdAvx2, Bf16RoundingAndTailsMatchC10) {
  if (!avx2_here()) GTEST_SKIP() << "the CPU tier here is below avx2";
  auto values = test_values();
  values.push_back(std::nanf(""));
  values.push_back(INFINITY);
  values.push_back(-INFINITY);
  values.push_back(1.00390625f);  // exactly between two bf16 values: ties to even
  values.push_back(1.01171875f);
  for (const int64_t n : {int64_t(values.size()), int64_t(13), int64_t(1), int64_t(0)}) {
    std::vector<uint16_t> bits;
    std::vector<float> back;
    round_trip_bf16(values, bits, back, n);
    for (int64_t i = 0; i < n; ++i) {
      const c10::BFloat16 expected(values[i]);
      if (std::isnan(values[i])) {
        EXPECT_TRUE(std::isnan(back[i]));
        continue;
      }
      EXPECT_EQ(bits[i], expected.x) << values[i];
      EXPECT_EQ(back[i], static_cast<float>(expected)) << values[i];
    }
    // Nothing past the tail is written.
    for (size_t i = static_cast<size_t>(n); i < bits.size(); ++i) {
      EXPECT_EQ(bits[i], 0xABCD) << "n " << n << " i " << i;
      EXPECT_EQ(back[i], -7.0f) << "n " << n << " i " << i;
    }
  }
}

VOKEN_TARGET_AVX2 void sums(const std::vector<float>& in, float& sum, float& max) {
  const __m256 v = simd8::load8(in.data());
  sum = simd8::reduce_add(v);
  max = simd8::reduce_max(v);
}

TEST(SimdAvx2, HorizontalReductions) {
  if (!avx2_here()) GTEST_SKIP() << "the CPU tier here is below avx2";
  const std::vector<float> v = {1, -2, 3.5f, 40, -5, 6, 0.25f, -8};
  float sum = 0, max = 0;
  sums(v, sum, max);
  EXPECT_FLOAT_EQ(sum, 35.75f);
  EXPECT_EQ(max, 40.0f);
}

VOKEN_TARGET_AVX2 void exp2_both(const std::vector<float>& in, std::vector<float>& fast,
                                 std::vector<float>& softmax) {
  fast.resize(in.size());
  softmax.resize(in.size());
  for (size_t i = 0; i < in.size(); i += 8) {
    const __m256 x = simd8::load8(in.data() + i);
    simd8::store8(fast.data() + i, simd8::exp2_fast8(x));
    simd8::store8(softmax.data() + i, simd8::exp2_softmax8(x));
  }
}

// exp2_softmax8 is exp2_fast8 (tested against float64 above) with one scaling instead of two: the
// same bits on [-126, 127], where both scale a normal float by a power of two; 2^-126 below.
TEST(SimdAvx2, Exp2SoftmaxIsExp2FastAboveMinus126) {
  if (!avx2_here()) GTEST_SKIP() << "the CPU tier here is below avx2";
  std::vector<float> values = {-126.0f, -125.5f, -125.49999f, -0.5f, 0.5f,
                               126.5f,  127.0f,  127.4f,      0.0f,  -0.0f};
  for (float x = -126.0f; x <= 127.0f; x += 0.0009765625f) values.push_back(x);  // 2^-10 steps, ~260k values
  for (const float x : test_values())
    if (x >= -126.0f && x <= 127.0f) values.push_back(x);
  const size_t in_range = values.size();
  for (const float x : {-126.001f, -126.5f, -127.0f, -149.0f, -200.0f, -1e30f, -INFINITY})
    values.push_back(x);
  while (values.size() % 8) values.push_back(1.0f);
  std::vector<float> fast, softmax;
  exp2_both(values, fast, softmax);
  for (size_t i = 0; i < in_range; ++i) {
    uint32_t a = 0, b = 0;
    std::memcpy(&a, &fast[i], 4);
    std::memcpy(&b, &softmax[i], 4);
    ASSERT_EQ(a, b) << "2^" << values[i] << ": " << fast[i] << " vs " << softmax[i];
  }
  for (size_t i = in_range; i < values.size() && values[i] < -126.0f; ++i)
    EXPECT_EQ(softmax[i], std::ldexp(1.0f, -126)) << values[i];
}

#endif

}  // namespace
}  // namespace voken::core
