// Bitmask packing in CUDA: the fast path of jsparse.pack_bitmask / jsparse.unpack_bitmask on NVIDIA GPUs.
//
// Format (jsparse/kernels/compress/format.py): bits (R, C/32) uint32, bit b of word w of row i set iff element
// (i, 32w + b) is stored; values (capacity,) the stored elements in row-major order, zeros after the last one;
// row_offsets (R,) int32, each row's first position in values (saturated at capacity). Elements whose row-major
// position is >= capacity are not stored and their bits are clear. Bit for bit the XLA reference.
//
// Why CUDA as well as Pallas: stream compaction wants warp shuffles and a shared-memory staging buffer, so that the
// kept values leave the SM as aligned 16-byte stores. Triton (the Pallas backend of the jsparse packer) has neither:
// there every value is its own predicated 2-byte store, and the packer tops out near half of copy bandwidth.
//
// Both kernels view the input as one flat row-major array cut into *bands* of kBandVectors 16-byte vectors (16 KiB):
// 256 threads, each holding kItems vectors. Item `it` of lane l in warp w is vector w*32*kItems + it*32 + l of the
// band (warp-striped: every load of a warp reads 512 contiguous bytes, and the band's row-major order is (warp, item,
// lane, element)). Rows are a multiple of 32 elements, so each bitmask word lies inside one band, split over the
// LPW = 32 / N consecutive lanes of one item (N elements per vector).
//
// pack: one pass over the input, with a decoupled look-back over bands (Merrill & Garland, as in CUB's single-pass
// scan):
//   1. a band is a ticket from an atomic counter (bands are taken in order, so a band only ever waits for bands that
//      running blocks hold); the block loads it into registers and counts its non-zeros;
//   2. warp 0 publishes the count (the band's aggregate), adds its predecessors' flags 32 at a time back to the
//      nearest inclusive prefix, and publishes its own inclusive prefix;
//   3. positions come from the prefix and the block's warp/lane scans; bits and h are written as coalesced vectors;
//      the kept values are staged in shared memory and written out as aligned 16-byte vectors.
//   Tickets past the last band zero the values buffer's unused tail once the last band's inclusive prefix is out.
//   Flags are 64-bit: status (1 aggregate, 2 inclusive prefix) in the high word, the count saturated at the capacity
//   in the low word, so one store publishes both and no reader sees half of it.
// unpack: independent bands. A band starts in values at row_offsets[its first row] plus the popcounts of that row's
//   words before the band; its values are read into shared memory in one coalesced sweep and placed from there.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace jsparse {
namespace bitmask {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kItems = 4;
constexpr int kBandVectors = kThreads * kItems;
constexpr int kBandBytes = kBandVectors * 16;  // the Python wrapper's BAND_BYTES
constexpr unsigned kFull = 0xffffffffu;
constexpr unsigned long long kAggregate = 1ull << 32;
constexpr unsigned long long kInclusive = 2ull << 32;
// Flag reads a waiter makes before it gives up: only a bug could wait this long (each read is an L2 round trip), and
// a bounded wait turns that bug into wrong results the tests catch instead of a hung GPU.
constexpr int kMaxSpins = 1 << 24;

template <typename T>
struct Elem;

template <>
struct Elem<__nv_bfloat16> {
  using Raw = uint16_t;
  static __device__ __forceinline__ float to_float(Raw b) { return __bfloat162float(__ushort_as_bfloat16(b)); }
  static __device__ __forceinline__ Raw from_float(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
};

template <>
struct Elem<__half> {
  using Raw = uint16_t;
  static __device__ __forceinline__ float to_float(Raw b) { return __half2float(__ushort_as_half(b)); }
  static __device__ __forceinline__ Raw from_float(float f) { return __half_as_ushort(__float2half_rn(f)); }
};

template <>
struct Elem<float> {
  using Raw = uint32_t;
  static __device__ __forceinline__ float to_float(Raw b) { return __uint_as_float(b); }
  static __device__ __forceinline__ Raw from_float(float f) { return __float_as_uint(f); }
};

// One 16-byte vector: N elements of T.
template <typename T>
struct Vec {
  using Raw = typename Elem<T>::Raw;
  static constexpr int N = 16 / sizeof(Raw);
  union {
    uint4 v;
    Raw e[N];
  };
};

// The stored elements of a vector as an N-bit mask: activation(x) != 0, i.e. x > 0 or NaN with relu (not x <= 0),
// else x != 0 (NaN included, -0.0 not).
template <typename T, bool RELU>
__device__ __forceinline__ uint32_t nonzero_mask(const Vec<T>& x) {
  uint32_t m = 0;
#pragma unroll
  for (int e = 0; e < Vec<T>::N; ++e) {
    const float f = Elem<T>::to_float(x.e[e]);
    m |= uint32_t(RELU ? !(f <= 0.0f) : f != 0.0f) << e;
  }
  return m;
}

// r*r in float32, rounded once to T (reference.square).
template <typename T>
__device__ __forceinline__ typename Elem<T>::Raw square(typename Elem<T>::Raw r) {
  const float f = Elem<T>::to_float(r);
  return Elem<T>::from_float(__fmul_rn(f, f));
}

// The lowest `k` set bits of `m` (N <= 8 bits).
template <int N>
__device__ __forceinline__ uint32_t lowest_bits(uint32_t m, long long k) {
  uint32_t out = 0;
#pragma unroll
  for (int e = 0; e < N; ++e) {
    if (((m >> e) & 1u) && k > 0) {
      out |= 1u << e;
      --k;
    }
  }
  return out;
}

__device__ __forceinline__ int warp_inclusive_scan(int v, int lane) {
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int t = __shfl_up_sync(kFull, v, d);
    if (lane >= d) v += t;
  }
  return v;
}

__device__ __forceinline__ long long warp_sum(long long v) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(kFull, v, d);
  return v;
}

// Positions inside the band: base[it] = stored elements of the band before item `it`'s vector in row-major order,
// from each thread's masks; returns the band's total. Uses (and leaves synchronised) s_warp[kWarps].
__device__ __forceinline__ int band_scan(const uint32_t (&m)[kItems], int (&base)[kItems], int* s_warp) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int running = 0;
#pragma unroll
  for (int it = 0; it < kItems; ++it) {
    const int c = __popc(m[it]);
    const int s = warp_inclusive_scan(c, lane);
    base[it] = running + s - c;
    running += __shfl_sync(kFull, s, 31);
  }
  if (lane == 0) s_warp[warp] = running;
  __syncthreads();
  int before = 0, total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    const int t = s_warp[w];
    before += w < warp ? t : 0;
    total += t;
  }
#pragma unroll
  for (int it = 0; it < kItems; ++it) base[it] += before;
  return total;
}

__device__ __forceinline__ void flag_store(unsigned long long* p, unsigned long long v) {
  *reinterpret_cast<volatile unsigned long long*>(p) = v;
}

__device__ __forceinline__ unsigned long long flag_load(const unsigned long long* p) {
  return *reinterpret_cast<const volatile unsigned long long*>(p);
}

// Waits (bounded) until flag p has at least status `status` (1: an aggregate or more, 2: the inclusive prefix).
__device__ __forceinline__ unsigned long long flag_wait(const unsigned long long* p, unsigned status = 1) {
  unsigned long long f = flag_load(p);
  for (int spins = 0; (f >> 32) < status && spins < kMaxSpins; ++spins) f = flag_load(p);
  return f;
}

// Exclusive prefix of `band` (saturated at capacity), by warp 0: lane l reads the flag of band end - l, and the
// window moves back 32 bands until it holds an inclusive prefix.
__device__ __forceinline__ long long look_back(const unsigned long long* flags, long long band, long long capacity) {
  const int lane = threadIdx.x & 31;
  long long prefix = 0;
  for (long long end = band - 1;; end -= 32) {
    const long long j = end - lane;
    const unsigned long long f = j >= 0 ? flag_wait(flags + j) : kInclusive;  // before band 0: inclusive 0
    const unsigned inclusive = __ballot_sync(kFull, (f >> 32) == 2);
    const int stop = inclusive ? __ffs(inclusive) - 1 : 31;  // lanes 0..stop add in
    prefix = min(prefix + warp_sum(lane <= stop ? (long long)(f & 0xffffffffull) : 0ll), capacity);
    if (inclusive) return prefix;
  }
}

// values[start + i] = s[i] for i < count: aligned 16-byte vectors, single elements at the two ends.
template <typename T>
__device__ __forceinline__ void store_staged(typename Elem<T>::Raw* values, const typename Elem<T>::Raw* s,
                                             long long start, int count) {
  constexpr int N = Vec<T>::N;
  const long long first = (start + N - 1) / N, last = (start + count) / N;  // whole vectors [first, last)
  const int head = first < last ? int(first * N - start) : count;
  const int tail = first < last ? int(last * N - start) : count;
  for (int i = threadIdx.x; i < head; i += kThreads) values[start + i] = s[i];
  for (int i = tail + threadIdx.x; i < count; i += kThreads) values[start + i] = s[i];
  uint4* out = reinterpret_cast<uint4*>(values);
  for (long long k = first + threadIdx.x; k < last; k += kThreads) {
    Vec<T> v;
    const int at = int(k * N - start);
#pragma unroll
    for (int e = 0; e < N; ++e) v.e[e] = s[at + e];
    out[k] = v.v;
  }
}

// s[i] = values[start + i] for i < count (the mirror of store_staged).
template <typename T>
__device__ __forceinline__ void load_staged(const typename Elem<T>::Raw* values, typename Elem<T>::Raw* s,
                                            long long start, int count) {
  constexpr int N = Vec<T>::N;
  const long long first = (start + N - 1) / N, last = (start + count) / N;
  const int head = first < last ? int(first * N - start) : count;
  const int tail = first < last ? int(last * N - start) : count;
  for (int i = threadIdx.x; i < head; i += kThreads) s[i] = values[start + i];
  for (int i = tail + threadIdx.x; i < count; i += kThreads) s[i] = values[start + i];
  const uint4* in = reinterpret_cast<const uint4*>(values);
  for (long long k = first + threadIdx.x; k < last; k += kThreads) {
    Vec<T> v;
    v.v = in[k];
    const int at = int(k * N - start);
#pragma unroll
    for (int e = 0; e < N; ++e) s[at + e] = v.e[e];
  }
}

// values[max(lo, total) : hi) = 0 for tail zeroer z (span elements each), once the last band is out.
template <typename T>
__device__ void zero_tail(typename Elem<T>::Raw* values, const unsigned long long* flags, long long n_bands,
                          long long capacity, long long z, long long span) {
  constexpr int N = Vec<T>::N;
  __shared__ long long s_total;
  if (threadIdx.x == 0) {
    const unsigned long long f = flag_wait(flags + n_bands - 1, 2);
    s_total = min((long long)(f & 0xffffffffull), capacity);
  }
  __syncthreads();
  const long long lo = max(z * span, s_total), hi = min((z + 1) * span, capacity);
  if (lo >= hi) return;
  const long long first = (lo + N - 1) / N, last = hi / N;
  const long long head = first < last ? first * N : hi, tail = first < last ? last * N : hi;
  for (long long i = lo + threadIdx.x; i < head; i += kThreads) values[i] = 0;
  for (long long i = tail + threadIdx.x; i < hi; i += kThreads) values[i] = 0;
  uint4* out = reinterpret_cast<uint4*>(values);
  for (long long k = first + threadIdx.x; k < last; k += kThreads) out[k] = make_uint4(0, 0, 0, 0);
}

// state: [0] the ticket counter, [1 + b] band b's flag; zeroed before the launch. Grid: n_bands + tail zeroers.
template <typename T, bool RELU, bool SQUARE>
__global__ void __launch_bounds__(kThreads)
    pack_kernel(const uint4* __restrict__ x, long long n_vectors, long long row_vectors, long long n_bands,
                long long capacity, long long zero_span, uint32_t* __restrict__ bits,
                typename Elem<T>::Raw* __restrict__ values, int32_t* __restrict__ row_offsets,
                int32_t* __restrict__ band_counts, uint4* __restrict__ h, unsigned long long* __restrict__ state) {
  using Raw = typename Elem<T>::Raw;
  constexpr int N = Vec<T>::N;
  constexpr int LPW = 32 / N;
  __shared__ long long s_band, s_prefix;
  __shared__ int s_warp[kWarps];
  __shared__ Raw s_values[kBandVectors * N];
  unsigned long long* flags = state + 1;
  if (threadIdx.x == 0) s_band = (long long)atomicAdd(state, 1ull);
  __syncthreads();
  const long long band = s_band;
  if (band >= n_bands) {
    zero_tail<T>(values, flags, n_bands, capacity, band - n_bands, zero_span);
    return;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const long long v0 = band * kBandVectors + warp * 32 * kItems + lane;

  // 1. load and count
  Vec<T> xv[kItems];
  uint32_t m[kItems];
#pragma unroll
  for (int it = 0; it < kItems; ++it) {
    const long long v = v0 + it * 32;
    xv[it].v = v < n_vectors ? __ldcs(x + v) : make_uint4(0, 0, 0, 0);  // read once: evict first
    m[it] = nonzero_mask<T, RELU>(xv[it]);
  }
  int base[kItems];
  const int total = band_scan(m, base, s_warp);

  // 2. look back
  if (warp == 0) {
    const long long aggregate = min((long long)total, capacity);
    long long prefix = 0;
    if (band == 0) {
      if (lane == 0) flag_store(flags, kInclusive | (unsigned long long)aggregate);
    } else {
      if (lane == 0) flag_store(flags + band, kAggregate | (unsigned long long)aggregate);
      prefix = look_back(flags, band, capacity);
      if (lane == 0) flag_store(flags + band, kInclusive | (unsigned long long)min(prefix + aggregate, capacity));
    }
    if (lane == 0) {
      s_prefix = prefix;
      band_counts[band] = total;
    }
  }
  __syncthreads();
  const long long prefix = s_prefix;

  // 3. bits, row offsets, h; values staged in shared memory
#pragma unroll
  for (int it = 0; it < kItems; ++it) {
    const long long v = v0 + it * 32;
    const long long pos = prefix + base[it];
    uint32_t keep = m[it];
    if (pos + __popc(keep) > capacity) keep = lowest_bits<N>(keep, capacity - pos);
    uint32_t word = keep << (N * (lane % LPW));
#pragma unroll
    for (int d = 1; d < LPW; d <<= 1) word |= __shfl_xor_sync(kFull, word, d);
    if (v < n_vectors) {
      if (lane % LPW == 0) bits[v / LPW] = word;
      if (v % row_vectors == 0) row_offsets[v / row_vectors] = int32_t(min(pos, capacity));
      Vec<T> hv;
      int local = base[it];
#pragma unroll
      for (int e = 0; e < N; ++e) {
        const bool kept = (keep >> e) & 1u;
        if (SQUARE) hv.e[e] = kept ? square<T>(xv[it].e[e]) : Raw(0);
        if (kept) s_values[local++] = xv[it].e[e];
      }
      if (SQUARE) __stcs(h + v, hv.v);
    }
  }
  __syncthreads();
  const int stored = int(min(prefix + total, capacity) - prefix);
  store_staged<T>(values, s_values, prefix, stored);
}

template <typename T, bool SQUARE>
__global__ void __launch_bounds__(kThreads)
    unpack_kernel(const uint32_t* __restrict__ bits, const int32_t* __restrict__ row_offsets,
                  const typename Elem<T>::Raw* __restrict__ values, long long capacity, long long n_vectors,
                  long long row_vectors, uint4* __restrict__ r, uint4* __restrict__ h) {
  using Raw = typename Elem<T>::Raw;
  constexpr int N = Vec<T>::N;
  constexpr int LPW = 32 / N;
  constexpr uint32_t kVecMask = (1u << N) - 1u;
  __shared__ int s_warp[kWarps];
  __shared__ int s_words;
  __shared__ Raw s_values[kBandVectors * N];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const long long band = blockIdx.x;

  // Where the band starts in values: its first row's offset plus that row's stored elements before the band.
  const long long first = band * kBandVectors;
  const long long row = first / row_vectors;
  const long long words_before = (first - row * row_vectors) / LPW;
  int before = 0;
  if (words_before > 0) {  // uniform across the block
    const uint32_t* row_bits = bits + row * (row_vectors / LPW);
    for (long long i = threadIdx.x; i < words_before; i += kThreads) before += __popc(row_bits[i]);
    before = __reduce_add_sync(kFull, before);
    if (lane == 0) s_warp[warp] = before;
    __syncthreads();
    if (threadIdx.x == 0) {
      int sum = 0;
      for (int w = 0; w < kWarps; ++w) sum += s_warp[w];
      s_words = sum;
    }
    __syncthreads();
    before = s_words;
  }
  const long long start = (long long)row_offsets[row] + before;

  const long long v0 = first + warp * 32 * kItems + lane;
  uint32_t m[kItems];
#pragma unroll
  for (int it = 0; it < kItems; ++it) {
    const long long v = v0 + it * 32;
    m[it] = v < n_vectors ? (bits[v / LPW] >> (N * (lane % LPW))) & kVecMask : 0u;
  }
  int base[kItems];
  const int total = band_scan(m, base, s_warp);
  // A valid packing never reads past the capacity; a corrupt one reads zeros there instead of out of bounds.
  const int count = int(max(0ll, min((long long)total, capacity - start)));
  load_staged<T>(values, s_values, start, count);
  for (int i = count + threadIdx.x; i < total; i += kThreads) s_values[i] = Raw(0);
  __syncthreads();

#pragma unroll
  for (int it = 0; it < kItems; ++it) {
    const long long v = v0 + it * 32;
    if (v >= n_vectors) continue;
    Vec<T> rv, hv;
    int local = base[it];
#pragma unroll
    for (int e = 0; e < N; ++e) {
      const bool kept = (m[it] >> e) & 1u;
      rv.e[e] = kept ? s_values[local] : Raw(0);
      local += kept;
      if (SQUARE) hv.e[e] = kept ? square<T>(rv.e[e]) : Raw(0);
    }
    __stcs(r + v, rv.v);
    if (SQUARE) __stcs(h + v, hv.v);
  }
}

}  // namespace bitmask
}  // namespace jsparse
