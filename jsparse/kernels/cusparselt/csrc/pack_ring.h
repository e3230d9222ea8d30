// The ring pack: pack_kernel's single pass (bitmask.h), with the loads, the look-back and the writes decoupled by
// warp specialisation over a ring of bands in shared memory.
//
// Why: ncu of pack_kernel (H100, 16384 x 8192 bf16, 32 KiB bands at 2 blocks per SM) found it at 69% of DRAM
// bandwidth, its warps waiting on the band's loads (22% of stall samples) and on warp 0's look-back (22%), and never
// both at once within a block: a block issues its loads at the start of its life and then has nothing in flight while
// it scans, looks back and writes. Here a producer warp keeps up to STAGES bands in flight per SM (one bulk copy per
// band, cp.async.bulk into shared memory), and a look-back warp finds each band's prefix while the compute warps go on
// to the next bands; a band's values are written LAG bands later, when its prefix is long known.
//
// One persistent block per SM: a compute group of 8 warps (the band's 256 threads of pack_kernel; GROUPS > 1 groups
// take the ring's bands in turn, measured no faster), a producer warp and a look-back warp. Band i of the block sits
// in stage i % STAGES; four mbarriers per stage hand it on:
//   full      producer -> compute    the band's ticket and (but past the last band) its bytes have landed;
//   counted   compute -> look-back   the band's total is in s_total and its aggregate is published;
//   prefixed  look-back -> compute   its exclusive prefix is in s_prefix and its inclusive prefix is published;
//   empty     compute -> producer    its values are written: the stage may take the next ticket.
// Compute, for band i: the vectors from shared memory, masks, band scan, aggregate; bits and h straight to global
// memory; the kept values compacted in place into the band's own stage (every thread has read its vectors by the band
// scan's barrier); then band i - LAG's row offsets and values (stage_band / write_band of pack_kernel). Past the last
// band, the producer marks one stage per group as the end; once the last band's inclusive prefix is out, each group
// zeroes its slice of the values buffer's unused tail.
//
// No deadlock: tickets are taken in order by resident blocks only, and the smallest band without an inclusive prefix
// always completes. Its block's earlier bands are smaller, so their prefixes are out and nothing its compute warps
// wait for (their bytes, those bands' prefixes) is held up; its look-back warp reaches it after the block's earlier
// bands and finds every predecessor's prefix. No mbarrier phase is ever two ahead of its waiter: refilling a stage
// takes its `empty`, which takes its `prefixed`, which takes its `counted`, which takes its `full`.
#pragma once

#include "bitmask.h"

namespace jsparse {
namespace bitmask {

// ITEMS vectors per compute thread (a band is 256 * ITEMS vectors), STAGES bands in shared memory, GROUPS compute
// groups of 8 warps taking the ring's bands in turn, and LAG: a group writes a band's values LAG of its own bands
// after the band's scan (LAG * GROUPS < STAGES: the rest of the ring is in flight).
template <int ITEMS_, int STAGES_, int LAG_, int GROUPS_ = 1>
struct RingConfig {
  static_assert(0 < LAG_ && LAG_ * GROUPS_ < STAGES_, "a band's values are written before its stage refills");
  static constexpr int ITEMS = ITEMS_, STAGES = STAGES_, LAG = LAG_, GROUPS = GROUPS_, MIN_BLOCKS = 1;
  static constexpr bool RING = true;
  static constexpr int kThreads = GROUPS * bitmask::kThreads + 64;  // + the producer and look-back warps
  static constexpr int kStageBytes = bitmask::kThreads * ITEMS * 16;
  static constexpr int kDynamicSmem = STAGES * kStageBytes;
};

// Bulk copies and transaction-counted mbarriers are sm_90's: built for an older GPU the kernel is empty and the host
// launches pack_kernel instead (PackDevice::ring in jsparse_cusparselt.cu).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
#define JSPARSE_RING_ARCH 1
#else
#define JSPARSE_RING_ARCH 0
#endif

namespace ring {

__device__ __forceinline__ uint32_t smem(const void* p) { return uint32_t(__cvta_generic_to_shared(p)); }

__device__ __forceinline__ void mbar_init(unsigned long long* bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem(bar)), "r"(count) : "memory");
}

// Arrives (release: this thread's earlier writes are visible to whoever waits on the phase).
__device__ __forceinline__ void mbar_arrive(unsigned long long* bar) {
  asm volatile("{ .reg .b64 st; mbarrier.arrive.shared::cta.b64 st, [%0]; }" ::"r"(smem(bar)) : "memory");
}

// Arrives and expects `bytes` more from a bulk copy before the phase completes.
__device__ __forceinline__ void mbar_arrive_tx(unsigned long long* bar, uint32_t bytes) {
  asm volatile("{ .reg .b64 st; mbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1; }" ::"r"(smem(bar)),
               "r"(bytes)
               : "memory");
}

// Waits (acquire) until the phase of parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(unsigned long long* bar, uint32_t parity) {
  asm volatile(
      "{ .reg .pred done; WAIT: mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1; @!done bra WAIT; }" ::"r"(
          smem(bar)),
      "r"(parity)
      : "memory");
}

// bytes (a multiple of 16) from global src to shared dst, counted on bar; read once, so evicted from L2 first.
__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint32_t bytes, unsigned long long* bar,
                                          unsigned long long policy) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;" ::"r"(
          smem(dst)),
      "l"(src), "r"(bytes), "r"(smem(bar)), "l"(policy)
      : "memory");
}

__device__ __forceinline__ unsigned long long evict_first_policy() {
  unsigned long long policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  return policy;
}

}  // namespace ring

// state: [0] the ticket counter, [1 + b] band b's flag; zeroed before the launch. Grid: one block per SM (any number
// works: a block that is not resident holds no ticket). Dynamic shared memory: CFG::kDynamicSmem.
template <typename T, bool RELU, bool SQUARE, typename CFG>
__global__ void __launch_bounds__(CFG::kThreads, 1)
    pack_ring_kernel(const uint4* __restrict__ x, int n_vectors, int row_vectors, int n_bands, long long capacity,
                     uint32_t* __restrict__ bits, typename Elem<T>::Raw* __restrict__ values,
                     int32_t* __restrict__ row_offsets, int32_t* __restrict__ band_counts, uint4* __restrict__ h,
                     unsigned long long* __restrict__ state) {
#if JSPARSE_RING_ARCH
  using Raw = typename Elem<T>::Raw;
  constexpr int ITEMS = CFG::ITEMS, S = CFG::STAGES, G = CFG::GROUPS, LAG = CFG::LAG * G;  // LAG: in ring bands
  constexpr int BAND = kThreads * ITEMS;
  extern __shared__ __align__(128) uint4 s_ring[];  // [S][BAND]
  __shared__ int s_rows[S][BAND / (32 / Vec<T>::N)];  // rows are >= 32 / N vectors long
  __shared__ unsigned long long full[S], counted[S], prefixed[S], empty[S];
  __shared__ int s_band[S], s_total[S];
  __shared__ long long s_prefix[S];
  __shared__ int s_warp[G][3][kWarps];  // a group's band scans alternate between two; its cuts use the third
  __shared__ long long s_written[G];  // each group's zero_tail
  unsigned long long* flags = state + 1;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  constexpr int kProducer = G * kWarps, kLookBack = G * kWarps + 1;

  if (threadIdx.x == 0) {
    for (int s = 0; s < S; ++s) {
      ring::mbar_init(&full[s], 1);
      ring::mbar_init(&counted[s], 1);
      ring::mbar_init(&prefixed[s], 1);
      ring::mbar_init(&empty[s], kThreads);  // one group's threads
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();  // the last block-wide barrier: from here each role has its own

  if (warp == kProducer) {
    if (lane != 0) return;
    const unsigned long long policy = ring::evict_first_policy();
    int end = -1;  // the ring band of the first ticket past the last band
    for (int i = 0; end < 0 || i < end + G; ++i) {  // G markers past the end: one for each group
      const int s = i % S;
      if (i >= S) ring::mbar_wait(&empty[s], (i / S - 1) & 1);
      const int t = end < 0 ? int(atomicAdd(state, 1ull)) : n_bands;
      s_band[s] = t;
      if (t >= n_bands) {
        end = end < 0 ? i : end;
        ring::mbar_arrive(&full[s]);
        continue;
      }
      const int first = t * BAND;
      const uint32_t bytes = uint32_t(min(BAND, n_vectors - first)) * 16u;
      ring::mbar_arrive_tx(&full[s], bytes);
      ring::bulk_load(s_ring + s * BAND, x + first, bytes, &full[s], policy);
    }
    return;
  }

  if (warp == kLookBack) {
    for (int i = 0;; ++i) {
      const int s = i % S;
      ring::mbar_wait(&counted[s], (i / S) & 1);
      const int band = s_band[s];
      if (band >= n_bands) return;
      const int total = s_total[s];
      long long prefix = 0;
      if (band > 0) {
        prefix = look_back(flags, band, capacity);
        if (lane == 0) flag_store(flags + band, kInclusive | (unsigned long long)min(prefix + total, capacity));
      }
      if (lane == 0) {
        s_prefix[s] = prefix;
        ring::mbar_arrive(&prefixed[s]);
      }
      __syncwarp();
    }
  }

  // Compute group g takes ring bands g, g + G, g + 2G, ... Ring band j's row offsets and values, from its stage, once
  // its prefix is out; then the stage is free.
  const int g = threadIdx.x / kThreads;
  auto write = [&](int j) {
    const int s = j % S;
    ring::mbar_wait(&prefixed[s], (j / S) & 1);
    const BandPos p = BandPos::of<ITEMS>(s_band[s], row_vectors);
    write_band<T, RELU, SQUARE, CFG, ComputeSync>(p, s_total[s], s_prefix[s], x, n_vectors, row_vectors, capacity,
                                                  bits, values, row_offsets, h, s_rows[s],
                                                  reinterpret_cast<const Raw*>(s_ring + s * BAND), s_warp[g][2]);
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // the generic reads before the bulk copy's writes
    ring::mbar_arrive(&empty[s]);
  };
  int i = g;
  for (int k = 0;; i += G, ++k) {
    const int s = i % S;
    ring::mbar_wait(&full[s], (i / S) & 1);
    const int band = s_band[s];
    if (band >= n_bands) {
      if (tid() == 0) ring::mbar_arrive(&counted[s]);  // the look-back warp stops at the first of these
      break;
    }
    const BandPos p = BandPos::of<ITEMS>(band, row_vectors);
    Vec<T> xv[ITEMS];
    uint32_t m[ITEMS];
    int base[ITEMS];
    const uint4* in = s_ring + s * BAND - p.first;
    const int total = load_band<T, RELU, CFG, ComputeSync>([in](int v) { return in[v]; }, p.v0, n_vectors, xv, m,
                                                           base, s_warp[g][k & 1]);  // every vector is read: s is free
    if (tid() == 0) {
      publish_aggregate(flags, band, total, capacity, band_counts);
      s_total[s] = total;
      ring::mbar_arrive(&counted[s]);
    }
    stage_band<T, RELU, SQUARE, CFG>(p, n_vectors, row_vectors, xv, m, base, bits, h, s_rows[s],
                                     reinterpret_cast<Raw*>(s_ring + s * BAND));
    if (i - LAG >= 0) write(i - LAG);
  }
  ComputeSync::sync();  // the last bands' staged values
  for (int j = max(g, i - LAG); j < i; j += G) write(j);

  // values[total:capacity] = 0, a slice per group, once the last band's inclusive prefix is out.
  const long long zeroers = (long long)gridDim.x * G;
  zero_tail<T, ComputeSync>(values, flags, n_bands, capacity, (long long)blockIdx.x * G + g,
                            (capacity + zeroers - 1) / zeroers, &s_written[g]);
#endif  // JSPARSE_RING_ARCH
}

}  // namespace bitmask
}  // namespace jsparse
