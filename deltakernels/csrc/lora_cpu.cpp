// LoRA on the CPU, segmented (SGMV): each slot's A and B are read once per call for all of its rows.
//
//   shrink:  buf[i, r] = x[i] . a[s, r]  for r < rank[s], 0 up to r_max        (float32 accumulation)
//   expand:  y[i] += scaling[s] * sum_{r < rank[s]} round(buf[i, r]) * bt[s, r, :]
// where round() is the weights' dtype, as the torch reference and the Triton kernel do. One call per projection
// covers every tenant of the step, so the Python overhead does not grow with the number of tenants.
#include "delta_cpu.h"

#include <ATen/Parallel.h>

#include <array>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace deltaserve {
namespace {

constexpr int64_t kRankBlock = 16;   // ranks per shrink work item

#if defined(__x86_64__)
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 load16(const T* p, __mmask16 m);

template <>
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 load16<float>(const float* p, __mmask16 m) {
  return _mm512_maskz_loadu_ps(m, p);
}
template <>
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 load16<c10::BFloat16>(const c10::BFloat16* p,
                                                                                           __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
template <>
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 load16<c10::Half>(const c10::Half* p,
                                                                                       __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}

// acc[j][i] = X[r0 + i] . A[j] for NJ rank rows x NR activation rows.
template <typename T, int NJ, int NR>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void shrink_block(const T* a, int64_t a_stride,
                                                                       const float* X, int64_t Kp, int64_t in,
                                                                       float* out /*[NR][NJ]*/) {
  __m512 acc[NJ][NR];
  for (int j = 0; j < NJ; ++j)
    for (int i = 0; i < NR; ++i) acc[j][i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < in; k += 16) {
    const __mmask16 m = in - k >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (in - k)) - 1);
    __m512 xv[NR];
    for (int i = 0; i < NR; ++i) xv[i] = _mm512_loadu_ps(X + i * Kp + k);
    for (int j = 0; j < NJ; ++j) {
      // the next NJ rank rows (the next slot's after the last ones): at in = 1024 each A row is one 4 KiB page,
      // where the hardware prefetcher stops (bench/cpu_kernels.py measures the kernel beside its byte floor)
      _mm_prefetch(reinterpret_cast<const char*>(a + (j + NJ) * a_stride + k), _MM_HINT_T0);
      const __m512 av = load16<T>(a + j * a_stride + k, m);
      for (int i = 0; i < NR; ++i) acc[j][i] = _mm512_fmadd_ps(av, xv[i], acc[j][i]);
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < NJ; ++j) out[i * NJ + j] = _mm512_reduce_add_ps(acc[j][i]);
}

// out[i][j] (row stride kRankBlock) = X[i] . A[j] for nr rows and nj <= kRankBlock rank rows: register tiles of
// 4 rank rows x 4 activation rows, and 4 rank rows x 1 row for what is left (a decode row): measured on Zen 5,
// four concurrent A streams run closer to the memory's bandwidth than eight or sixteen.
template <typename T>
using ShrinkBlock = void (*)(const T*, int64_t, const float*, int64_t, int64_t, float*);

template <typename T>
void shrink_tile_avx512(const T* a, int64_t a_row, const float* X, int64_t Kp, int64_t in, int64_t nr, int64_t nj,
                        float* out) {
  static constexpr ShrinkBlock<T> four_rows[5] = {nullptr, &shrink_block<T, 1, 4>, &shrink_block<T, 2, 4>,
                                                  &shrink_block<T, 3, 4>, &shrink_block<T, 4, 4>};
  static constexpr ShrinkBlock<T> one_row[9] = {nullptr,
                                                &shrink_block<T, 1, 1>,
                                                &shrink_block<T, 2, 1>,
                                                &shrink_block<T, 3, 1>,
                                                &shrink_block<T, 4, 1>,
                                                &shrink_block<T, 5, 1>,
                                                &shrink_block<T, 6, 1>,
                                                &shrink_block<T, 7, 1>,
                                                &shrink_block<T, 8, 1>};
  float tmp[4 * 8];
  int64_t i = 0;
  for (; i + 4 <= nr; i += 4)
    for (int64_t j = 0; j < nj; j += 4) {
      const int64_t g = std::min<int64_t>(4, nj - j);
      four_rows[g](a + j * a_row, a_row, X + i * Kp, Kp, in, tmp);
      for (int64_t ii = 0; ii < 4; ++ii)
        for (int64_t jj = 0; jj < g; ++jj) out[(i + ii) * kRankBlock + j + jj] = tmp[ii * g + jj];
    }
  for (; i < nr; ++i)
    for (int64_t j = 0; j < nj; j += 4) {
      const int64_t g = std::min<int64_t>(4, nj - j);
      one_row[g](a + j * a_row, a_row, X + i * Kp, Kp, in, tmp);
      for (int64_t jj = 0; jj < g; ++jj) out[i * kRankBlock + j + jj] = tmp[jj];
    }
}

// acc[i][0:n] += sum_{r < rank} w[i][r] * bt[r][0:n] for NR rows. One bt row is streamed at a time, contiguous
// (a long run the hardware prefetcher follows), into accumulators that stay in L1.
template <typename T, int NR>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void expand_rows(const T* bt, int64_t bt_stride, int64_t rank,
                                                                      const float* w, int64_t w_stride, int64_t n,
                                                                      float* acc, int64_t acc_stride) {
  for (int64_t r = 0; r < rank; ++r) {
    __m512 wv[NR];
    for (int i = 0; i < NR; ++i) wv[i] = _mm512_set1_ps(w[i * w_stride + r]);
    const T* row = bt + r * bt_stride;
    for (int64_t c = 0; c < n; c += 16) {
      // the next row's run, fetched while this one computes (runs are short: the prefetcher starts late)
      _mm_prefetch(reinterpret_cast<const char*>(row + bt_stride + c), _MM_HINT_T0);
      const __mmask16 m = n - c >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - c)) - 1);
      const __m512 b = load16<T>(row + c, m);
      for (int i = 0; i < NR; ++i) {
        float* a = acc + i * acc_stride + c;  // acc rows are padded to whole 16-float chunks
        _mm512_storeu_ps(a, _mm512_fmadd_ps(wv[i], b, _mm512_loadu_ps(a)));
      }
    }
  }
}
#endif

#if defined(__x86_64__)
// AVX2 + FMA, float32 weights (bfloat16 and float16 ones take the portable code): 16 columns per step in two
// independent FMA chains, then one horizontal sum per (row, rank column); the same products as shrink_generic,
// summed in another order.
__attribute__((target("avx2,fma"))) void shrink_avx2(const float* a, int64_t a_stride, int64_t nj, const float* X,
                                                     int64_t Kp, int64_t in, int64_t nr, float* out /*[nr][nj]*/) {
  for (int64_t i = 0; i < nr; ++i) {
    const float* x = X + i * Kp;
    for (int64_t j = 0; j < nj; ++j) {
      const float* aj = a + j * a_stride;
      __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
      int64_t k = 0;
      for (; k + 16 <= in; k += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), _mm256_loadu_ps(aj + k), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), _mm256_loadu_ps(aj + k + 8), acc1);
      }
      for (; k + 8 <= in; k += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), _mm256_loadu_ps(aj + k), acc0);
      const __m256 s = _mm256_add_ps(acc0, acc1);
      __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
      h = _mm_hadd_ps(h, h);
      h = _mm_hadd_ps(h, h);
      float acc = _mm_cvtss_f32(h);
      for (; k < in; ++k) acc += x[k] * aj[k];
      out[i * nj + j] = acc;
    }
  }
}
#endif

template <typename T>
void shrink_generic(const T* a, int64_t a_stride, int64_t nj, const float* X, int64_t Kp, int64_t in, int64_t nr,
                    float* out /*[nr][nj]*/) {
  for (int64_t i = 0; i < nr; ++i)
    for (int64_t j = 0; j < nj; ++j) {
      const T* aj = a + j * a_stride;
      const float* x = X + i * Kp;
      float acc = 0.0f;
      for (int64_t k = 0; k < in; ++k) acc += x[k] * to_f32<T>(aj[k]);
      out[i * nj + j] = acc;
    }
}

// Everything one call reads; the per-item functions below work on rows [i0, i1) of `order` of one segment.
template <typename T>
struct Lora {
  const float* X = nullptr;  // gathered float32 rows, [rows][Kp], row r = order[first + r]
  int64_t Kp = 0, in = 0, first = 0;
  const T* a = nullptr;
  int64_t a_slot = 0, a_row = 0, r_max = 0;
  const T* bt = nullptr;
  int64_t t_slot = 0, t_row = 0, out = 0;
  const float* scaling = nullptr;
  const int32_t* ranks = nullptr;
  const int32_t* order = nullptr;
  float* buf = nullptr;
  int64_t b_stride = 0;
  T* y = nullptr;
  int64_t y_stride = 0;
  bool avx512 = false;
  bool avx2 = false;  // shrink only, float32 weights (shrink_avx2)

  int64_t rank(int64_t slot) const { return std::min<int64_t>(std::max<int32_t>(ranks[slot], 0), r_max); }

  // buf[order[i], j0 : j0 + kRankBlock] for rows [i0, i1): the rank columns computed, the rest 0.
  void shrink(const Segment& sg, int64_t j0, int64_t i0, int64_t i1, std::vector<float>& part) const {
    const int64_t nr = i1 - i0;
    const int64_t nj = std::max<int64_t>(0, std::min(kRankBlock, rank(sg.slot) - j0));  // rank columns computed
    const int64_t width = std::min(kRankBlock, r_max - j0);                              // columns written
    part.assign(nr * kRankBlock, 0.0f);  // [nr][kRankBlock]
    const T* a0 = a + sg.slot * a_slot + j0 * a_row;
    const float* X0 = X + (i0 - first) * Kp;
#if defined(__x86_64__)
    if (avx512) {
      shrink_tile_avx512<T>(a0, a_row, X0, Kp, in, nr, nj, part.data());
    } else
#endif
    {
      std::vector<float> tmp(nr * nj);
      bool done = false;
#if defined(__x86_64__)
      if constexpr (std::is_same_v<T, float>) {
        if (avx2) {
          shrink_avx2(a0, a_row, nj, X0, Kp, in, nr, tmp.data());
          done = true;
        }
      }
#endif
      if (!done) shrink_generic<T>(a0, a_row, nj, X0, Kp, in, nr, tmp.data());
      for (int64_t i = 0; i < nr; ++i)
        for (int64_t j = 0; j < nj; ++j) part[i * kRankBlock + j] = tmp[i * nj + j];
    }
    for (int64_t i = 0; i < nr; ++i)
      std::memcpy(buf + static_cast<int64_t>(order[i0 + i]) * b_stride + j0, part.data() + i * kRankBlock,
                  width * sizeof(float));
  }

  // y[order[i], n0 : n0 + nb] += scaling * round(buf[order[i], :rank]) @ bt[slot, :rank, n0 : n0 + nb].
  void expand(const Segment& sg, int64_t n0, int64_t nb, int64_t i0, int64_t i1, std::vector<float>& w,
              std::vector<float>& acc) const {
    const int64_t nr = i1 - i0, r = rank(sg.slot);
    if (r == 0) return;  // this slot's delta leaves the projection alone: y + 0 rounds to y
    const float scale = scaling[sg.slot];
    w.resize(nr * r);  // the buffer rounded to the weights' dtype, as the reference does before the product
    for (int64_t i = 0; i < nr; ++i) {
      const float* src = buf + static_cast<int64_t>(order[i0 + i]) * b_stride;
      for (int64_t k = 0; k < r; ++k) w[i * r + k] = to_f32<T>(from_f32<T>(src[k]));
    }
    const int64_t width = 16 * ((nb + 15) / 16);  // accumulator rows padded to whole 16-float chunks
    acc.assign(nr * width, 0.0f);
    const T* t0 = bt + sg.slot * t_slot + n0;
    bool done = false;
#if defined(__x86_64__)
    if (avx512) {
      int64_t i = 0;
      for (; i + 4 <= nr; i += 4) expand_rows<T, 4>(t0, t_row, r, w.data() + i * r, r, nb, acc.data() + i * width, width);
      for (; i < nr; ++i) expand_rows<T, 1>(t0, t_row, r, w.data() + i * r, r, nb, acc.data() + i * width, width);
      done = true;
    }
#endif
    if (!done)
      for (int64_t i = 0; i < nr; ++i)
        for (int64_t k = 0; k < r; ++k) {
          const float wk = w[i * r + k];
          const T* row = t0 + k * t_row;
          float* acc_i = acc.data() + i * width;
          for (int64_t n = 0; n < nb; ++n) acc_i[n] += wk * to_f32<T>(row[n]);
        }
    for (int64_t i = 0; i < nr; ++i) {
      T* yr = y + static_cast<int64_t>(order[i0 + i]) * y_stride + n0;
      const float* acc_i = acc.data() + i * width;
      for (int64_t n = 0; n < nb; ++n) yr[n] = from_f32<T>(to_f32<T>(yr[n]) + scale * acc_i[n]);
    }
  }
};

// Rows of the segments cut for the threads: whole segments when there are enough of them, else row chunks (one
// tenant's many rows) so that every thread has work. (segment index, i0, i1).
std::vector<std::array<int64_t, 3>> row_items(const std::vector<Segment>& segs) {
  const int64_t threads = at::get_num_threads(), n_segs = static_cast<int64_t>(segs.size());
  const int64_t rows = segs.back().end - segs.front().start;
  const int64_t chunk =
      n_segs >= 2 * threads ? INT64_MAX : std::max<int64_t>(4, 4 * ((rows + 16 * threads - 1) / (16 * threads)));
  std::vector<std::array<int64_t, 3>> items;
  for (int64_t g = 0; g < n_segs; ++g)
    for (int64_t i0 = segs[g].start; i0 < segs[g].end;) {
      const int64_t i1 = i0 + std::min(chunk, segs[g].end - i0);
      items.push_back({g, i0, i1});
      i0 = i1;
    }
  return items;
}

template <typename T>
void gather(Lora<T>& L, const torch::Tensor& x, const std::vector<Segment>& segs) {
  L.in = x.size(1);
  L.Kp = 16 * ((L.in + 15) / 16);
  L.first = segs.front().start;
  const int64_t rows = segs.back().end - L.first;
  static thread_local std::vector<float> xbuf;
  if (static_cast<int64_t>(xbuf.size()) < rows * L.Kp) xbuf.resize(rows * L.Kp);
  float* X = xbuf.data();
  at::parallel_for(0, rows, 16, [&](int64_t b, int64_t e) {
    gather_rows_f32(x, L.order, L.first + b, L.first + e, L.Kp, X + b * L.Kp);
  });
  L.X = X;
}

template <typename T>
void set_a(Lora<T>& L, const torch::Tensor& a) {
  L.a = a.data_ptr<T>();
  L.a_slot = a.stride(0);
  L.a_row = a.stride(1);
  L.r_max = a.size(1);
}

template <typename T>
void set_bt(Lora<T>& L, const torch::Tensor& bt, const torch::Tensor& y, const float* scaling) {
  L.bt = bt.data_ptr<T>();
  L.t_slot = bt.stride(0);
  L.t_row = bt.stride(1);
  L.r_max = bt.size(1);
  L.out = y.size(1);
  L.y = y.data_ptr<T>();
  L.y_stride = y.stride(0);
  L.scaling = scaling;
}

// What every pass sets first: the rows' order, the slots' ranks, the shrink buffer, the ISA.
template <typename T>
Lora<T> rows_of(const int32_t* ranks, const torch::Tensor& order, const torch::Tensor& buf) {
  Lora<T> L;
  L.order = order.data_ptr<int32_t>();
  L.ranks = ranks;
  L.buf = buf.data_ptr<float>();
  L.b_stride = buf.stride(0);
  L.avx512 = use_avx512();
  L.avx2 = use_avx2();
  return L;
}

template <typename T>
void run_shrink(torch::Tensor& buf, const torch::Tensor& x, const torch::Tensor& a, const int32_t* ranks,
                const torch::Tensor& order, const std::vector<Segment>& segs) {
  Lora<T> L = rows_of<T>(ranks, order, buf);
  gather(L, x, segs);
  set_a(L, a);
  const auto items = row_items(segs);
  const int64_t blocks = (L.r_max + kRankBlock - 1) / kRankBlock;
  at::parallel_for(0, static_cast<int64_t>(items.size()) * blocks, 1, [&](int64_t b, int64_t e) {
    std::vector<float> part;
    for (int64_t it = b; it < e; ++it) {
      const auto& [g, i0, i1] = items[it / blocks];
      L.shrink(segs[g], (it % blocks) * kRankBlock, i0, i1, part);
    }
  });
}

template <typename T>
void run_expand(torch::Tensor& y, const torch::Tensor& buf, const torch::Tensor& bt, const float* scaling,
                const int32_t* ranks, const torch::Tensor& order, const std::vector<Segment>& segs) {
  Lora<T> L = rows_of<T>(ranks, order, buf);
  set_bt(L, bt, y, scaling);
  // Work items: each segment's outputs cut into as few blocks as still give every thread work; a block streams
  // whole runs of B's rows (a segment alone in the step is split, many segments keep theirs whole).
  const int64_t threads = at::get_num_threads(), n_segs = static_cast<int64_t>(segs.size());
  const int64_t want = std::max<int64_t>(1, (2 * threads + n_segs - 1) / n_segs);
  const int64_t block = 16 * ((L.out + 16 * want - 1) / (16 * want));
  const int64_t blocks = (L.out + block - 1) / block;
  at::parallel_for(0, n_segs * blocks, 1, [&](int64_t b, int64_t e) {
    std::vector<float> w, acc;
    for (int64_t it = b; it < e; ++it) {
      const Segment& sg = segs[it / blocks];
      const int64_t n0 = (it % blocks) * block;
      L.expand(sg, n0, std::min(block, L.out - n0), sg.start, sg.end, w, acc);
    }
  });
}

// Shrink and expand in one pass per item: a segment's A and then its B stream back to back, with one parallel
// region and one call per projection (at decode the fixed cost of a call is a fair share of a small LoRA's time).
template <typename T>
void run_apply(torch::Tensor& y, const torch::Tensor& x, const torch::Tensor& a, const torch::Tensor& bt,
               const float* scaling, const int32_t* ranks, const torch::Tensor& order, const std::vector<Segment>& segs,
               torch::Tensor& buf) {
  Lora<T> L = rows_of<T>(ranks, order, buf);
  gather(L, x, segs);
  set_a(L, a);
  set_bt(L, bt, y, scaling);
  const auto items = row_items(segs);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t b, int64_t e) {
    std::vector<float> part, w, acc;
    for (int64_t it = b; it < e; ++it) {
      const auto& [g, i0, i1] = items[it];
      for (int64_t j0 = 0; j0 < L.r_max; j0 += kRankBlock) L.shrink(segs[g], j0, i0, i1, part);
      L.expand(segs[g], 0, L.out, i0, i1, w, acc);
    }
  });
}

void check_common(const torch::Tensor& order, const torch::Tensor& ranks) {
  TORCH_CHECK(order.scalar_type() == torch::kInt32 && order.is_contiguous() && order.device().is_cpu(),
              "order must be contiguous CPU int32");
  TORCH_CHECK(ranks.scalar_type() == torch::kInt32 && ranks.is_contiguous() && ranks.device().is_cpu(),
              "ranks must be contiguous CPU int32");
}

}  // namespace

// buf: [N, r_max] float32 (unit column stride), x: [N, in], a: [S, r_max, in] x's dtype (unit innermost stride),
// ranks: [S] int32, order: [R] int32, segments: [n, 3] int64.
void lora_shrink_cpu(torch::Tensor buf, torch::Tensor x, torch::Tensor a, torch::Tensor ranks, torch::Tensor order,
                     torch::Tensor segments) {
  check_common(order, ranks);
  TORCH_CHECK(buf.scalar_type() == torch::kFloat && buf.stride(1) == 1 && x.stride(1) == 1 && a.stride(2) == 1,
              "lora_shrink_cpu: layout");
  const auto segs = read_segments(segments, order.size(0), a.size(0));
  if (segs.empty() || buf.size(1) == 0) return;
  const int32_t* rk = ranks.data_ptr<int32_t>();
  dispatch_float(a.scalar_type(), "a", [&](auto t) { run_shrink<decltype(t)>(buf, x, a, rk, order, segs); });
}

// y: [N, out] (unit column stride), buf: [N, r_max] float32, bt: [S, r_max, out] y's dtype, scaling: [S] float32,
// ranks: [S] int32, order: [R] int32, segments: [n, 3] int64.
void lora_expand_cpu(torch::Tensor y, torch::Tensor buf, torch::Tensor bt, torch::Tensor scaling, torch::Tensor ranks,
                     torch::Tensor order, torch::Tensor segments) {
  check_common(order, ranks);
  TORCH_CHECK(y.stride(1) == 1 && buf.stride(1) == 1 && bt.stride(2) == 1 && scaling.is_contiguous() &&
                  scaling.scalar_type() == torch::kFloat,
              "lora_expand_cpu: layout");
  const auto segs = read_segments(segments, order.size(0), bt.size(0));
  if (segs.empty() || y.size(1) == 0) return;
  const int32_t* rk = ranks.data_ptr<int32_t>();
  const float* sc = scaling.data_ptr<float>();
  dispatch_float(y.scalar_type(), "y", [&](auto t) { run_expand<decltype(t)>(y, buf, bt, sc, rk, order, segs); });
}

// lora_shrink_cpu then lora_expand_cpu in one call (same arguments as both; buf is written as shrink writes it).
void lora_apply_cpu(torch::Tensor y, torch::Tensor x, torch::Tensor a, torch::Tensor bt, torch::Tensor scaling,
                    torch::Tensor ranks, torch::Tensor order, torch::Tensor segments, torch::Tensor buf) {
  check_common(order, ranks);
  TORCH_CHECK(buf.scalar_type() == torch::kFloat && buf.stride(1) == 1 && x.stride(1) == 1 && a.stride(2) == 1 &&
                  y.stride(1) == 1 && bt.stride(2) == 1 && scaling.is_contiguous() &&
                  scaling.scalar_type() == torch::kFloat && a.size(1) == bt.size(1) && a.scalar_type() == y.scalar_type() &&
                  bt.scalar_type() == y.scalar_type(),
              "lora_apply_cpu: layout");
  const auto segs = read_segments(segments, order.size(0), a.size(0));
  if (segs.empty() || buf.size(1) == 0) return;
  const int32_t* rk = ranks.data_ptr<int32_t>();
  const float* sc = scaling.data_ptr<float>();
  dispatch_float(y.scalar_type(), "y", [&](auto t) { run_apply<decltype(t)>(y, x, a, bt, sc, rk, order, segs, buf); });
}

}  // namespace deltaserve
