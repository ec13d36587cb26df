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

namespace {
// -1: not decided yet; 0: portable code; 1: AVX-512. Read once per kernel call.
std::atomic<int> isa_choice{-1};
}  // namespace

bool use_avx512() {
  int v = isa_choice.load(std::memory_order_relaxed);
  if (v < 0) {
    const char* forced = std::getenv("DELTASERVE_CPU_ISA");
    v = (forced != nullptr && std::string(forced) == "generic") ? 0 : (cpu_has_avx512() ? 1 : 0);
    isa_choice.store(v, std::memory_order_relaxed);
  }
  return v == 1;
}

void set_isa(const std::string& name) {
  if (name == "generic") {
    isa_choice.store(0);
  } else if (name == "avx512") {
    TORCH_CHECK(cpu_has_avx512(), "this CPU has no AVX-512 (F, BW, VL)");
    isa_choice.store(1);
  } else {
    TORCH_CHECK(name == "auto", "isa must be auto, avx512 or generic, got ", name);
    isa_choice.store(-1);
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
