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
// Both kernels view the input as one flat row-major array cut into *bands*: 256 threads, each holding ITEMS 16-byte
// vectors (16 KiB for ITEMS = 4). Item `it` of lane l in warp w is vector w*32*ITEMS + it*32 + l of the band
// (warp-striped: every load of a warp reads 512 contiguous bytes, and the band's row-major order is (warp, item,
// lane, element)). Rows are a multiple of 32 elements, so each bitmask word lies inside one band, split over the
// LPW = 32 / N consecutive lanes of one item (N elements per vector).
//
// pack: one pass over the input, with a decoupled look-back over bands (Merrill & Garland, as in CUB's single-pass
// scan):
//   1. a band is a ticket from an atomic counter (bands are taken in order, so a band only ever waits for bands that
//      running blocks hold); the block loads it into registers, counts its non-zeros and publishes the count (the
//      band's aggregate);
//   2. it writes bits and h as coalesced vectors and stages its values in shared memory at their band-local
//      positions (block and warp scans), assuming the band is within capacity;
//   3. warp 0 adds its predecessors' flags back to the nearest inclusive prefix and publishes its own;
//   4. it writes its row offsets and its staged values as aligned 16-byte vectors; a band that crosses the capacity
//      rewrites its bits and h with the cut (re-reading the input) first.
//   Tickets past the last band zero the values buffer's unused tail once the last band's inclusive prefix is out.
//   pack_kernel below runs these steps for one band per block. The default launch is pack_ring.h's: the same steps
//   in persistent blocks whose producer warp keeps several bands in flight (bulk copies into shared memory) and whose
//   look-back warp finds a band's prefix while the compute warps go on to the next bands.
//   Flags are 64-bit: status (1 aggregate, 2 inclusive prefix) in the high word, the count saturated at the capacity
//   in the low word, so one store publishes both and no reader sees half of it.
// unpack: independent bands. A band starts in values at row_offsets[its first row] plus the popcounts of that row's
//   words before the band; its values are read into shared memory in one coalesced sweep and placed from there.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "elem.h"

namespace jsparse {
namespace bitmask {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kItems = 4;  // the unpack's vectors per thread (the pack's are in its PackConfig or RingConfig)
constexpr int kBandVectors = kThreads * kItems;
constexpr unsigned kFull = 0xffffffffu;
constexpr unsigned long long kAggregate = 1ull << 32;
constexpr unsigned long long kInclusive = 2ull << 32;
// Flag reads a waiter makes before it gives up: only a bug could wait this long (each read is an L2 round trip), and
// a bounded wait turns that bug into wrong results the tests catch instead of a hung GPU.
constexpr int kMaxSpins = 1 << 24;

// The thread's place among the kThreads threads that work on a band: the block's thread, or in the ring pack
// (pack_ring.h) the thread within its compute group of kThreads.
static_assert((kThreads & (kThreads - 1)) == 0, "tid() masks");
__device__ __forceinline__ int tid() { return int(threadIdx.x & (kThreads - 1)); }

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

// sm_90 compares and multiplies pairs of bfloat16 or float16 natively (set.*.bf16x2, mul.rn.bf16x2), so a 16-byte
// vector's mask and squares take 4 instructions each instead of 8 conversions and 8 float32 operations. ncu (H100,
// 16384 x 8192, 4-item bands): the pack's instructions fell from 152M to 105M (issue slots busy 53% -> 37%) at the
// same 266-270 us, since 4-item bands wait at barriers (loads, look-back) for half their cycles; with fewer registers
// live, 8-item bands at 2 blocks per SM became the fastest configuration. The scalar forms are float32's (the
// scalar form of 16-bit types, at 4-item bands, timed 0.289-0.296 ms against the packed form's 0.288-0.289 at 85%
// zeros in one process before it was dropped: the gain is the registers, not the time of the math).
template <typename T>
struct Pair {
  static constexpr bool OK = false;
};
template <>
struct Pair<__nv_bfloat16> {
  static constexpr bool OK = true;
  using P = __nv_bfloat162;
};
template <>
struct Pair<__half> {
  static constexpr bool OK = true;
  using P = __half2;
};

template <typename T>
__device__ __forceinline__ typename Pair<T>::P as_pair(uint32_t w) {
  typename Pair<T>::P p;
  memcpy(&p, &w, 4);
  return p;
}

template <typename P>
__device__ __forceinline__ uint32_t as_word(P p) {
  uint32_t w;
  memcpy(&w, &p, 4);
  return w;
}

__device__ __forceinline__ uint32_t word(const uint4& v, int j) {
  return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
}

// The stored elements of a pair as half-words of all ones: activation(x) != 0, i.e. x > 0 or NaN with relu (not
// x <= 0, the unordered x > 0), else x != 0 (NaN included, -0.0 not).
template <typename T, bool RELU>
__device__ __forceinline__ uint32_t kept_halves(typename Pair<T>::P p) {
  const typename Pair<T>::P zero = as_pair<T>(0u);
  return RELU ? __hgtu2_mask(p, zero) : __hneu2_mask(p, zero);
}

// The stored elements of a vector as an N-bit mask (the test of kept_halves).
template <typename T, bool RELU>
__device__ __forceinline__ uint32_t nonzero_mask(const Vec<T>& x) {
  if constexpr (Pair<T>::OK) {
    uint32_t m = 0;  // element 2j in bit 2j, element 2j + 1 in bit 2j + 16 for now
#pragma unroll
    for (int j = 0; j < 4; ++j) m |= (kept_halves<T, RELU>(as_pair<T>(word(x.v, j))) & 0x10001u) << (2 * j);
    return (m | (m >> 15)) & 0xffu;
  } else {
    uint32_t m = 0;
#pragma unroll
    for (int e = 0; e < Vec<T>::N; ++e) {
      const float f = Elem<T>::to_float(x.e[e]);
      m |= uint32_t(RELU ? !(f <= 0.0f) : f != 0.0f) << e;
    }
    return m;
  }
}

// r*r in float32, rounded once to T (reference.square).
template <typename T>
__device__ __forceinline__ typename Elem<T>::Raw square(typename Elem<T>::Raw r) {
  const float f = Elem<T>::to_float(r);
  return Elem<T>::from_float(__fmul_rn(f, f));
}

// Packed squares of a 16-bit vector, word j masked by mask(j, pair j) (half-words of all ones where kept). The
// packed product is the float32 one: the exact product of two 16-bit floats fits in float32, so both round it once,
// to nearest even, subnormals kept.
template <typename T, typename Mask>
__device__ __forceinline__ Vec<T> square_pairs(const Vec<T>& x, Mask mask) {
  uint32_t w[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const typename Pair<T>::P p = as_pair<T>(word(x.v, j));
    w[j] = as_word(__hmul2_rn(p, p)) & mask(j, p);
  }
  Vec<T> h;
  h.v = make_uint4(w[0], w[1], w[2], w[3]);
  return h;
}

// The vector of square(x) where `keep` has the element's bit, else 0.
template <typename T>
__device__ __forceinline__ Vec<T> square_kept(const Vec<T>& x, uint32_t keep) {
  if constexpr (Pair<T>::OK) {
    return square_pairs(x, [keep](int j, typename Pair<T>::P) {
      const uint32_t b = keep >> (2 * j);
      return (b & 1u) * 0xffffu | (b & 2u) * 0x7fff8000u;
    });
  } else {
    Vec<T> h;
#pragma unroll
    for (int e = 0; e < Vec<T>::N; ++e) h.e[e] = (keep >> e) & 1u ? square<T>(x.e[e]) : typename Elem<T>::Raw(0);
    return h;
  }
}

// square_kept(x, nonzero_mask<T, RELU>(x)), with the packed compare as the mask (no bits to expand).
template <typename T, bool RELU>
__device__ __forceinline__ Vec<T> square_nonzero(const Vec<T>& x) {
  if constexpr (Pair<T>::OK) {
    return square_pairs(x, [](int, typename Pair<T>::P p) { return kept_halves<T, RELU>(p); });
  } else {
    return square_kept<T>(x, nonzero_mask<T, RELU>(x));
  }
}

// Appends the elements of x whose bit is set in m to shared memory at byte address `at` (a shared-window address,
// as from __cvta_generic_to_shared). Predicated stores at a running address: through a generic pointer the compiler
// re-derives the shared address for every element, twice the instructions.
template <typename T>
__device__ __forceinline__ void append_kept(uint32_t at, const Vec<T>& x, uint32_t m) {
#pragma unroll
  for (int e = 0; e < Vec<T>::N; ++e) {
    const uint32_t kept = (m >> e) & 1u;
    if constexpr (sizeof(typename Elem<T>::Raw) == 2) {
      asm volatile("{ .reg .pred p; setp.ne.u32 p, %2, 0; @p st.shared.u16 [%0], %1; }"
                   :: "r"(at), "h"(x.e[e]), "r"(kept) : "memory");
    } else {
      asm volatile("{ .reg .pred p; setp.ne.u32 p, %2, 0; @p st.shared.u32 [%0], %1; }"
                   :: "r"(at), "r"(x.e[e]), "r"(kept) : "memory");
    }
    at += kept * uint32_t(sizeof(typename Elem<T>::Raw));
  }
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

// Barriers over the threads that work on a band: the whole block, or one compute group of the ring pack (a named
// barrier) while its other groups, producer and look-back warps run on.
struct BlockSync {
  static __device__ __forceinline__ void sync() { __syncthreads(); }
};
struct ComputeSync {  // group g's threads are [256 g, 256 (g + 1)), its barrier 1 + g
  static __device__ __forceinline__ void sync() {
    asm volatile("bar.sync %0, %1;" ::"r"(1 + int(threadIdx.x) / kThreads), "n"(kThreads) : "memory");
  }
};

// Positions inside the band: base[it] = stored elements of the band before item `it`'s vector in row-major order,
// from each thread's masks; returns the band's total. Uses (and leaves synchronised) s_warp[kWarps].
template <int ITEMS, typename Sync = BlockSync>
__device__ __forceinline__ int band_scan(const uint32_t (&m)[ITEMS], int (&base)[ITEMS], int* s_warp) {
  const int lane = tid() & 31, warp = tid() >> 5;
  int running = 0;
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int c = __popc(m[it]);
    const int s = warp_inclusive_scan(c, lane);
    base[it] = running + s - c;
    running += __shfl_sync(kFull, s, 31);
  }
  if (lane == 0) s_warp[warp] = running;
  Sync::sync();
  int before = 0, total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    const int t = s_warp[w];
    before += w < warp ? t : 0;
    total += t;
  }
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) base[it] += before;
  return total;
}

// The sum of every thread's v, for the whole block (s_warp[kWarps] is written: sync before reusing it).
__device__ __forceinline__ int block_sum(int v, int* s_warp) {
  v = __reduce_add_sync(kFull, v);
  if ((tid() & 31) == 0) s_warp[tid() >> 5] = v;
  __syncthreads();
  int total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += s_warp[w];
  return total;
}

__device__ __forceinline__ void flag_store(unsigned long long* p, unsigned long long v) {
  *reinterpret_cast<volatile unsigned long long*>(p) = v;
}

__device__ __forceinline__ unsigned long long flag_load(const unsigned long long* p) {
  return *reinterpret_cast<const volatile unsigned long long*>(p);
}

// Waits (bounded) until flag p has at least status `status` (1: an aggregate or more, 2: the inclusive prefix).
// BACKOFF > 0: sleeps between reads, from 8 ns doubling up to BACKOFF ns. The tail zeroers back off: they may wait
// for the last band from early on. The look-back does not: it measured no faster with 64-256 ns back-offs.
template <int BACKOFF = 0>
__device__ __forceinline__ unsigned long long flag_wait(const unsigned long long* p, unsigned status = 1) {
  unsigned long long f = flag_load(p);
  unsigned ns = 8;
  for (int spins = 0; (f >> 32) < status && spins < kMaxSpins; ++spins) {
    if (BACKOFF > 0) {
      __nanosleep(ns);
      ns = min(2 * ns, unsigned(BACKOFF > 0 ? BACKOFF : 1));
    }
    f = flag_load(p);
  }
  return f;
}

// Exclusive prefix of `band` (saturated at capacity), by one warp: lane l reads band end - l's flag (waiting until
// it holds at least an aggregate), and the window of 32 moves back until it holds an inclusive prefix; the lanes up to
// the nearest inclusive one add theirs. (Windows of 128 flags, 4 a lane, measured slower in every form: 92458b8.)
__device__ __forceinline__ long long look_back(const unsigned long long* flags, long long band, long long capacity) {
  const int lane = threadIdx.x & 31;
  long long prefix = 0;
  for (long long end = band - 1;; end -= 32) {
    const long long j = end - lane;
    unsigned long long f = j >= 0 ? flag_load(flags + j) : kInclusive;  // before band 0: an inclusive prefix of 0
    if ((f >> 32) == 0) f = flag_wait(flags + j);
    const unsigned inclusive = __ballot_sync(kFull, (f >> 32) == 2);
    const int stop = inclusive ? __ffs(inclusive) - 1 : 32;  // the nearest inclusive prefix's lane
    prefix = min(prefix + warp_sum(lane <= stop ? (long long)(f & 0xffffffffull) : 0ll), capacity);
    if (inclusive) return prefix;
  }
}

// Splits [lo, hi) of an array of T over the block: whole 16-byte vectors (vector(k) for vector k) and single elements
// at the two ends (element(i)).
template <typename T, typename Element, typename Vector>
__device__ __forceinline__ void for_span(long long lo, long long hi, Element element, Vector vector) {
  constexpr int N = Vec<T>::N;
  const long long first = (lo + N - 1) / N, last = hi / N;  // whole vectors [first, last)
  const long long head = first < last ? first * N : hi, tail = first < last ? last * N : hi;
  for (long long i = lo + tid(); i < head; i += kThreads) element(i);
  for (long long i = tail + tid(); i < hi; i += kThreads) element(i);
  for (long long k = first + tid(); k < last; k += kThreads) vector(k);
}

// The 16 bytes at byte 4 * Q + shift / 8 of the 32 bytes a:b (shift 0 or 16).
template <int Q>
__device__ __forceinline__ uint4 window(const uint4& a, const uint4& b, uint32_t shift) {
  const uint32_t w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
  return make_uint4(__funnelshift_r(w[Q], w[Q + 1], shift), __funnelshift_r(w[Q + 1], w[Q + 2], shift),
                    __funnelshift_r(w[Q + 2], w[Q + 3], shift), __funnelshift_r(w[Q + 3], w[Q + 4], shift));
}

// values[start + i] = s[i] for i < count: aligned 16-byte vectors, single elements at the two ends. s is 16-byte
// aligned; a vector of values is cut from the two aligned 16-byte words of s under it (the cut is the same for every
// vector, since start is) instead of read element by element: 2 shared loads instead of 8.
template <typename T>
__device__ __forceinline__ void store_staged(typename Elem<T>::Raw* values, const typename Elem<T>::Raw* s,
                                             long long start, int count) {
  constexpr int kSize = int(sizeof(typename Elem<T>::Raw));
  const uint4* s4 = reinterpret_cast<const uint4*>(s);
  for_span<T>(start, start + count, [&](long long i) { values[i] = s[i - start]; }, [&](long long k) {
    const int at = int(k * Vec<T>::N - start) * kSize;  // byte offset in s, >= 0
    const int cut = at & 15;
    const uint4 a = s4[at >> 4];
    uint4 v = a;
    if (cut != 0) {  // [at, at + 16) lies in s's count elements, so the next aligned word is inside s too
      const uint4 b = s4[(at >> 4) + 1];
      const uint32_t shift = (cut & 3) * 8;
      switch (cut >> 2) {
        case 0: v = window<0>(a, b, shift); break;
        case 1: v = window<1>(a, b, shift); break;
        case 2: v = window<2>(a, b, shift); break;
        default: v = window<3>(a, b, shift); break;
      }
    }
    reinterpret_cast<uint4*>(values)[k] = v;
  });
}

// s[i] = values[start + i] for i < count (the mirror of store_staged).
template <typename T>
__device__ __forceinline__ void load_staged(const typename Elem<T>::Raw* values, typename Elem<T>::Raw* s,
                                            long long start, int count) {
  for_span<T>(start, start + count, [&](long long i) { s[i - start] = values[i]; }, [&](long long k) {
    Vec<T> v;
    v.v = reinterpret_cast<const uint4*>(values)[k];
    const int at = int(k * Vec<T>::N - start);
#pragma unroll
    for (int e = 0; e < Vec<T>::N; ++e) s[at + e] = v.e[e];
  });
}

// values[max(lo, total) : hi) = 0 for tail zeroer z (span elements each), once the last band is out. s_total: shared
// memory of the threads that call it (a block, or a ring pack's compute group).
template <typename T, typename Sync = BlockSync>
__device__ void zero_tail(typename Elem<T>::Raw* values, const unsigned long long* flags, long long n_bands,
                          long long capacity, long long z, long long span, long long* s_total) {
  if (tid() == 0) {
    const unsigned long long f = flag_wait<1024>(flags + n_bands - 1, 2);
    *s_total = min((long long)(f & 0xffffffffull), capacity);
  }
  Sync::sync();
  const long long lo = max(z * span, *s_total), hi = min((z + 1) * span, capacity);
  if (lo >= hi) return;
  for_span<T>(lo, hi, [&](long long i) { values[i] = 0; },
              [&](long long k) { reinterpret_cast<uint4*>(values)[k] = make_uint4(0, 0, 0, 0); });
}

// pack_kernel's launch configurations: vectors per thread (a band is 256 * ITEMS vectors) and the blocks per SM the
// registers must allow (0: no bound).
template <int ITEMS_, int MIN_BLOCKS_>
struct PackConfig {
  static constexpr int ITEMS = ITEMS_, MIN_BLOCKS = MIN_BLOCKS_ ? MIN_BLOCKS_ : 1;
  static constexpr bool RING = false;
};

// A band's vectors straight from the input: read once, so evicted first.
struct FromGlobal {
  const uint4* __restrict__ x;
  __device__ __forceinline__ uint4 operator()(int v) const { return __ldcs(x + v); }
};

// Loads this thread's vectors of the band (load(v) for vector v; zeros past the end), their nonzero masks, and their
// band-local positions; returns the band's total.
template <typename T, bool RELU, typename CFG, typename Sync = BlockSync, typename Load>
__device__ __forceinline__ int load_band(Load load, int v0, int n_vectors, Vec<T> (&xv)[CFG::ITEMS],
                                         uint32_t (&m)[CFG::ITEMS], int (&base)[CFG::ITEMS], int* s_warp) {
#pragma unroll
  for (int it = 0; it < CFG::ITEMS; ++it) {
    const int v = v0 + it * 32;
    xv[it].v = v < n_vectors ? load(v) : make_uint4(0, 0, 0, 0);
  }
#pragma unroll
  for (int it = 0; it < CFG::ITEMS; ++it) m[it] = nonzero_mask<T, RELU>(xv[it]);
  return band_scan<CFG::ITEMS, Sync>(m, base, s_warp);
}

// Writes the bits and h of this thread's vectors for the stored elements `keep` (all lanes of the warp call it).
// hv: h's vector (unused without SQUARE).
template <typename T, bool SQUARE>
__device__ __forceinline__ void store_bits_h(int v, int n_vectors, uint32_t keep, const Vec<T>& hv,
                                             uint32_t* __restrict__ bits, uint4* __restrict__ h) {
  constexpr int N = Vec<T>::N;
  constexpr int LPW = 32 / N;
  const int lane = threadIdx.x & 31;
  uint32_t word = keep << (N * (lane % LPW));
#pragma unroll
  for (int d = 1; d < LPW; d <<= 1) word |= __shfl_xor_sync(kFull, word, d);
  if (v >= n_vectors) return;
  if (lane % LPW == 0) bits[v / LPW] = word;
  if (SQUARE) __stcs(h + v, hv.v);
}

// A band that crosses the capacity (only when the whole input overflows): its bits and h again, with the cut. The
// same threads wrote the same words and vectors before, so program order makes these the final ones.
template <typename T, bool RELU, bool SQUARE, typename CFG, typename Sync>
__device__ __noinline__ void cut_band(const uint4* __restrict__ x, int v0, int n_vectors, long long prefix,
                                      long long capacity, uint32_t* __restrict__ bits, uint4* __restrict__ h,
                                      int* s_warp) {
  Vec<T> xv[CFG::ITEMS];
  uint32_t m[CFG::ITEMS];
  int base[CFG::ITEMS];
  Sync::sync();  // s_warp is reused
  load_band<T, RELU, CFG, Sync>(FromGlobal{x}, v0, n_vectors, xv, m, base, s_warp);
#pragma unroll
  for (int it = 0; it < CFG::ITEMS; ++it) {
    const uint32_t keep = lowest_bits<Vec<T>::N>(m[it], capacity - (prefix + base[it]));
    store_bits_h<T, SQUARE>(v0 + it * 32, n_vectors, keep, square_kept<T>(xv[it], keep), bits, h);
  }
}

// One band's place in the pack: its index, first vector, this thread's first vector, and the first row that starts
// in it. Vector indices are int32: the handler checks n_vectors < 2**31.
struct BandPos {
  int band, first, v0, first_row;
  template <int ITEMS>
  static __device__ __forceinline__ BandPos of(int band, int row_vectors) {
    const int first = band * kThreads * ITEMS;
    return {band, first, first + (tid() >> 5) * 32 * ITEMS + (tid() & 31),
            (first + row_vectors - 1) / row_vectors};
  }
};

// Step 1's end: flag `band`'s aggregate (flag 0: its inclusive prefix) and, with band_counts, its count.
__device__ __forceinline__ void publish_aggregate(unsigned long long* flags, int band, int total, long long capacity,
                                                  int32_t* band_counts) {
  if (tid() != 0) return;
  flag_store(flags + band, (band == 0 ? kInclusive : kAggregate) | (unsigned long long)min((long long)total, capacity));
  if (band_counts) band_counts[band] = total;
}

// Step 2: bits and h, the values staged in shared memory and the rows' band-local starts, as if the band were within
// capacity (it is unless the whole input overflows: cut_band then redoes bits and h). None of it needs the prefix,
// so it runs before the look-back, and by then the predecessors have mostly published theirs.
template <typename T, bool RELU, bool SQUARE, typename CFG>
__device__ __forceinline__ void stage_band(const BandPos& p, int n_vectors, int row_vectors,
                                           const Vec<T> (&xv)[CFG::ITEMS], const uint32_t (&m)[CFG::ITEMS],
                                           const int (&base)[CFG::ITEMS], uint32_t* __restrict__ bits,
                                           uint4* __restrict__ h, int* s_rows, typename Elem<T>::Raw* s_values) {
  // The thread's place in its row, stepped 32 vectors per item: one division per band instead of one per item.
  int row = p.v0 / row_vectors, col = p.v0 - row * row_vectors;
  const uint32_t s_at = uint32_t(__cvta_generic_to_shared(s_values));
#pragma unroll
  for (int it = 0; it < CFG::ITEMS; ++it) {
    const int v = p.v0 + it * 32;
    store_bits_h<T, SQUARE>(v, n_vectors, m[it], square_nonzero<T, RELU>(xv[it]), bits, h);
    if (v < n_vectors) {
      if (col == 0) s_rows[row - p.first_row] = base[it];
      append_kept<T>(s_at + base[it] * uint32_t(sizeof(typename Elem<T>::Raw)), xv[it], m[it]);
    }
    for (col += 32; col >= row_vectors; col -= row_vectors) ++row;
  }
}

// Step 3: the band's exclusive prefix (warp 0 looks back and publishes the inclusive prefix), for the whole block.
__device__ __forceinline__ long long band_prefix(unsigned long long* flags, int band, int total, long long capacity,
                                                 long long* s_prefix) {
  if (threadIdx.x < 32) {
    long long prefix = 0;
    if (band > 0) {
      prefix = look_back(flags, band, capacity);
      if (threadIdx.x == 0) flag_store(flags + band, kInclusive | (unsigned long long)min(prefix + total, capacity));
    }
    if (threadIdx.x == 0) *s_prefix = prefix;
  }
  __syncthreads();  // the prefix, every staged value and row start
  return *s_prefix;
}

// Step 4: row offsets, the cut (if the band crosses the capacity), the values.
template <typename T, bool RELU, bool SQUARE, typename CFG, typename Sync = BlockSync>
__device__ __forceinline__ void write_band(const BandPos& p, int total, long long prefix, const uint4* __restrict__ x,
                                           int n_vectors, int row_vectors, long long capacity,
                                           uint32_t* __restrict__ bits, typename Elem<T>::Raw* __restrict__ values,
                                           int32_t* __restrict__ row_offsets, uint4* __restrict__ h,
                                           const int* s_rows, const typename Elem<T>::Raw* s_values, int* s_warp) {
  const int last = min(p.first + kThreads * CFG::ITEMS, n_vectors);
  const int n_rows = (last + row_vectors - 1) / row_vectors - p.first_row;
  for (int i = tid(); i < n_rows; i += kThreads) {
    row_offsets[p.first_row + i] = int32_t(min(prefix + s_rows[i], capacity));
  }
  if (prefix + total > capacity) {  // uniform across the block
    cut_band<T, RELU, SQUARE, CFG, Sync>(x, p.v0, n_vectors, prefix, capacity, bits, h, s_warp);
  }
  store_staged<T>(values, s_values, prefix, int(min(prefix + total, capacity) - prefix));
}

// state: [0] the ticket counter, [1 + b] band b's flag; zeroed before the launch. Grid: n_bands + tail zeroers.
template <typename T, bool RELU, bool SQUARE, typename CFG>
__global__ void __launch_bounds__(kThreads, CFG::MIN_BLOCKS)
    pack_kernel(const uint4* __restrict__ x, int n_vectors, int row_vectors, int n_bands, long long capacity,
                long long zero_span, uint32_t* __restrict__ bits, typename Elem<T>::Raw* __restrict__ values,
                int32_t* __restrict__ row_offsets, int32_t* __restrict__ band_counts, uint4* __restrict__ h,
                unsigned long long* __restrict__ state) {
  using Raw = typename Elem<T>::Raw;
  constexpr int ITEMS = CFG::ITEMS;
  constexpr int BAND = kThreads * ITEMS;
  __shared__ long long s_prefix, s_total;  // s_total: a tail zeroer's
  __shared__ int s_band;
  __shared__ int s_warp[kWarps];
  __shared__ int s_rows[BAND / (32 / Vec<T>::N)];  // rows are >= 32 / N vectors long
  __shared__ __align__(16) Raw s_values[BAND * Vec<T>::N];  // store_staged reads it as 16-byte words
  unsigned long long* flags = state + 1;
  if (threadIdx.x == 0) s_band = int(atomicAdd(state, 1ull));
  __syncthreads();
  if (s_band >= n_bands) {
    zero_tail<T>(values, flags, n_bands, capacity, s_band - n_bands, zero_span, &s_total);
    return;
  }
  const BandPos p = BandPos::of<ITEMS>(s_band, row_vectors);
  int total;
  {
    Vec<T> xv[ITEMS];
    uint32_t m[ITEMS];
    int base[ITEMS];
    total = load_band<T, RELU, CFG>(FromGlobal{x}, p.v0, n_vectors, xv, m, base, s_warp);  // 1.
    publish_aggregate(flags, p.band, total, capacity, band_counts);
    stage_band<T, RELU, SQUARE, CFG>(p, n_vectors, row_vectors, xv, m, base, bits, h, s_rows, s_values);  // 2.
  }
  const long long prefix = band_prefix(flags, p.band, total, capacity, &s_prefix);  // 3.
  write_band<T, RELU, SQUARE, CFG>(p, total, prefix, x, n_vectors, row_vectors, capacity, bits, values,  // 4.
                                   row_offsets, h, s_rows, s_values, s_warp);
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
    before = block_sum(before, s_warp);
    __syncthreads();  // band_scan below reuses s_warp
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
  const int total = band_scan<kItems>(m, base, s_warp);
  // A valid packing never reads past the capacity; a corrupt one reads zeros there instead of out of bounds.
  const int count = int(max(0ll, min((long long)total, capacity - start)));
  load_staged<T>(values, s_values, start, count);
  for (int i = count + threadIdx.x; i < total; i += kThreads) s_values[i] = Raw(0);
  __syncthreads();

#pragma unroll
  for (int it = 0; it < kItems; ++it) {
    const long long v = v0 + it * 32;
    if (v >= n_vectors) continue;
    Vec<T> rv;
    int local = base[it];
#pragma unroll
    for (int e = 0; e < N; ++e) {
      const bool kept = (m[it] >> e) & 1u;
      rv.e[e] = kept ? s_values[local] : Raw(0);
      local += kept;
    }
    __stcs(r + v, rv.v);
    if (SQUARE) __stcs(h + v, square_nonzero<T, false>(rv).v);  // rv is 0 where not kept, and kept values are not
  }
}

}  // namespace bitmask
}  // namespace jsparse
