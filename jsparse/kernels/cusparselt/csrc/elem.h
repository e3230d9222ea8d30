// Raw storage of the element types the CUDA kernels read and write, and their exact conversions to and from float32
// (rounding to nearest-even once, as XLA's converts do). Shared by sparsify24.h and bitmask.h.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace jsparse {

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

}  // namespace jsparse
