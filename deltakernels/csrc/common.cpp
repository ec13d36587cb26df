// ISA dispatch and the row gather shared by the CPU delta kernels.
#include "delta_cpu.h"

#include <atomic>
#include <cstdlib>
#include <string>

namespace deltaserve {

bool cpu_has_avx512() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

namespace {
enum Isa : int { kUndecided = -1, kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };
std::atomic<int> isa_choice{kUndecided};  // read once per kernel call

int best_isa() { return cpu_has_avx512() ? kAvx512 : (cpu_has_avx2() ? kAvx2 : kGeneric); }

int active_isa() {
  int v = isa_choice.load(std::memory_order_relaxed);
  if (v == kUndecided) {
    const char* forced = std::getenv("DELTASERVE_CPU_ISA");
    const std::string f = forced != nullptr ? forced : "";
    v = best_isa();
    if (f == "generic") v = kGeneric;
    if (f == "avx2" && v > kAvx2) v = kAvx2;
    isa_choice.store(v, std::memory_order_relaxed);
  }
  return v;
}
}  // namespace

bool use_avx512() { return active_isa() == kAvx512; }
bool use_avx2() { return active_isa() == kAvx2; }

const char* isa_name() {
  switch (active_isa()) {
    case kAvx512: return "avx512";
    case kAvx2: return "avx2";
    default: return "generic";
  }
}

void set_isa(const std::string& name) {
  if (name == "generic") {
    isa_choice.store(kGeneric);
  } else if (name == "avx2") {
    TORCH_CHECK(cpu_has_avx2(), "this CPU has no AVX2 + FMA");
    isa_choice.store(kAvx2);
  } else if (name == "avx512") {
    TORCH_CHECK(cpu_has_avx512(), "this CPU has no AVX-512 (F, BW, VL)");
    isa_choice.store(kAvx512);
  } else {
    TORCH_CHECK(name == "auto", "isa must be auto, avx512, avx2 or generic, got ", name);
    isa_choice.store(kUndecided);
  }
}

template <typename T>
static void gather_typed(const torch::Tensor& x, const int32_t* order, int64_t start, int64_t end, int64_t width,
                         float* out) {
  const int64_t in = x.size(1), stride = x.stride(0);
  const T* base = x.data_ptr<T>();
  for (int64_t i = start; i < end; ++i) {
    const T* src = base + static_cast<int64_t>(order[i]) * stride;
    float* dst = out + (i - start) * width;
    for (int64_t k = 0; k < in; ++k) dst[k] = to_f32<T>(src[k]);
    for (int64_t k = in; k < width; ++k) dst[k] = 0.0f;
  }
}

void gather_rows_f32(const torch::Tensor& x, const int32_t* order, int64_t start, int64_t end, int64_t width,
                     float* out) {
  dispatch_float(x.scalar_type(), "the activations", [&](auto t) {
    gather_typed<decltype(t)>(x, order, start, end, width, out);
  });
}

}  // namespace deltaserve
