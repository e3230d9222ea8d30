// 2:4 selection + compression into cuSPARSELt's sm90 16-bit compressed layout, in one pass over the dense input.
//
// Layout (reverse-engineered by torchao's deleted sparsify24.cu / sparse24_metadata.h, "MetadataCusparseLt16bitsSm90";
// officially opaque, so the handler checks it bit for bit against cusparseLtSpMMACompress at first use per shape):
//
//   [ values: rows x cols/2 elements, row-major; per group of 4 the two kept ones, in index order ]
//   [ metadata: rows * cols / 8 bytes ]
//
// Metadata: one nibble per group of 4, idx0 | idx1 << 2 (idx0 < idx1, the kept positions). The nibbles of a
// 16-row x 32-column block fill 64 bytes at
//     (row / 64) * 8 * cols + (col / 32) * 256 + ((row % 64) / 16) * 64
// and inside the block byte  rr * 8 + b  (rr = row % 8, b = 0..7) holds group g = b / 2 + 4 * (b % 2) of the block
// (groups 0..7 along the 32 columns): row rr in the low nibble, row rr + 8 in the high nibble.
//
// Thread mapping: one thread takes rows r and r + 8 of a 16-row band and 8 consecutive columns (two 16-byte loads,
// 2 x 2 groups). Consecutive threads take consecutive 8-column chunks, so loads and value stores are coalesced; the
// thread holding column chunk q (q = chunk % 4 inside a 32-column block) and the one holding q ^ 2 are lanes l and
// l ^ 2 of one warp, and one shuffle lets q = 0, 1 write the block row's 8 metadata bytes as two 4-byte words.
//
// Selection: key |x| (none) or relu(x) (squared ReLU), float32, NaN as +inf; the two largest keys of each group win,
// ties to the lower index -- exactly jsparse.nm_prune / jsparse.squared_relu_nm. Squared-ReLU values are
// relu(x)^2 computed in float32 and rounded to nearest-even once (NaN stays NaN), as the XLA reference does.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "elem.h"

namespace jsparse {

enum Activation : int { kActNone = 0, kActSquaredRelu = 1 };

__device__ __forceinline__ uint16_t pick4(uint16_t v0, uint16_t v1, uint16_t v2, uint16_t v3, int i) {
  // Selects without a run-time-indexed array (which would go to local memory).
  return i == 0 ? v0 : (i == 1 ? v1 : (i == 2 ? v2 : v3));
}

// relu(v) in float32 as the XLA reference computes it (jnp.maximum: NaN stays NaN), and its selection key (NaN as
// +inf, so a NaN is always kept).
__device__ __forceinline__ float relu_nan(float v) { return v != v ? v : fmaxf(v, 0.0f); }
__device__ __forceinline__ float relu_key(float v) { return v != v ? __int_as_float(0x7f800000) : fmaxf(v, 0.0f); }

// The two largest of four keys, as 4 bits (bit i: element i kept). j beats i when key[j] > key[i], or key[j] == key[i]
// and j < i; an element is kept when fewer than two beat it.
__device__ __forceinline__ uint32_t keep24(const float (&key)[4]) {
  const int c01 = key[1] > key[0], c02 = key[2] > key[0], c03 = key[3] > key[0];
  const int c12 = key[2] > key[1], c13 = key[3] > key[1], c23 = key[3] > key[2];
  const int r0 = c01 + c02 + c03;
  const int r1 = (1 - c01) + c12 + c13;
  const int r2 = (1 - c02) + (1 - c12) + c23;
  const int r3 = (1 - c03) + (1 - c13) + (1 - c23);
  return (r0 < 2) | ((r1 < 2) << 1) | ((r2 < 2) << 2) | ((r3 < 2) << 3);
}

// Selects 2 of the 4 raw 16-bit values x0..x3; writes the kept (transformed) values in index order; returns the
// metadata nibble idx0 | idx1 << 2.
template <typename T, int ACT>
__device__ __forceinline__ uint32_t select_group(uint16_t x0, uint16_t x1, uint16_t x2, uint16_t x3, uint16_t& out0,
                                                 uint16_t& out1) {
  const uint16_t raw[4] = {x0, x1, x2, x3};
  float key[4];
  uint16_t val[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float v = Elem<T>::to_float(raw[i]);
    if (ACT == kActNone) {
      key[i] = v != v ? __int_as_float(0x7f800000) : fabsf(v);
      val[i] = raw[i];
    } else {
      const float r = relu_nan(v);
      key[i] = relu_key(v);
      val[i] = Elem<T>::from_float(r * r);
    }
  }
  const uint32_t keep = keep24(key);
  const int i0 = __ffs(keep) - 1;
  const int i1 = 31 - __clz(keep);
  out0 = pick4(val[0], val[1], val[2], val[3], i0);
  out1 = pick4(val[0], val[1], val[2], val[3], i1);
  return uint32_t(i0) | (uint32_t(i1) << 2);
}

__device__ __forceinline__ void unpack8(const uint4& v, uint16_t (&x)[8]) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    x[2 * i] = uint16_t(w[i] & 0xffffu);
    x[2 * i + 1] = uint16_t(w[i] >> 16);
  }
}

// The inverse of unpack8: eight 16-bit elements into one 16-byte word (element 0 in the low half of .x).
__device__ __forceinline__ uint4 pack8(const uint16_t (&x)[8]) {
  uint4 v;
  v.x = x[0] | (uint32_t(x[1]) << 16);
  v.y = x[2] | (uint32_t(x[3]) << 16);
  v.z = x[4] | (uint32_t(x[5]) << 16);
  v.w = x[6] | (uint32_t(x[7]) << 16);
  return v;
}

// Selects and writes one thread's share of the output: rows r0 and r0 + 8 (r0 % 16 == rr < 8) of the sparse-A matrix,
// columns c8 * 8 .. c8 * 8 + 7 (raw inputs a = row r0, b = row r0 + 8). Needs the whole warp (the metadata shuffle)
// with lane ^ 2 holding the same rows and column chunk c8 ^ 2.
// DENSE_OUT: write the pruned (and activated) dense matrix instead of the compressed one (the library-compress
// fallback's first step). Returns the four metadata nibbles (row a's two groups, then row b's: bits 0, 4, 8, 12).
template <typename T, int ACT, bool DENSE_OUT>
__device__ __forceinline__ uint32_t emit_pair(const uint16_t (&a)[8], const uint16_t (&b)[8], int64_t r0, int rr, int64_t c8,
                                          int64_t cols, uint16_t* __restrict__ values, uint8_t* __restrict__ meta,
                                          uint16_t* __restrict__ dense_out) {
  const int64_t r1 = r0 + 8;
  uint16_t oa[4], ob[4];
  const uint32_t na0 = select_group<T, ACT>(a[0], a[1], a[2], a[3], oa[0], oa[1]);
  const uint32_t na1 = select_group<T, ACT>(a[4], a[5], a[6], a[7], oa[2], oa[3]);
  const uint32_t nb0 = select_group<T, ACT>(b[0], b[1], b[2], b[3], ob[0], ob[1]);
  const uint32_t nb1 = select_group<T, ACT>(b[4], b[5], b[6], b[7], ob[2], ob[3]);

  if (DENSE_OUT) {
    uint16_t da[8], db[8];
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // compile-time indices only: everything stays in registers
      da[j] = j == int(na0 & 3) ? oa[0] : (j == int(na0 >> 2) ? oa[1] : uint16_t(0));
      da[4 + j] = j == int(na1 & 3) ? oa[2] : (j == int(na1 >> 2) ? oa[3] : uint16_t(0));
      db[j] = j == int(nb0 & 3) ? ob[0] : (j == int(nb0 >> 2) ? ob[1] : uint16_t(0));
      db[4 + j] = j == int(nb1 & 3) ? ob[2] : (j == int(nb1 >> 2) ? ob[3] : uint16_t(0));
    }
    *reinterpret_cast<uint4*>(dense_out + r0 * cols + c8 * 8) = pack8(da);
    *reinterpret_cast<uint4*>(dense_out + r1 * cols + c8 * 8) = pack8(db);
    return na0 | (na1 << 4) | (nb0 << 8) | (nb1 << 12);
  }

  const int64_t half_cols = cols >> 1;
  uint2 pa, pb;
  pa.x = oa[0] | (uint32_t(oa[1]) << 16);
  pa.y = oa[2] | (uint32_t(oa[3]) << 16);
  pb.x = ob[0] | (uint32_t(ob[1]) << 16);
  pb.y = ob[2] | (uint32_t(ob[3]) << 16);
  __stcs(reinterpret_cast<uint2*>(values + r0 * half_cols + c8 * 4), pa);
  __stcs(reinterpret_cast<uint2*>(values + r1 * half_cols + c8 * 4), pb);

  // This thread's groups inside the 32-column block are 2q and 2q + 1. Their bytes: row r0's nibble low, r1's high.
  const uint32_t byte_lo = na0 | (nb0 << 4);  // group 2q
  const uint32_t byte_hi = na1 | (nb1 << 4);  // group 2q + 1
  const uint32_t mine = byte_lo | (byte_hi << 8);
  const uint32_t other = __shfl_xor_sync(0xffffffffu, mine, 2);  // the thread with q ^ 2: groups 2q + 4, 2q + 5
  const int q = int(c8 & 3);
  if (q < 2) {
    // bytes 4q .. 4q + 3 of the row: groups 2q, 2q + 4, 2q + 1, 2q + 5
    const uint32_t word = (mine & 0xffu) | ((other & 0xffu) << 8) | (((mine >> 8) & 0xffu) << 16) |
                          (((other >> 8) & 0xffu) << 24);
    const int64_t offset = (r0 >> 6) * 8 * cols + (c8 >> 2) * 256 + ((r0 & 63) >> 4) * 64 + rr * 8 + q * 4;
    __stcs(reinterpret_cast<unsigned int*>(meta + offset), word);
  }
  return na0 | (na1 << 4) | (nb0 << 8) | (nb1 << 12);
}

// Requires rows % 16 == 0 and cols % 32 == 0 (the handler enforces rows % 64 and cols % 64), so every warp is full.
template <typename T, int ACT, bool DENSE_OUT>
__global__ void __launch_bounds__(256) sparsify24_kernel(const uint16_t* __restrict__ x, uint16_t* __restrict__ values,
                                                         uint8_t* __restrict__ meta, uint16_t* __restrict__ dense_out,
                                                         int64_t rows, int64_t cols) {
  const int64_t chunks = cols >> 3;
  const int64_t total = (rows >> 1) * chunks;
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= total) return;  // total % 32 == 0: whole warps leave together, so the shuffle below stays full
  const int64_t c8 = t % chunks;
  const int64_t pair = t / chunks;
  const int rr = int(pair & 7);
  const int64_t r0 = (pair >> 3) * 16 + rr;
  const int64_t r1 = r0 + 8;

  const uint4 v0 = __ldcs(reinterpret_cast<const uint4*>(x + r0 * cols + c8 * 8));
  const uint4 v1 = __ldcs(reinterpret_cast<const uint4*>(x + r1 * cols + c8 * 8));
  uint16_t a[8], b[8];
  unpack8(v0, a);
  unpack8(v1, b);
  emit_pair<T, ACT, DENSE_OUT>(a, b, r0, rr, c8, cols, values, meta, dense_out);
}

// emit_pair's thread mapping on a 64 x 64 tile with 256 threads: thread l takes the 8-column chunk c8l = l & 7 of
// rows r0l and r0l + 8, r0l = 16 (pair / 8) + rr with pair = l / 8 and rr = pair % 8 -- so lane ^ 2 holds chunk
// c8l ^ 2 of the same rows, as emit_pair's metadata shuffle needs.
struct TileLane {
  int c8l, pair, rr, r0l;
};
__device__ __forceinline__ TileLane tile_lane(int l) {
  const int pair = l >> 3, rr = pair & 7;
  return {l & 7, pair, rr, (pair >> 3) * 16 + rr};
}

// Rows r0l and r0l + 8, columns 8 c8l .. + 7 of a shared-memory tile with a row stride of STRIDE elements (even), as
// eight 4-byte reads (conflict-free for STRIDE = 66 with emit_pair's thread mapping).
template <int STRIDE>
__device__ __forceinline__ void load_tile_pair(const uint16_t* tile, int r0l, int c8l, uint16_t (&a)[8],
                                               uint16_t (&b)[8]) {
  const uint32_t* pa = reinterpret_cast<const uint32_t*>(tile + r0l * STRIDE + c8l * 8);
  const uint32_t* pb = reinterpret_cast<const uint32_t*>(tile + (r0l + 8) * STRIDE + c8l * 8);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t wa = pa[i], wb = pb[i];
    a[2 * i] = uint16_t(wa & 0xffffu);
    a[2 * i + 1] = uint16_t(wa >> 16);
    b[2 * i] = uint16_t(wb & 0xffffu);
    b[2 * i + 1] = uint16_t(wb >> 16);
  }
}

// The same output for the sparse-A matrix A = x^T (rows x cols) read from x (cols x rows, row-major): the 2:4 groups
// run along x's *first* axis (e.g. tokens of a T x F activation, for a weight gradient x^T g), with no transposed
// copy in memory. One block per 64 x 64 tile of A: coalesced 16-byte loads of x's tile into shared memory, transposed
// there, then each thread takes its two rows x 8 columns as in sparsify24_kernel (8 column chunks x 4 row pairs per
// warp, so lane ^ 2 holds chunk c8 ^ 2 of the same rows).
// The tile's row stride of 66 elements keeps the transposing stores at most 2-way bank-conflicted and the row reads
// conflict-free. Rows r with slot[r] >= 0 are also copied unpruned to dense_rows[slot[r]] (cols elements): the 95/5
// split's dense features, whose weight-gradient rows are recomputed densely.
// Requires rows % 64 == 0 and cols % 64 == 0; grid (cols / 64, rows / 64), 256 threads.
template <typename T, bool DENSE_OUT>
__global__ void __launch_bounds__(256) sparsify24_t_kernel(const uint16_t* __restrict__ x, uint16_t* __restrict__ values,
                                                           uint8_t* __restrict__ meta, uint16_t* __restrict__ dense_out,
                                                           const int32_t* __restrict__ slot,
                                                           uint16_t* __restrict__ dense_rows, int64_t rows,
                                                           int64_t cols) {
  constexpr int kStride = 66;
  __shared__ __align__(16) uint16_t tile[64 * kStride];  // tile[r * kStride + c] = A[R0 + r][C0 + c]
  const int l = int(threadIdx.x);
  const int64_t C0 = int64_t(blockIdx.x) * 64;
  const int64_t R0 = int64_t(blockIdx.y) * 64;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int cl = (l >> 3) + 32 * h;  // x's row = A's column
    const int rc = (l & 7) * 8;        // 8 of x's columns = A's rows
    const uint4 v = __ldcs(reinterpret_cast<const uint4*>(x + (C0 + cl) * rows + R0 + rc));
    uint16_t e[8];
    unpack8(v, e);
#pragma unroll
    for (int k = 0; k < 8; ++k) tile[(rc + k) * kStride + cl] = e[k];
  }
  __syncthreads();

  const auto [c8l, pair, rr, r0l] = tile_lane(l);
  uint16_t a[8], b[8];
  load_tile_pair<kStride>(tile, r0l, c8l, a, b);
  const int64_t r0 = R0 + r0l;
  const int64_t c8 = (C0 >> 3) + c8l;
  const int s0 = slot[r0], s1 = slot[r0 + 8];
  if (s0 >= 0) *reinterpret_cast<uint4*>(dense_rows + int64_t(s0) * cols + c8 * 8) = pack8(a);
  if (s1 >= 0) *reinterpret_cast<uint4*>(dense_rows + int64_t(s1) * cols + c8 * 8) = pack8(b);
  emit_pair<T, kActNone, DENSE_OUT>(a, b, r0, rr, c8, cols, values, meta, dense_out);
}

// ---------------------------------------------------------------------------------------------------------------------
// Layout self-check helpers: a deterministic matrix with exactly two non-zeros in every group (all six position pairs
// occur), so the compressed form is unique and the library's and ours must agree byte for byte.

__device__ __forceinline__ uint32_t mix32(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return uint32_t((z ^ (z >> 31)) >> 16);
}

template <typename T>
__global__ void make_test_24_kernel(uint16_t* __restrict__ x, int64_t groups, uint32_t seed) {
  const int64_t g = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= groups) return;
  const uint32_t h = mix32(uint64_t(g) * 0x100000001b3ull + seed);
  const int pair = int(h % 6u);
  const int first[6] = {0, 0, 0, 1, 1, 2}, second[6] = {1, 2, 3, 2, 3, 3};
  // 1 + k/128 with k < 128 is exact in bf16 and fp16; never zero, never a tie problem (two non-zeros per group).
  const float va = (1.0f + float((h >> 8) & 127u) / 128.0f) * ((h >> 30) & 1u ? -1.0f : 1.0f);
  const float vb = (1.0f + float((h >> 16) & 127u) / 128.0f) * ((h >> 31) & 1u ? -1.0f : 1.0f);
  uint16_t out[4] = {0, 0, 0, 0};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if (j == first[pair]) out[j] = Elem<T>::from_float(va);
    if (j == second[pair]) out[j] = Elem<T>::from_float(vb);
  }
  uint2 w;
  w.x = out[0] | (uint32_t(out[1]) << 16);
  w.y = out[2] | (uint32_t(out[3]) << 16);
  reinterpret_cast<uint2*>(x)[g] = w;
}

__global__ void count_mismatch_kernel(const uint8_t* __restrict__ a, const uint8_t* __restrict__ b, int64_t n,
                                      unsigned long long* __restrict__ result) {
  // result[0]: mismatching bytes; result[1]: first mismatching offset (initialised to n).
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    if (a[i] != b[i]) {
      atomicAdd(result, 1ull);
      atomicMin(result + 1, (unsigned long long)i);
    }
  }
}

__global__ void init_result_kernel(unsigned long long* result, int64_t n) {
  result[0] = 0;
  result[1] = (unsigned long long)n;
}

}  // namespace jsparse
