// The 2:4 activation recipe's backward operands in one pass (jsparse.models.recipe, the fused cuSPARSELt path).
//
// The forward saved y1 = x W1 (T x F) and nothing else; the backward gets dy2 = dout W2^T (T x F). The recipe then
// needs, with mask = the 2:4 selection of relu(y1) along F (squared_relu_24_compress's) and r = relu(y1) * mask:
//
//   dy1 = 2 dy2 r          compressed 2:4 along F  -> dx  = dy1 W1^T   (cuSPARSELt A, T x F)
//   h   = r^2              compressed 2:4 along T  -> dW2 = h^T dout   (A = h^T,   F x T, pruned by |.| along T)
//   dy1                    compressed 2:4 along T  -> dW1 = dy1^T x    (A = dy1^T, F x T, pruned by |.| along T)
//
// plus the unpruned rows of h^T and dy1^T of the 95/5 split's dense features. Unfused, that is an XLA fusion reading
// y1 and dy2 and writing h and dy1 densely, then three compress passes reading them back (2.2 ms of the 7b FFN's
// backward on the H100, profiled); here y1 and dy2 are read once and only the compressed operands are written.
// Every output is bit for bit what the unfused path's kernels write from the XLA-computed h and dy1 (same float32
// arithmetic, same rounding, same selection functions), so the GEMMs compute the same numbers.
//
// relu_count_kernel is the split's ranking: per feature, how many tokens have a kept, positive relu(y1);
// relu24_compress_count_kernel computes it in the forward's squared-ReLU compress, so the backward need not read y1
// for it. Without the 2:4 activation (MASK24 false: S-STE weights with the token-wise 2:4 weight gradients), the
// forward's dense squared ReLU counts (relu_count_kernel's SQUARE_OUT) and the backward writes dy1 densely.
#pragma once

#include <cstdint>

#include "sparsify24.h"

namespace jsparse {

// keep bits of one group of 4 pre-activations (raw 16-bit), by relu key; r[i] = relu(y_i) where kept, else 0.
template <typename T>
__device__ __forceinline__ void masked_relu4(const uint16_t* y, float (&r)[4]) {
  float v[4], key[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    v[i] = Elem<T>::to_float(y[i]);
    key[i] = relu_key(v[i]);
  }
  const uint32_t keep = keep24(key);
#pragma unroll
  for (int i = 0; i < 4; ++i) r[i] = (keep >> i) & 1u ? relu_nan(v[i]) : 0.0f;
}

// r = relu(y) of 4 raw 16-bit values, 2:4-masked as masked_relu4 (MASK24: the activation recipe) or not (the FFN with
// only token-wise 2:4 weight gradients).
template <typename T, bool MASK24>
__device__ __forceinline__ void relu4(const uint16_t* y, float (&r)[4]) {
  if (MASK24) {
    masked_relu4<T>(y, r);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) r[i] = relu_nan(Elem<T>::to_float(y[i]));
  }
}

// A 256-thread block's counts of 64 features to global memory: thread (slot, c8l) holds cnt[k] for feature 8 c8l + k
// (32 slots); they meet in shared memory and leave as one atomic per feature (none for a zero sum).
__device__ __forceinline__ void flush_counts(const int (&cnt)[8], int slot, int c8l, int32_t* counts64) {
  __shared__ int32_t part[32][65];
#pragma unroll
  for (int k = 0; k < 8; ++k) part[slot][c8l * 8 + k] = cnt[k];
  __syncthreads();
  const int l = int(threadIdx.x);
  if (l < 64) {
    int s = 0;
#pragma unroll 8
    for (int j = 0; j < 32; ++j) s += part[j][l];
    if (s) atomicAdd(counts64 + l, s);
  }
}

// counts[f] += #{t : r[t, f] > 0} (NaN is not > 0), r = relu4<T, MASK24>(y); SQUARE_OUT: also h = r^2 (float32, one
// rounding, as the XLA reference) written densely to h (rows x cols). Grid (F / 64, ceil(T / kRows)), 256 threads;
// counts zeroed by the caller. Thread l reads 8 features (l & 7) of every 32nd token from row l >> 3 on; the block's
// 32 partial counts per feature meet in shared memory and leave as one atomic per feature.
template <typename T, bool MASK24, bool SQUARE_OUT>
__global__ void __launch_bounds__(256) relu_count_kernel(const uint16_t* __restrict__ y, int32_t* __restrict__ counts,
                                                         uint16_t* __restrict__ h, int64_t rows, int64_t cols) {
  constexpr int kRows = 256;
  const int l = int(threadIdx.x);
  const int c8l = l & 7, rl = l >> 3;
  const int64_t C0 = int64_t(blockIdx.x) * 64;
  const int64_t R0 = int64_t(blockIdx.y) * kRows;
  int cnt[8] = {0, 0, 0, 0, 0, 0, 0, 0};
#pragma unroll
  for (int i = 0; i < kRows / 32; ++i) {
    const int64_t r = R0 + rl + 32 * i;
    if (r < rows) {
      uint16_t e[8], sq[8];
      unpack8(__ldcs(reinterpret_cast<const uint4*>(y + r * cols + C0 + c8l * 8)), e);
#pragma unroll
      for (int g = 0; g < 2; ++g) {
        float rv[4];
        relu4<T, MASK24>(e + 4 * g, rv);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          cnt[4 * g + k] += rv[k] > 0.0f;
          if (SQUARE_OUT) sq[4 * g + k] = Elem<T>::from_float(rv[k] * rv[k]);
        }
      }
      if (SQUARE_OUT) *reinterpret_cast<uint4*>(h + r * cols + C0 + c8l * 8) = pack8(sq);
    }
  }
  flush_counts(cnt, rl, c8l, counts + C0);
}

// The kept positions (bit k: element k of 8) of two groups from their metadata nibbles (bits 0-3 and 4-7 of nib).
__device__ __forceinline__ uint32_t kept8(uint32_t nib) {
  const uint32_t n0 = nib & 15u, n1 = (nib >> 4) & 15u;
  return (1u << (n0 & 3u)) | (1u << (n0 >> 2)) | (((1u << (n1 & 3u)) | (1u << (n1 >> 2))) << 4);
}

// The forward's squared_relu_24_compress with the counts of relu_count_kernel<T, true, false>: relu(y)^2 2:4-selected and compressed
// as sparsify24_kernel<T, kActSquaredRelu> writes it, and counts[f] += the kept positive relu(y) of feature f, from
// one read of y. Grid (F / 64, ceil(T / 256)), 256 threads: four 64 x 64 tiles down the tokens per block, each with
// emit_pair's mapping; the block's partial counts leave as one atomic per feature. counts zeroed by the caller;
// requires T % 64 == 0.
template <typename T>
__global__ void __launch_bounds__(256) relu24_compress_count_kernel(const uint16_t* __restrict__ y,
                                                                    uint16_t* __restrict__ values,
                                                                    uint8_t* __restrict__ meta,
                                                                    int32_t* __restrict__ counts, int64_t rows,
                                                                    int64_t cols) {
  const int l = int(threadIdx.x);
  const auto [c8l, pair, rr, r0l] = tile_lane(l);
  const int64_t C0 = int64_t(blockIdx.x) * 64;
  const int64_t c8 = (C0 >> 3) + c8l;
  int cnt[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  // All four tiles' loads first: eight 16-byte loads in flight per thread.
  const int64_t R0 = int64_t(blockIdx.y) * 256;
  uint4 raw[4][2];
#pragma unroll
  for (int sub = 0; sub < 4; ++sub) {
    const int64_t r0 = R0 + sub * 64 + r0l;
    if (R0 + sub * 64 < rows) {  // whole 64-row tiles (rows % 64 == 0): uniform across the block
      raw[sub][0] = __ldcs(reinterpret_cast<const uint4*>(y + r0 * cols + c8 * 8));
      raw[sub][1] = __ldcs(reinterpret_cast<const uint4*>(y + (r0 + 8) * cols + c8 * 8));
    }
  }
#pragma unroll
  for (int sub = 0; sub < 4; ++sub) {
    const int64_t r0 = R0 + sub * 64 + r0l;
    if (R0 + sub * 64 >= rows) break;
    uint16_t a[8], b[8];
    unpack8(raw[sub][0], a);
    unpack8(raw[sub][1], b);
    // The selection's own metadata says which are kept; a kept relu(y) is positive exactly where y > 0 (NaN is not).
    const uint32_t nib = emit_pair<T, kActSquaredRelu, false>(a, b, r0, rr, c8, cols, values, meta, nullptr);
    const uint32_t ka = kept8(nib), kb = kept8(nib >> 8);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      cnt[k] += int(((ka >> k) & 1u) && Elem<T>::to_float(a[k]) > 0.0f) +
                int(((kb >> k) & 1u) && Elem<T>::to_float(b[k]) > 0.0f);
    }
  }
  flush_counts(cnt, pair, c8l, counts + C0);
}

// The three compressed operands (and the dense rows) from y1 and dy2, T x F row-major. One block per 64 x 64 tile
// (grid F / 64, T / 64; 256 threads). Thread l holds tokens t0 = T0 + r0l and t0 + 8 and features F0 + 8 c8l .. + 7
// -- emit_pair's mapping, so dy1 leaves compressed along F straight from registers; h and dy1 go through shared memory
// transposed (stride 66, as in sparsify24_t_kernel) and leave compressed along T with the same mapping on the
// transposed tile. slot[f] >= 0: feature f's unpruned h^T and dy1^T rows go to dense_h / dense_g[slot[f]] (T entries).
// DENSE_OUT: the three pruned operands are written densely to *_dense (dy1 T x F, h^T and dy1^T F x T) for the
// library's compress (the layout-mismatch fallback).
// MASK24 false (an FFN whose activation is not 2:4, e.g. S-STE weights, with the token-wise 2:4 weight gradients): r is
// the unmasked relu(y1), and dy1 -- the dense operand of its dense dx GEMM -- is written densely to dx_dense.
template <typename T, bool DENSE_OUT, bool MASK24>
__global__ void __launch_bounds__(256) recipe_bwd24_kernel(
    const uint16_t* __restrict__ y1, const uint16_t* __restrict__ dy2, const int32_t* __restrict__ slot,
    uint16_t* __restrict__ dx_values, uint8_t* __restrict__ dx_meta, uint16_t* __restrict__ h_values,
    uint8_t* __restrict__ h_meta, uint16_t* __restrict__ g_values, uint8_t* __restrict__ g_meta,
    uint16_t* __restrict__ dense_h, uint16_t* __restrict__ dense_g, uint16_t* __restrict__ dx_dense,
    uint16_t* __restrict__ h_dense, uint16_t* __restrict__ g_dense, int64_t rows, int64_t cols) {
  constexpr int kStride = 66;
  __shared__ __align__(16) uint16_t ht[64 * kStride];  // ht[f * kStride + t] = h[T0 + t][F0 + f]
  __shared__ __align__(16) uint16_t gt[64 * kStride];  // the same for dy1
  const int l = int(threadIdx.x);
  const auto [c8l, pair, rr, r0l] = tile_lane(l);
  const int64_t F0 = int64_t(blockIdx.x) * 64;
  const int64_t T0 = int64_t(blockIdx.y) * 64;

  uint16_t ya[8], yb[8], da[8], db[8];
  {
    const int64_t oa = (T0 + r0l) * cols + F0 + c8l * 8, ob = oa + 8 * cols;
    const uint4 v0 = __ldcs(reinterpret_cast<const uint4*>(y1 + oa));
    const uint4 v1 = __ldcs(reinterpret_cast<const uint4*>(y1 + ob));
    const uint4 v2 = __ldcs(reinterpret_cast<const uint4*>(dy2 + oa));
    const uint4 v3 = __ldcs(reinterpret_cast<const uint4*>(dy2 + ob));
    unpack8(v0, ya);
    unpack8(v1, yb);
    unpack8(v2, da);
    unpack8(v3, db);
  }
  uint16_t ga[8], gb[8];  // dy1 of tokens t0 and t0 + 8
#pragma unroll
  for (int g = 0; g < 2; ++g) {
    float ra[4], rb[4];
    relu4<T, MASK24>(ya + 4 * g, ra);
    relu4<T, MASK24>(yb + 4 * g, rb);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int c = 4 * g + k;
      const int f = c8l * 8 + c;
      // The reference's order: (2 * dy2) * r in float32, one rounding; h = r * r, one rounding.
      ga[c] = Elem<T>::from_float((2.0f * Elem<T>::to_float(da[c])) * ra[k]);
      gb[c] = Elem<T>::from_float((2.0f * Elem<T>::to_float(db[c])) * rb[k]);
      ht[f * kStride + r0l] = Elem<T>::from_float(ra[k] * ra[k]);
      ht[f * kStride + r0l + 8] = Elem<T>::from_float(rb[k] * rb[k]);
      gt[f * kStride + r0l] = ga[c];
      gt[f * kStride + r0l + 8] = gb[c];
    }
  }
  if (MASK24) {
    emit_pair<T, kActNone, DENSE_OUT>(ga, gb, T0 + r0l, rr, (F0 >> 3) + c8l, cols, dx_values, dx_meta, dx_dense);
  } else {
    const int64_t o = (T0 + r0l) * cols + F0 + c8l * 8;
    *reinterpret_cast<uint4*>(dx_dense + o) = pack8(ga);
    *reinterpret_cast<uint4*>(dx_dense + o + 8 * cols) = pack8(gb);
  }
  __syncthreads();

  // The transposed tiles: A rows = features F0 + r0l, + 8; A columns = tokens T0 + 8 c8l .. + 7.
  const int64_t f0 = F0 + r0l;
  const int64_t c8 = (T0 >> 3) + c8l;
  const int s0 = slot[f0], s1 = slot[f0 + 8];
#pragma unroll
  for (int which = 0; which < 2; ++which) {
    const uint16_t* tile = which == 0 ? ht : gt;
    uint16_t a[8], b[8];
    load_tile_pair<kStride>(tile, r0l, c8l, a, b);
    uint16_t* dense = which == 0 ? dense_h : dense_g;
    if (s0 >= 0) *reinterpret_cast<uint4*>(dense + int64_t(s0) * rows + c8 * 8) = pack8(a);
    if (s1 >= 0) *reinterpret_cast<uint4*>(dense + int64_t(s1) * rows + c8 * 8) = pack8(b);
    emit_pair<T, kActNone, DENSE_OUT>(a, b, f0, rr, c8, rows, which == 0 ? h_values : g_values,
                                      which == 0 ? h_meta : g_meta, which == 0 ? h_dense : g_dense);
  }
}

}  // namespace jsparse
