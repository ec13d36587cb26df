// Shared pieces of the CPU delta kernels: segment lists, float conversions, ISA dispatch.
//
// A "segment" is the rows of one slot: (slot, start, end) with rows order[start:end] of the batch
// (deltakernels/segments.py, SlotTiles.slot_ranges). Every kernel here takes the segments as a host int64
// tensor [n, 3] and processes each distinct slot's delta once, whatever the number of its rows.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace deltaserve {

struct Segment {
  int64_t slot, start, end;
};

inline std::vector<Segment> read_segments(const torch::Tensor& ranges, int64_t n_order, int64_t n_slots) {
  TORCH_CHECK(ranges.device().is_cpu() && ranges.scalar_type() == torch::kInt64 && ranges.dim() == 2 &&
                  ranges.size(1) == 3,
              "segments must be a CPU int64 [n, 3] tensor of (slot, start, end)");
  auto r = ranges.contiguous();
  const int64_t* p = r.data_ptr<int64_t>();
  std::vector<Segment> segs;
  segs.reserve(r.size(0));
  for (int64_t i = 0; i < r.size(0); ++i) {
    Segment s{p[3 * i], p[3 * i + 1], p[3 * i + 2]};
    TORCH_CHECK(s.slot >= 0 && s.slot < n_slots, "segment slot ", s.slot, " outside the pool of ", n_slots);
    TORCH_CHECK(0 <= s.start && s.start <= s.end && s.end <= n_order, "segment rows ", s.start, "..", s.end,
                " outside order of ", n_order);
    segs.push_back(s);
  }
  return segs;
}

// float32 <-> the activation dtypes, rounding to nearest even (as torch's .to() does).
template <typename T>
inline float to_f32(T v) {
  return static_cast<float>(v);
}
template <typename T>
inline T from_f32(float v) {
  return static_cast<T>(v);
}

// Calls f(T{}) with T the C++ type of `dtype` (float32, bfloat16 or float16): the one dtype dispatch of the kernels.
// `what` names the tensor whose dtype it is, for the error.
template <typename F>
inline void dispatch_float(c10::ScalarType dtype, const char* what, F&& f) {
  switch (dtype) {
    case torch::kFloat: f(float{}); break;
    case torch::kBFloat16: f(c10::BFloat16{}); break;
    case torch::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK(false, "unsupported dtype of ", what, ": ", dtype);
  }
}

// The code path the kernels take: by default the best this CPU has (AVX-512 F + BW + VL, else AVX2 + FMA, else
// the portable code); DELTASERVE_CPU_ISA=avx2 or =generic, or set_isa(...), forces a lower one (the tests run
// every path the CPU has). The AVX2 paths: the 1-bit kernel, and LoRA's shrink for float32 weights.
bool use_avx512();
bool use_avx2();
bool cpu_has_avx512();
bool cpu_has_avx2();
const char* isa_name();                 // "avx512", "avx2" or "generic"
void set_isa(const std::string& name);  // "auto", "avx512", "avx2" or "generic"

// Gathers rows order[start:end] of x (any float dtype) into float32 rows of `width` >= in columns, zero-padded.
void gather_rows_f32(const torch::Tensor& x, const int32_t* order, int64_t start, int64_t end, int64_t width,
                     float* out);

}  // namespace deltaserve
