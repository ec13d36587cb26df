// 1-bit deltas on the CPU: y[i] += scale[s] * (x[i] . sign[s]) for every row i of every segment of slot s,
// reading each slot's packed signs once per call and never unpacking them into floats.
//
// Lookup tables over groups of 4 sign bits (the T-MAC / bitnet.cpp idea, kept in float32 so the result is the
// reference's up to summation order): for each row x and each group g of 4 input columns, the 16 possible
// signed sums  T[g][b] = sum_{j<4} (bit j of b ? +x[4g+j] : -x[4g+j])  fill one 16-float vector. A sign nibble
// is then an index into T[g], and 16 output features are served by one permute of T[g] by their 16 nibbles
// (vpermps) and one add: 64 sign-multiply-adds per two instructions, the signs still packed.
//
// That needs the nibbles of 16 outputs side by side, so the CPU backend keeps its slot pool in the "blocked16"
// layout (deltakernels/bitdelta.py, interleave_signs): signs[s, b, kb, i] = the contract's sign byte kb of output
// row 16b + i (zero for rows past `out`): byte kb holds input columns 8kb..8kb+7, low nibble first (group 2kb),
// bit j of a nibble = column 4g + j, exactly the contract's bit order. Activation columns past `in` are zero in
// the tables, so padding bits count for nothing whatever their value.
#include "delta_cpu.h"

#include <ATen/Parallel.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace deltaserve {
namespace {

constexpr int64_t kBlock = 16;         // output rows per interleaved sign block
constexpr int64_t kBlocksPerItem = 4;  // 64 outputs per work item: 4 * 16 * W sign bytes stay in L1/L2

struct Problem {
  const float* tables;  // [R, G, 16] one table set per gathered row, G = 2W groups of 4 columns
  int64_t G;
  int64_t W;
  const uint8_t* signs;  // [S, OB, W, 16]
  int64_t sign_slot_stride;
  const float* scales;  // [S, out]
  int64_t scale_slot_stride;
  int64_t out;
};

// T[g][b] for every group of one row: x is the row in float32, zero-padded to 4 * G columns.
void build_tables_generic(const float* x, int64_t G, float* T) {
  for (int64_t g = 0; g < G; ++g) {
    const float* xg = x + 4 * g;
    for (int b = 0; b < 16; ++b) {
      float s = 0.0f;
      for (int j = 0; j < 4; ++j) s += ((b >> j) & 1) ? xg[j] : -xg[j];
      T[g * 16 + b] = s;
    }
  }
}

// delta[r][i], i < 16, for rows r0..r0+nr of the tables and one 16-output block, portable code.
void block_generic(const Problem& p, const uint8_t* blk, int64_t r0, int64_t nr, float* delta) {
  for (int64_t r = 0; r < nr; ++r) {
    const float* T = p.tables + (r0 + r) * p.G * 16;
    for (int i = 0; i < 16; ++i) {
      float acc = 0.0f;
      for (int64_t kb = 0; kb < p.W; ++kb) {
        const unsigned b = blk[kb * 16 + i];
        acc += T[(2 * kb) * 16 + (b & 15u)] + T[(2 * kb + 1) * 16 + (b >> 4)];
      }
      delta[r * 16 + i] = acc;
    }
  }
}

#if defined(__x86_64__)
// v[j][b] = +1 when bit j of b is set, else -1: column j's sign in each of a table's 16 sums (both SIMD builders).
struct SignPatterns {
  alignas(64) float v[4][16];
  SignPatterns() {
    for (int j = 0; j < 4; ++j)
      for (int b = 0; b < 16; ++b) v[j][b] = ((b >> j) & 1) ? 1.0f : -1.0f;
  }
};

const SignPatterns& sign_patterns() {
  static const SignPatterns patterns;
  return patterns;
}

// AVX2 (no 16-lane permute): a table T[g] is two 8-float halves; a nibble's low 3 bits pick a lane of both
// (vpermps ymm) and its bit 3 chooses the half (vblendvps on that bit moved to the sign): 8 outputs per
// 3 instructions instead of 16 per one, still 4 columns per lookup and the signs never unpacked.
__attribute__((target("avx2,fma"))) void build_tables_avx2(const float* x, int64_t G, float* T) {
  const auto& pat = sign_patterns().v;
  for (int h = 0; h < 2; ++h) {
    const __m256 p0 = _mm256_load_ps(pat[0] + 8 * h), p1 = _mm256_load_ps(pat[1] + 8 * h),
                 p2 = _mm256_load_ps(pat[2] + 8 * h), p3 = _mm256_load_ps(pat[3] + 8 * h);
    for (int64_t g = 0; g < G; ++g) {
      const float* xg = x + 4 * g;
      __m256 t = _mm256_mul_ps(_mm256_set1_ps(xg[0]), p0);
      t = _mm256_fmadd_ps(_mm256_set1_ps(xg[1]), p1, t);
      t = _mm256_fmadd_ps(_mm256_set1_ps(xg[2]), p2, t);
      t = _mm256_fmadd_ps(_mm256_set1_ps(xg[3]), p3, t);
      _mm256_storeu_ps(T + g * 16 + 8 * h, t);
    }
  }
}

// T[idx & 15] for 8 lanes (idx's bits above 3 are ignored): the table's halves t0 (entries 0-7) and t1 (8-15).
__attribute__((target("avx2,fma"))) inline __m256 lookup16_avx2(__m256 t0, __m256 t1, __m256i idx) {
  const __m256 lo = _mm256_permutevar8x32_ps(t0, idx), hi = _mm256_permutevar8x32_ps(t1, idx);
  return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

// delta[r][i], i < 16, for rows r0..r0+nr of the tables and one 16-output block (as block_generic).
__attribute__((target("avx2,fma"))) void block_avx2(const Problem& p, const uint8_t* blk, int64_t r0, int64_t nr,
                                                    float* delta) {
  for (int64_t r = 0; r < nr; ++r) {
    const float* T = p.tables + (r0 + r) * p.G * 16;
    __m256 acc[2][2] = {{_mm256_setzero_ps(), _mm256_setzero_ps()}, {_mm256_setzero_ps(), _mm256_setzero_ps()}};
    for (int64_t kb = 0; kb < p.W; ++kb) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + kb * 16));
      if ((kb & 3) == 0) _mm_prefetch(reinterpret_cast<const char*>(blk + (kb + 8) * 16), _MM_HINT_T0);
      const __m256i b[2] = {_mm256_cvtepu8_epi32(bytes), _mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8))};
      const float* te = T + (2 * kb) * 16;
      const float* to = te + 16;
      const __m256 e0 = _mm256_loadu_ps(te), e1 = _mm256_loadu_ps(te + 8);
      const __m256 o0 = _mm256_loadu_ps(to), o1 = _mm256_loadu_ps(to + 8);
      for (int h = 0; h < 2; ++h) {  // outputs 8h..8h+7: the low nibble looks up the even group, the high the odd
        acc[h][0] = _mm256_add_ps(acc[h][0], lookup16_avx2(e0, e1, b[h]));
        acc[h][1] = _mm256_add_ps(acc[h][1], lookup16_avx2(o0, o1, _mm256_srli_epi32(b[h], 4)));
      }
    }
    for (int h = 0; h < 2; ++h) _mm256_storeu_ps(delta + r * 16 + 8 * h, _mm256_add_ps(acc[h][0], acc[h][1]));
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) void build_tables_avx512(const float* x, int64_t G, float* T) {
  const auto& pat = sign_patterns().v;
  const __m512 p0 = _mm512_load_ps(pat[0]), p1 = _mm512_load_ps(pat[1]), p2 = _mm512_load_ps(pat[2]),
               p3 = _mm512_load_ps(pat[3]);
  for (int64_t g = 0; g < G; ++g) {
    const float* xg = x + 4 * g;
    __m512 t = _mm512_mul_ps(_mm512_set1_ps(xg[0]), p0);
    t = _mm512_fmadd_ps(_mm512_set1_ps(xg[1]), p1, t);
    t = _mm512_fmadd_ps(_mm512_set1_ps(xg[2]), p2, t);
    t = _mm512_fmadd_ps(_mm512_set1_ps(xg[3]), p3, t);
    _mm512_storeu_ps(T + g * 16, t);
  }
}


// NR rows x NB consecutive 16-output blocks. Each table vector loaded serves the NB blocks (the tables are the
// larger stream: 128 bytes per 16 sign bytes), and the NB x NR x 2 (even and odd group) accumulators are
// independent add chains, so neither the table loads nor the adds' latency bound the loop.
template <int NB, int NR>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void blocks_avx512(const Problem& p, const uint8_t* blk,
                                                                        int64_t r0, float* delta /*[NB][NR][16]*/) {
  const int64_t block_bytes = p.W * kBlock;
  __m512 acc[NB][NR][2];
  const float* T[NR];
  for (int r = 0; r < NR; ++r) T[r] = p.tables + (r0 + r) * p.G * 16;
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < NR; ++r) acc[b][r][0] = acc[b][r][1] = _mm512_setzero_ps();
  for (int64_t kb = 0; kb < p.W; ++kb) {
    __m512i lo[NB], hi[NB];
    for (int b = 0; b < NB; ++b) {
      const uint8_t* src = blk + b * block_bytes + kb * 16;
      // Decode is bound by the DRAM stream of signs: fetch the next work item's line (the same spot NB blocks
      // on) once per 64-byte line, so it arrives while this one computes.
      if ((kb & 3) == 0) _mm_prefetch(reinterpret_cast<const char*>(src + NB * block_bytes), _MM_HINT_T0);
      lo[b] = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
      hi[b] = _mm512_srli_epi32(lo[b], 4);  // vpermps reads the low 4 bits of an index: lo needs no mask
    }
    for (int r = 0; r < NR; ++r) {
      const __m512 t_even = _mm512_loadu_ps(T[r] + (2 * kb) * 16);
      const __m512 t_odd = _mm512_loadu_ps(T[r] + (2 * kb + 1) * 16);
      for (int b = 0; b < NB; ++b) {
        acc[b][r][0] = _mm512_add_ps(acc[b][r][0], _mm512_permutexvar_ps(lo[b], t_even));
        acc[b][r][1] = _mm512_add_ps(acc[b][r][1], _mm512_permutexvar_ps(hi[b], t_odd));
      }
    }
  }
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < NR; ++r)
      _mm512_storeu_ps(delta + (b * NR + r) * 16, _mm512_add_ps(acc[b][r][0], acc[b][r][1]));
}

// delta[b][r][i] for nb (<= 4) consecutive blocks and rows r0..r0+nr: register tiles of 4 blocks x 1 row for
// decode rows, 2 blocks x 4 rows for prefills.
void tile_avx512(const Problem& p, const uint8_t* blk, int64_t r0, int64_t nr, int64_t nb, float* delta) {
  const int64_t block_bytes = p.W * kBlock;
  for (int64_t r = 0; r < nr;) {
    const int64_t rows = nr - r >= 4 ? 4 : 1;
    for (int64_t b = 0; b < nb;) {
      const int64_t blocks = rows == 4 ? std::min<int64_t>(2, nb - b) : std::min<int64_t>(4, nb - b);
      float tmp[4 * 4 * 16];
      const uint8_t* src = blk + b * block_bytes;
      if (rows == 4) {
        if (blocks == 2)
          blocks_avx512<2, 4>(p, src, r0 + r, tmp);
        else
          blocks_avx512<1, 4>(p, src, r0 + r, tmp);
      } else {
        switch (blocks) {
          case 4:
            blocks_avx512<4, 1>(p, src, r0 + r, tmp);
            break;
          case 3:
            blocks_avx512<3, 1>(p, src, r0 + r, tmp);
            break;
          case 2:
            blocks_avx512<2, 1>(p, src, r0 + r, tmp);
            break;
          default:
            blocks_avx512<1, 1>(p, src, r0 + r, tmp);
            break;
        }
      }
      for (int64_t bb = 0; bb < blocks; ++bb)
        for (int64_t rr = 0; rr < rows; ++rr)
          std::memcpy(delta + ((b + bb) * nr + r + rr) * 16, tmp + (bb * rows + rr) * 16, 16 * sizeof(float));
      b += blocks;
    }
    r += rows;
  }
}
#endif

template <typename T>
void run(torch::Tensor& y, const torch::Tensor& x, const torch::Tensor& signs, const torch::Tensor& scales,
         const torch::Tensor& order, const std::vector<Segment>& segs) {
  const int64_t out = y.size(1);
  const int64_t W = signs.size(2);
  const int64_t G = 2 * W, width = 4 * G;  // activations zero-padded to the packed width, 8W columns
  const int32_t* ord = order.data_ptr<int32_t>();
  const int64_t first = segs.front().start, rows = segs.back().end - first;
  const bool avx512 = use_avx512(), avx2 = use_avx2();

  // One table set per gathered row (segments are consecutive ranges of `order`), built once for all outputs.
  static thread_local std::vector<float> xbuf, tbuf;
  if (static_cast<int64_t>(xbuf.size()) < rows * width) xbuf.resize(rows * width);
  if (static_cast<int64_t>(tbuf.size()) < rows * G * 16) tbuf.resize(rows * G * 16);
  float* X = xbuf.data();
  float* tables = tbuf.data();
  at::parallel_for(0, rows, 8, [&](int64_t b, int64_t e) {
    gather_rows_f32(x, ord, first + b, first + e, width, X + b * width);
    for (int64_t r = b; r < e; ++r) {
#if defined(__x86_64__)
      if (avx512) {
        build_tables_avx512(X + r * width, G, tables + r * G * 16);
        continue;
      }
      if (avx2) {
        build_tables_avx2(X + r * width, G, tables + r * G * 16);
        continue;
      }
#endif
      build_tables_generic(X + r * width, G, tables + r * G * 16);
    }
  });

  const Problem p{tables, G, W, signs.data_ptr<uint8_t>(), signs.stride(0), scales.data_ptr<float>(),
                  scales.stride(0), out};
  const int64_t n_blocks = signs.size(1);
  const int64_t per_seg = (n_blocks + kBlocksPerItem - 1) / kBlocksPerItem;
  const int64_t items = static_cast<int64_t>(segs.size()) * per_seg;
  T* yp = y.data_ptr<T>();
  const int64_t y_stride = y.stride(0);

  at::parallel_for(0, items, 1, [&](int64_t b, int64_t e) {
    std::vector<float> delta;
    for (int64_t item = b; item < e; ++item) {
      const Segment& sg = segs[item / per_seg];
      const int64_t nr = sg.end - sg.start;
      if (nr == 0) continue;
      const int64_t r0 = sg.start - first;
      const int64_t b0 = (item % per_seg) * kBlocksPerItem, nb = std::min(n_blocks - b0, kBlocksPerItem);
      const uint8_t* bp = p.signs + sg.slot * p.sign_slot_stride + b0 * W * kBlock;
      delta.resize(nb * nr * 16);  // [block][row][16]
#if defined(__x86_64__)
      if (avx512)
        tile_avx512(p, bp, r0, nr, nb, delta.data());
      else if (avx2)
        for (int64_t blk = 0; blk < nb; ++blk) block_avx2(p, bp + blk * W * kBlock, r0, nr, delta.data() + blk * nr * 16);
      else
#endif
        for (int64_t blk = 0; blk < nb; ++blk) block_generic(p, bp + blk * W * kBlock, r0, nr, delta.data() + blk * nr * 16);
      const float* scale = p.scales + sg.slot * p.scale_slot_stride;
      for (int64_t blk = 0; blk < nb; ++blk) {
        const int64_t o0 = (b0 + blk) * kBlock, no = std::min(kBlock, out - o0);
        for (int64_t r = 0; r < nr; ++r) {
          T* yr = yp + static_cast<int64_t>(ord[sg.start + r]) * y_stride + o0;
          const float* d = delta.data() + (blk * nr + r) * 16;
          for (int64_t i = 0; i < no; ++i) yr[i] = from_f32<T>(to_f32<T>(yr[i]) + scale[o0 + i] * d[i]);
        }
      }
    }
  });
}

}  // namespace

// y: [N, out] (unit column stride), x: [N, in] y's dtype (unit column stride), signs: [S, ceil(out/16), W, 16]
// uint8 contiguous (the blocked16 layout, W = ceil(in/8)), scales: [S, out] float32, order: [R] int32,
// segments: [n, 3] int64 (slot, start, end) over consecutive ranges of order.
void bitdelta_apply_cpu(torch::Tensor y, torch::Tensor x, torch::Tensor signs, torch::Tensor scales,
                        torch::Tensor order, torch::Tensor segments) {
  TORCH_CHECK(y.device().is_cpu() && x.device().is_cpu() && signs.device().is_cpu() && scales.device().is_cpu(),
              "bitdelta_apply_cpu: CPU tensors only");
  TORCH_CHECK(y.stride(1) == 1 && x.stride(1) == 1, "bitdelta_apply_cpu: y and x need unit column stride");
  TORCH_CHECK(signs.scalar_type() == torch::kUInt8 && signs.dim() == 4 && signs.size(3) == kBlock &&
                  signs.stride(3) == 1 && signs.stride(2) == kBlock && signs.stride(1) == kBlock * signs.size(2),
              "bitdelta_apply_cpu: signs must be uint8 [S, ceil(out/16), W, 16] with contiguous slots");
  TORCH_CHECK(signs.size(1) * kBlock >= y.size(1) && signs.size(2) * 8 >= x.size(1),
              "bitdelta_apply_cpu: signs do not cover y's outputs or x's inputs");
  TORCH_CHECK(scales.scalar_type() == torch::kFloat && scales.stride(1) == 1, "bitdelta_apply_cpu: scales layout");
  TORCH_CHECK(order.scalar_type() == torch::kInt32 && order.is_contiguous(), "order must be contiguous int32");
  const auto segs = read_segments(segments, order.size(0), signs.size(0));
  if (segs.empty() || y.size(1) == 0) return;
  dispatch_float(y.scalar_type(), "y", [&](auto t) { run<decltype(t)>(y, x, signs, scales, order, segs); });
}

}  // namespace deltaserve
