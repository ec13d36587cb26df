// LoRA on the CPU, segmented (SGMV): each slot's A and B are read once per call for all of its rows.
//
//   shrink:  buf[i, r] = x[i] . a[s, r]  for r < rank[s], 0 up to r_max        (float32 accumulation)
//   expand:  y[i] += scaling[s] * sum_{r < rank[s]} round(buf[i, r]) * bt[s, r, :]
// where round() is the weights' dtype, as the torch reference and the Triton kernel do. One call per projection
// covers every tenant of the step, so the Python overhead does not grow with the number of tenants.
#include "delta_cpu.h"

#include <ATen/Parallel.h>

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
      // Each A row is a short stream (in * sizeof(T) bytes) the hardware prefetcher barely ramps up on: fetch the
      // row NJ further on (the next pass, or the next slot's) while this one computes.
      _mm_prefetch(reinterpret_cast<const char*>(a + (j + NJ) * a_stride + k), _MM_HINT_T0);
      const __m512 av = load16<T>(a + j * a_stride + k, m);
      for (int i = 0; i < NR; ++i) acc[j][i] = _mm512_fmadd_ps(av, xv[i], acc[j][i]);
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < NJ; ++j) out[i * NJ + j] = _mm512_reduce_add_ps(acc[j][i]);
}

// out[i][j] (row stride kRankBlock) = X[i] . A[j] for nr rows and nj <= kRankBlock rank rows: register tiles of
// 4 rank rows x 4 activation rows, or 8 rank rows x 1 row for what is left (a decode row).
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
    for (int64_t j = 0; j < nj; j += 8) {
      const int64_t g = std::min<int64_t>(8, nj - j);
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

template <typename T>
void run_shrink(torch::Tensor& buf, const torch::Tensor& x, const torch::Tensor& a, const int32_t* ranks,
                const torch::Tensor& order, const std::vector<Segment>& segs) {
  const int64_t in = x.size(1), r_max = a.size(1);
  const int64_t Kp = 16 * ((in + 15) / 16);
  const int32_t* ord = order.data_ptr<int32_t>();
  const int64_t first = segs.front().start, rows = segs.back().end - first;
  static thread_local std::vector<float> xbuf;
  if (static_cast<int64_t>(xbuf.size()) < rows * Kp) xbuf.resize(rows * Kp);
  float* X = xbuf.data();
  at::parallel_for(0, rows, 16, [&](int64_t b, int64_t e) { gather_rows_f32(x, ord, first + b, first + e, Kp, X + b * Kp); });

  const T* ap = a.data_ptr<T>();
  const int64_t a_slot = a.stride(0), a_row = a.stride(1);
  float* bp = buf.data_ptr<float>();
  const int64_t b_stride = buf.stride(0);
  const bool avx512 = use_avx512();

  // Work items: (segment, block of kRankBlock rank columns, rows). A step with few segments (one tenant's many
  // rows) also splits rows, so every thread has work.
  struct Item {
    int64_t seg, j0, i0, i1;
  };
  const int64_t threads = at::get_num_threads();
  const int64_t n_segs = static_cast<int64_t>(segs.size());
  const int64_t row_chunk = n_segs >= 2 * threads ? INT64_MAX : std::max<int64_t>(4, 4 * ((rows + 16 * threads - 1) / (16 * threads)));
  std::vector<Item> items;
  for (int64_t g = 0; g < n_segs; ++g)
    for (int64_t j0 = 0; j0 < r_max; j0 += kRankBlock)
      for (int64_t i0 = segs[g].start; i0 < segs[g].end;) {
        const int64_t i1 = i0 + std::min(row_chunk, segs[g].end - i0);
        items.push_back({g, j0, i0, i1});
        i0 = i1;
      }

  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t b, int64_t e) {
    std::vector<float> part;
    for (int64_t it = b; it < e; ++it) {
      const Item& item = items[it];
      const Segment& sg = segs[item.seg];
      const int64_t nr = item.i1 - item.i0;
      const int64_t rank = std::min<int64_t>(std::max<int32_t>(ranks[sg.slot], 0), r_max);
      const int64_t nj = std::max<int64_t>(0, std::min(kRankBlock, rank - item.j0));  // rank columns computed
      const int64_t width = std::min(kRankBlock, r_max - item.j0);                     // columns written
      part.assign(nr * kRankBlock, 0.0f);  // [nr][kRankBlock]; columns at and past the rank stay 0
      const T* a0 = ap + sg.slot * a_slot + item.j0 * a_row;
      const float* X0 = X + (item.i0 - first) * Kp;
#if defined(__x86_64__)
      if (avx512) {
        shrink_tile_avx512<T>(a0, a_row, X0, Kp, in, nr, nj, part.data());
      } else
#endif
      {
        std::vector<float> tmp(nr * nj);
        shrink_generic<T>(a0, a_row, nj, X0, Kp, in, nr, tmp.data());
        for (int64_t i = 0; i < nr; ++i)
          for (int64_t j = 0; j < nj; ++j) part[i * kRankBlock + j] = tmp[i * nj + j];
      }
      for (int64_t i = 0; i < nr; ++i) {
        float* dst = bp + static_cast<int64_t>(ord[item.i0 + i]) * b_stride + item.j0;
        std::memcpy(dst, part.data() + i * kRankBlock, width * sizeof(float));
      }
    }
  });
}

template <typename T>
void run_expand(torch::Tensor& y, const torch::Tensor& buf, const torch::Tensor& bt, const float* scaling,
                const int32_t* ranks, const torch::Tensor& order, const std::vector<Segment>& segs) {
  const int64_t out = y.size(1), r_max = bt.size(1);
  const int32_t* ord = order.data_ptr<int32_t>();
  const float* bp = buf.data_ptr<float>();
  const int64_t b_stride = buf.stride(0);
  const T* tp = bt.data_ptr<T>();
  const int64_t t_slot = bt.stride(0), t_row = bt.stride(1);
  T* yp = y.data_ptr<T>();
  const int64_t y_stride = y.stride(0);
  // Work items: each segment's outputs cut into as few blocks as still give every thread work; a block streams
  // whole runs of B's rows (a segment alone in the step is split, many segments keep theirs whole).
  const int64_t threads = at::get_num_threads();
  const int64_t want = std::max<int64_t>(1, (2 * threads + static_cast<int64_t>(segs.size()) - 1) /
                                                static_cast<int64_t>(segs.size()));
  const int64_t kOutBlock = 16 * ((out + 16 * want - 1) / (16 * want));
  const int64_t blocks = (out + kOutBlock - 1) / kOutBlock;
  const int64_t items = static_cast<int64_t>(segs.size()) * blocks;
  const bool avx512 = use_avx512();
  at::parallel_for(0, items, 1, [&](int64_t b, int64_t e) {
    std::vector<float> w, acc;
    for (int64_t item = b; item < e; ++item) {
      const Segment& sg = segs[item / blocks];
      const int64_t n0 = (item % blocks) * kOutBlock;
      const int64_t nb = std::min(kOutBlock, out - n0);
      const int64_t nr = sg.end - sg.start;
      const int64_t rank = std::min<int64_t>(std::max<int32_t>(ranks[sg.slot], 0), r_max);
      const float scale = scaling[sg.slot];
      if (rank == 0) continue;  // this slot's delta leaves the projection alone: y + 0 rounds to y
      // The buffer rounded to the weights' dtype, as the reference does before the product.
      w.resize(nr * std::max<int64_t>(rank, 1));
      for (int64_t i = 0; i < nr; ++i) {
        const float* src = bp + static_cast<int64_t>(ord[sg.start + i]) * b_stride;
        for (int64_t r = 0; r < rank; ++r) w[i * rank + r] = to_f32<T>(from_f32<T>(src[r]));
      }
      acc.assign(nr * kOutBlock, 0.0f);  // [nr][kOutBlock], a multiple of 16 floats per row
      const T* t0 = tp + sg.slot * t_slot + n0;
      bool done = false;
#if defined(__x86_64__)
      if (avx512) {
        int64_t i = 0;
        for (; i + 4 <= nr; i += 4)
          expand_rows<T, 4>(t0, t_row, rank, w.data() + i * rank, rank, nb, acc.data() + i * kOutBlock, kOutBlock);
        for (; i < nr; ++i)
          expand_rows<T, 1>(t0, t_row, rank, w.data() + i * rank, rank, nb, acc.data() + i * kOutBlock, kOutBlock);
        done = true;
      }
#endif
      if (!done) {
        for (int64_t i = 0; i < nr; ++i)
          for (int64_t r = 0; r < rank; ++r) {
            const float wr = w[i * rank + r];
            const T* row = t0 + r * t_row;
            float* a = acc.data() + i * kOutBlock;
            for (int64_t n = 0; n < nb; ++n) a[n] += wr * to_f32<T>(row[n]);
          }
      }
      for (int64_t i = 0; i < nr; ++i) {
        T* yr = yp + static_cast<int64_t>(ord[sg.start + i]) * y_stride + n0;
        const float* a = acc.data() + i * kOutBlock;
        for (int64_t n = 0; n < nb; ++n) yr[n] = from_f32<T>(to_f32<T>(yr[n]) + scale * a[n]);
      }
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
  switch (a.scalar_type()) {
    case torch::kFloat: run_shrink<float>(buf, x, a, rk, order, segs); break;
    case torch::kBFloat16: run_shrink<c10::BFloat16>(buf, x, a, rk, order, segs); break;
    case torch::kHalf: run_shrink<c10::Half>(buf, x, a, rk, order, segs); break;
    default: TORCH_CHECK(false, "unsupported dtype ", a.scalar_type());
  }
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
  switch (y.scalar_type()) {
    case torch::kFloat: run_expand<float>(y, buf, bt, sc, rk, order, segs); break;
    case torch::kBFloat16: run_expand<c10::BFloat16>(y, buf, bt, sc, rk, order, segs); break;
    case torch::kHalf: run_expand<c10::Half>(y, buf, bt, sc, rk, order, segs); break;
    default: TORCH_CHECK(false, "unsupported dtype ", y.scalar_type());
  }
}

}  // namespace deltaserve
