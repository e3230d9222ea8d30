// jsparse's CUDA FFI library: the XLA FFI handlers for the cuSPARSELt 2:4 sparse GEMM and its compress op, the
// bitmask packer (bitmask.h), and a few exported C functions (sizes, statistics, plan info) read through ctypes.
//
// Execute does no per-call setup: plans come from the process-wide cache (plan_cache.h), built on first use of a
// shape. With search=1 the first call of a shape also runs cusparseLtMatmulSearch; it blocks, which is safe because
// these handlers do not declare command-buffer compatibility, so XLA never runs them under CUDA-graph capture. The
// choice stays in the cached plan.
// Workspaces come from XLA's scratch allocator. Every CUDA / cuSPARSELt status is checked and returned as an
// ffi::Error naming the call.
#include <cuda_runtime.h>
#include <cusparseLt.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <string>
#include <type_traits>

#include "bitmask.h"
#include "pack_ring.h"
#include "plan_cache.h"
#include "recipe24.h"
#include "sparsify24.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jsparse {
namespace {

ffi::Error to_ffi(const Status& s, const char* op) {
  if (s.empty()) return ffi::Error::Success();
  return ffi::Error::Internal(std::string("jsparse ") + op + ": " + s);
}

int dtype_code(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::BF16: return kBF16;
    case ffi::DataType::F16: return kF16;
    case ffi::DataType::F8E4M3FN: return kE4M3;
    default: return -1;
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

Status current_device(int* device) {
  JSPARSE_CUDA(cudaGetDevice(device));
  return {};
}

// A temporary device buffer for the duration of one handler call: from XLA's scratch allocator (which accepts
// alignments up to 16 bytes; its buffers are 256-byte aligned in practice), else stream-ordered from CUDA's pool
// (cudaMallocAsync / cudaFreeAsync on the same stream, so it is released only after the kernels that use it).
class TempBuffer {
 public:
  TempBuffer(ffi::ScratchAllocator& scratch, size_t size, cudaStream_t stream) : stream_(stream) {
    size = size > 0 ? size : 16;
    auto p = scratch.Allocate(size, 16);
    if (p.has_value() && *p != nullptr && aligned16(*p)) {
      ptr_ = *p;
      return;
    }
    stats().async_allocs++;
    if (cudaMallocAsync(&ptr_, size, stream) != cudaSuccess) {
      (void)cudaGetLastError();  // clear the sticky-free error state of the failed call
      ptr_ = nullptr;
    } else {
      owned_ = true;
    }
  }
  ~TempBuffer() {
    if (owned_) cudaFreeAsync(ptr_, stream_);
  }
  TempBuffer(const TempBuffer&) = delete;
  TempBuffer& operator=(const TempBuffer&) = delete;
  void* get() const { return ptr_; }
  explicit operator bool() const { return ptr_ != nullptr; }

 private:
  void* ptr_ = nullptr;
  bool owned_ = false;
  cudaStream_t stream_;
};

// ---------------------------------------------------------------------------------------------------------------------
// Compress

// Compressed buffers: values (rows * cols / 2 16-bit elements = rows * cols bytes), then the metadata.
inline uint16_t* values_of(void* packed) { return static_cast<uint16_t*>(packed); }
inline uint8_t* meta_of(void* packed, int64_t rows, int64_t cols) {
  return packed ? static_cast<uint8_t*>(packed) + rows * cols : nullptr;
}

template <typename Fn>
Status by_dtype16(int dtype, Fn&& fn) {
  if (dtype == kBF16) return fn(__nv_bfloat16{});
  if (dtype == kF16) return fn(__half{});
  return "the input must be bfloat16 or float16";
}

template <int ACT, bool DENSE_OUT>
Status launch_sparsify(int dtype, const void* x, void* packed, void* dense_out, int64_t rows, int64_t cols,
                       cudaStream_t stream) {
  const int64_t threads = (rows / 2) * (cols / 8);
  const int block = 256;
  const int64_t grid = (threads + block - 1) / block;
  return by_dtype16(dtype, [&](auto t) -> Status {
    sparsify24_kernel<decltype(t), ACT, DENSE_OUT><<<grid, block, 0, stream>>>(
        static_cast<const uint16_t*>(x), values_of(packed), meta_of(packed, rows, cols),
        static_cast<uint16_t*>(dense_out), rows, cols);
    JSPARSE_CUDA(cudaGetLastError());
    return {};
  });
}

Status sparsify(int activation, bool dense_out, int dtype, const void* x, void* packed, void* dense, int64_t rows,
                int64_t cols, cudaStream_t stream) {
  if (activation == kActNone) {
    return dense_out ? launch_sparsify<kActNone, true>(dtype, x, nullptr, dense, rows, cols, stream)
                     : launch_sparsify<kActNone, false>(dtype, x, packed, nullptr, rows, cols, stream);
  }
  return dense_out ? launch_sparsify<kActSquaredRelu, true>(dtype, x, nullptr, dense, rows, cols, stream)
                   : launch_sparsify<kActSquaredRelu, false>(dtype, x, packed, nullptr, rows, cols, stream);
}

bool jsparse_kernel_applies(const CompressEntry& e, int dtype, int64_t rows, int64_t cols) {
  // The kernel writes 16-bit values on 64 x 64 tiles; the library's buffer must have exactly our size.
  return (dtype == kBF16 || dtype == kF16) && rows % 64 == 0 && cols % 64 == 0 &&
         e.size == size_t(rows) * size_t(cols) * 9 / 8;
}

// Compresses a synthetic exactly-2:4 matrix of this shape with the library and with the jsparse kernel and compares
// the buffers byte for byte. Blocking (one device sync per new shape).
Status check_layout(CompressEntry& e, int dtype, int64_t rows, int64_t cols, cudaStream_t stream,
                    ffi::ScratchAllocator& scratch, bool* ok) {
  stats().layout_checks++;
  *ok = false;
  if (!jsparse_kernel_applies(e, dtype, rows, cols)) return {};
  const size_t dense_bytes = size_t(rows) * size_t(cols) * 2;
  TempBuffer dense_t(scratch, dense_bytes, stream), lib_t(scratch, e.size, stream), our_t(scratch, e.size, stream),
      tmp_t(scratch, e.tmp_size, stream), result_t(scratch, 2 * sizeof(unsigned long long), stream);
  void* const dense_p = dense_t.get();
  void* const lib_p = lib_t.get();
  void* const our_p = our_t.get();
  if (!dense_t || !lib_t || !our_t || !tmp_t || !result_t) {
    return "layout check: could not allocate scratch memory for a " + std::to_string(rows) + "x" +
           std::to_string(cols) + " check";
  }
  const int64_t groups = rows * cols / 4;
  const uint32_t seed = uint32_t(rows * 131 + cols * 7 + dtype);
  if (dtype == kBF16) {
    make_test_24_kernel<__nv_bfloat16><<<(groups + 255) / 256, 256, 0, stream>>>(static_cast<uint16_t*>(dense_p),
                                                                              groups, seed);
  } else {
    make_test_24_kernel<__half><<<(groups + 255) / 256, 256, 0, stream>>>(static_cast<uint16_t*>(dense_p), groups,
                                                                       seed);
  }
  JSPARSE_CUDA(cudaGetLastError());
  JSPARSE_CUDA(cudaMemsetAsync(lib_p, 0, e.size, stream));
  JSPARSE_CUDA(cudaMemsetAsync(our_p, 0xA5, e.size, stream));  // different fill: an unwritten byte cannot match
  JSPARSE_CSLT(cusparseLtSpMMACompress2(e.handle, &e.desc, 1, CUSPARSE_OPERATION_NON_TRANSPOSE, dense_p, lib_p,
                                        tmp_t.get(), stream));
  JSPARSE_RETURN_IF_ERROR(sparsify(kActNone, false, dtype, dense_p, our_p, nullptr, rows, cols, stream));
  auto* res = static_cast<unsigned long long*>(result_t.get());
  init_result_kernel<<<1, 1, 0, stream>>>(res, int64_t(e.size));
  count_mismatch_kernel<<<1024, 256, 0, stream>>>(static_cast<const uint8_t*>(lib_p),
                                                  static_cast<const uint8_t*>(our_p), int64_t(e.size), res);
  JSPARSE_CUDA(cudaGetLastError());
  unsigned long long host[2] = {0, 0};
  JSPARSE_CUDA(cudaMemcpyAsync(host, res, sizeof(host), cudaMemcpyDeviceToHost, stream));
  JSPARSE_CUDA(cudaStreamSynchronize(stream));
  *ok = host[0] == 0;
  if (!*ok) {
    stats().layout_mismatches++;
    std::fprintf(stderr,
                 "jsparse: WARNING: the jsparse 2:4 compress kernel does not match cusparseLtSpMMACompress for a "
                 "%lldx%lld %s matrix (%llu of %zu bytes differ, first at byte %llu); falling back to the library's "
                 "compress for this shape (slower).\n",
                 (long long)rows, (long long)cols, dtype == kBF16 ? "bf16" : "fp16", host[0], e.size, host[1]);
  }
  return {};
}

// The cached compress entry of a rows x cols sparse operand, its buffer size checked against the output's; with
// verify, its layout is checked against the library on first use. layout: -1 unchecked, 0 mismatch, 1 verified.
Status compress_entry(cudaStream_t stream, ffi::ScratchAllocator& scratch, int64_t rows, int64_t cols, int dtype,
                      size_t packed_bytes, bool verify, std::shared_ptr<CompressEntry>* entry, int* layout) {
  int device = 0;
  JSPARSE_RETURN_IF_ERROR(current_device(&device));
  std::lock_guard<std::mutex> lock(global_mutex());
  JSPARSE_RETURN_IF_ERROR(get_compress_entry_locked({device, rows, cols, dtype}, entry));
  CompressEntry& e = **entry;
  if (packed_bytes != e.size) {
    return "the compressed buffer has " + std::to_string(packed_bytes) + " bytes, cuSPARSELt needs " +
           std::to_string(e.size);
  }
  if (verify && e.layout < 0) {
    bool ok = false;
    JSPARSE_RETURN_IF_ERROR(check_layout(e, dtype, rows, cols, stream, scratch, &ok));
    e.layout = ok ? 1 : 0;
  }
  *layout = e.layout;
  return {};
}

// cusparseLtSpMMACompress of a dense row-major operand that already is 2:4 into packed.
Status library_compress(CompressEntry& e, const void* source, void* packed, ffi::ScratchAllocator& scratch,
                        cudaStream_t stream) {
  TempBuffer tmp(scratch, e.tmp_size, stream);
  if (!tmp) return "could not allocate cuSPARSELt's compress buffer";
  JSPARSE_CSLT(cusparseLtSpMMACompress2(e.handle, &e.desc, 1, CUSPARSE_OPERATION_NON_TRANSPOSE, source, packed,
                                        tmp.get(), stream));
  return {};
}

enum Method : int { kAuto = 0, kJsparse = 1, kLibrary = 2 };

Status compress(cudaStream_t stream, ffi::ScratchAllocator& scratch, ffi::AnyBuffer x,
                ffi::Result<ffi::AnyBuffer> packed, int32_t activation, int32_t method) {
  const int dtype = dtype_code(x.element_type());
  auto dims = x.dimensions();
  if (dims.size() != 2) return "x must be 2-D (rows, cols)";
  const int64_t rows = dims[0], cols = dims[1];
  if (dtype < 0) return "x must be bfloat16, float16 or float8_e4m3fn";
  if (dtype == kE4M3 && (method != kLibrary || activation != kActNone)) {
    return "float8_e4m3fn operands are compressed by the library only (method='library', no activation)";
  }
  if (activation != kActNone && activation != kActSquaredRelu) return "unknown activation";
  if (packed->element_type() != ffi::DataType::U8) return "the compressed buffer must be uint8";
  if (!aligned16(x.untyped_data()) || !aligned16(packed->untyped_data())) return "buffers must be 16-byte aligned";
  std::shared_ptr<CompressEntry> entry;
  int layout = -1;
  JSPARSE_RETURN_IF_ERROR(
      compress_entry(stream, scratch, rows, cols, dtype, packed->size_bytes(), method == kAuto, &entry, &layout));
  const bool ours = method == kJsparse || (method == kAuto && layout == 1);
  if (ours) {
    if (!jsparse_kernel_applies(*entry, dtype, rows, cols)) {
      return "the jsparse compress kernel needs 16-bit data, rows and cols multiples of 64 and cuSPARSELt's "
             "compressed size to be rows*cols*9/8 bytes";
    }
    stats().compress_jsparse++;
    return sparsify(activation, false, dtype, x.untyped_data(), packed->untyped_data(), nullptr, rows, cols, stream);
  }
  stats().compress_library++;
  const void* source = x.untyped_data();
  // On the auto fallback keep the op's contract (the selection of nm_prune / squared_relu_nm): select with the
  // jsparse kernel into a dense temporary copy, then let the library compress that.
  if (method != kAuto && activation != kActNone) {
    return "method='library' takes an already-2:4 input and no activation";
  }
  TempBuffer pruned(scratch, method == kAuto ? size_t(rows) * size_t(cols) * 2 : 16, stream);
  if (method == kAuto) {
    if (!pruned) return "could not allocate memory for the pruned copy";
    JSPARSE_RETURN_IF_ERROR(sparsify(activation, true, dtype, source, nullptr, pruned.get(), rows, cols, stream));
    source = pruned.get();
  }
  return library_compress(*entry, source, packed->untyped_data(), scratch, stream);
}

ffi::Error CompressImpl(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer x,
                        ffi::Result<ffi::AnyBuffer> packed, int32_t activation, int32_t method) {
  return to_ffi(compress(stream, scratch, x, packed, activation, method), "compress");
}

// The compressed form of A = x^T (x: cols x rows, row-major), 2:4 along x's first axis, plus the unpruned rows of A
// named by slot (slot[r] >= 0: row r goes to dense_rows[slot[r]]). The layout is checked against the library once
// per shape exactly as in compress (the transposed kernel writes it through the same code); on a mismatch the kernel
// writes the pruned A densely and the library compresses that.
template <bool DENSE_OUT>
Status launch_sparsify_t(int dtype, const void* x, void* packed, void* dense_out, const int32_t* slot,
                         void* dense_rows, int64_t rows, int64_t cols, cudaStream_t stream) {
  const dim3 grid(unsigned(cols / 64), unsigned(rows / 64));
  return by_dtype16(dtype, [&](auto t) -> Status {
    sparsify24_t_kernel<decltype(t), DENSE_OUT><<<grid, 256, 0, stream>>>(
        static_cast<const uint16_t*>(x), values_of(packed), meta_of(packed, rows, cols),
        static_cast<uint16_t*>(dense_out), slot, static_cast<uint16_t*>(dense_rows), rows, cols);
    JSPARSE_CUDA(cudaGetLastError());
    return {};
  });
}

Status compress_t(cudaStream_t stream, ffi::ScratchAllocator& scratch, ffi::AnyBuffer x, ffi::AnyBuffer slot,
                  ffi::Result<ffi::AnyBuffer> packed, ffi::Result<ffi::AnyBuffer> dense_rows, int32_t method) {
  const int dtype = dtype_code(x.element_type());
  auto dims = x.dimensions();
  if (dims.size() != 2) return "x must be 2-D (cols, rows): the transpose of the sparse operand";
  const int64_t cols = dims[0], rows = dims[1];
  if (dtype != kBF16 && dtype != kF16) return "x must be bfloat16 or float16";
  if (rows % 64 || cols % 64) return "both axes of x must be multiples of 64";
  if (slot.element_type() != ffi::DataType::S32 || slot.element_count() != size_t(rows)) {
    return "slot must be int32 with one entry per row of the sparse operand (x's second axis)";
  }
  auto rd = dense_rows->dimensions();
  if (dense_rows->element_type() != x.element_type() || rd.size() != 2 || rd[1] != cols) {
    return "dense_rows must be (n, cols) in x's dtype";
  }
  if (packed->element_type() != ffi::DataType::U8) return "the compressed buffer must be uint8";
  if (!aligned16(x.untyped_data()) || !aligned16(packed->untyped_data()) ||
      !aligned16(dense_rows->untyped_data())) {
    return "buffers must be 16-byte aligned";
  }
  if (method != kAuto && method != kJsparse && method != kLibrary) return "unknown method";
  std::shared_ptr<CompressEntry> entry;
  int layout = -1;
  JSPARSE_RETURN_IF_ERROR(compress_entry(stream, scratch, rows, cols, dtype, packed->size_bytes(), method == kAuto,
                                         &entry, &layout));
  const int32_t* slot_p = static_cast<const int32_t*>(slot.untyped_data());
  if (method == kJsparse && !jsparse_kernel_applies(*entry, dtype, rows, cols)) {
    return "the jsparse compress kernel needs cuSPARSELt's compressed size to be rows*cols*9/8 bytes";
  }
  // method: auto (the kernel where the layout check passed, else the fallback), or forced (tests: library forces the
  // fallback, which otherwise runs only on a layout mismatch).
  if (method == kJsparse || (method == kAuto && layout == 1)) {
    stats().compress_jsparse++;
    return launch_sparsify_t<false>(dtype, x.untyped_data(), packed->untyped_data(), nullptr, slot_p,
                                    dense_rows->untyped_data(), rows, cols, stream);
  }
  stats().compress_library++;
  TempBuffer pruned(scratch, size_t(rows) * size_t(cols) * 2, stream);
  if (!pruned) return "could not allocate memory for the pruned copy";
  JSPARSE_RETURN_IF_ERROR(launch_sparsify_t<true>(dtype, x.untyped_data(), nullptr, pruned.get(), slot_p,
                                                  dense_rows->untyped_data(), rows, cols, stream));
  return library_compress(*entry, pruned.get(), packed->untyped_data(), scratch, stream);
}

ffi::Error CompressTImpl(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer x, ffi::AnyBuffer slot,
                         ffi::Result<ffi::AnyBuffer> packed, ffi::Result<ffi::AnyBuffer> dense_rows, int32_t method) {
  return to_ffi(compress_t(stream, scratch, x, slot, packed, dense_rows, method), "compress_t");
}

// ---------------------------------------------------------------------------------------------------------------------
// The activation recipe's backward operands (recipe24.h)

// counts (zeroed by the caller) += relu_count_kernel's counts of y (rows x cols, cols % 64 == 0); SQUARE_OUT: and h.
template <bool MASK24, bool SQUARE_OUT>
Status launch_relu_counts(int dtype, const void* y, void* counts, void* h, int64_t rows, int64_t cols,
                          cudaStream_t stream) {
  if (rows == 0 || cols == 0) return {};
  const dim3 grid(unsigned(cols / 64), unsigned((rows + 255) / 256));
  return by_dtype16(dtype, [&](auto t) -> Status {
    relu_count_kernel<decltype(t), MASK24, SQUARE_OUT><<<grid, 256, 0, stream>>>(
        static_cast<const uint16_t*>(y), static_cast<int32_t*>(counts), static_cast<uint16_t*>(h), rows, cols);
    JSPARSE_CUDA(cudaGetLastError());
    return {};
  });
}

Status check_counts_input(ffi::AnyBuffer y, ffi::Result<ffi::AnyBuffer>& counts) {
  auto dims = y.dimensions();
  if (dims.size() != 2) return "y must be 2-D (tokens, features)";
  if (dims[1] % 64) return "the feature axis must be a multiple of 64";
  if (counts->element_type() != ffi::DataType::S32 || counts->element_count() != size_t(dims[1])) {
    return "counts must be int32 with one entry per feature";
  }
  if (!aligned16(y.untyped_data())) return "y must be 16-byte aligned";
  return {};
}

// mask24 == 0: the counts of y > 0 (no 2:4 activation).
Status relu24_counts(cudaStream_t stream, ffi::AnyBuffer y, ffi::Result<ffi::AnyBuffer> counts, int32_t mask24) {
  JSPARSE_RETURN_IF_ERROR(check_counts_input(y, counts));
  const int64_t rows = y.dimensions()[0], cols = y.dimensions()[1];
  JSPARSE_CUDA(cudaMemsetAsync(counts->untyped_data(), 0, size_t(cols) * sizeof(int32_t), stream));
  auto run = mask24 ? launch_relu_counts<true, false> : launch_relu_counts<false, false>;
  return run(dtype_code(y.element_type()), y.untyped_data(), counts->untyped_data(), nullptr, rows, cols, stream);
}

// h = relu(y)^2 (dense, y's shape and dtype) and counts[f] = #{t : y[t, f] > 0} from one read of y: the forward of a
// squared-ReLU FFN whose weight gradients take the token-wise 2:4 split without a 2:4 activation.
Status squared_relu_counts(cudaStream_t stream, ffi::AnyBuffer y, ffi::Result<ffi::AnyBuffer> h,
                           ffi::Result<ffi::AnyBuffer> counts) {
  JSPARSE_RETURN_IF_ERROR(check_counts_input(y, counts));
  const int64_t rows = y.dimensions()[0], cols = y.dimensions()[1];
  if (h->element_type() != y.element_type() || h->element_count() != y.element_count()) {
    return "h must have y's shape and dtype";
  }
  if (!aligned16(h->untyped_data())) return "h must be 16-byte aligned";
  JSPARSE_CUDA(cudaMemsetAsync(counts->untyped_data(), 0, size_t(cols) * sizeof(int32_t), stream));
  return launch_relu_counts<false, true>(dtype_code(y.element_type()), y.untyped_data(), counts->untyped_data(),
                                         h->untyped_data(), rows, cols, stream);
}

ffi::Error SquaredReluCountsImpl(cudaStream_t stream, ffi::AnyBuffer y, ffi::Result<ffi::AnyBuffer> h,
                                 ffi::Result<ffi::AnyBuffer> counts) {
  return to_ffi(squared_relu_counts(stream, y, h, counts), "squared_relu_counts");
}

ffi::Error Relu24CountsImpl(cudaStream_t stream, ffi::AnyBuffer y, ffi::Result<ffi::AnyBuffer> counts,
                             int32_t mask24) {
  return to_ffi(relu24_counts(stream, y, counts, mask24), "relu24_counts");
}

// compress(activation=squared_relu) and relu24_counts of the same input from one read of it (the recipe's forward).
// Where the layout check failed, the two run as their separate kernels (the compress through its fallback).
Status compress_counts(cudaStream_t stream, ffi::ScratchAllocator& scratch, ffi::AnyBuffer x,
                       ffi::Result<ffi::AnyBuffer> packed, ffi::Result<ffi::AnyBuffer> counts) {
  const int dtype = dtype_code(x.element_type());
  auto dims = x.dimensions();
  if (dims.size() != 2) return "x must be 2-D (tokens, features)";
  const int64_t rows = dims[0], cols = dims[1];
  if (dtype != kBF16 && dtype != kF16) return "x must be bfloat16 or float16";
  if (rows % 64 || cols % 64) return "tokens and features must be multiples of 64";
  if (counts->element_type() != ffi::DataType::S32 || counts->element_count() != size_t(cols)) {
    return "counts must be int32 with one entry per feature";
  }
  if (packed->element_type() != ffi::DataType::U8) return "the compressed buffer must be uint8";
  if (!aligned16(x.untyped_data()) || !aligned16(packed->untyped_data())) return "buffers must be 16-byte aligned";
  std::shared_ptr<CompressEntry> entry;
  int layout = -1;
  JSPARSE_RETURN_IF_ERROR(
      compress_entry(stream, scratch, rows, cols, dtype, packed->size_bytes(), true, &entry, &layout));
  JSPARSE_CUDA(cudaMemsetAsync(counts->untyped_data(), 0, size_t(cols) * sizeof(int32_t), stream));
  if (layout == 1 && jsparse_kernel_applies(*entry, dtype, rows, cols)) {
    stats().compress_jsparse++;
    const dim3 grid(unsigned(cols / 64), unsigned((rows + 255) / 256));
    return by_dtype16(dtype, [&](auto t) -> Status {
      relu24_compress_count_kernel<decltype(t)><<<grid, 256, 0, stream>>>(
          static_cast<const uint16_t*>(x.untyped_data()), values_of(packed->untyped_data()),
          meta_of(packed->untyped_data(), rows, cols), static_cast<int32_t*>(counts->untyped_data()), rows, cols);
      JSPARSE_CUDA(cudaGetLastError());
      return {};
    });
  }
  JSPARSE_RETURN_IF_ERROR(compress(stream, scratch, x, packed, kActSquaredRelu, kAuto));  // its own fallback
  return launch_relu_counts<true, false>(dtype, x.untyped_data(), counts->untyped_data(), nullptr, rows, cols,
                                         stream);
}

ffi::Error CompressCountsImpl(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer x,
                              ffi::Result<ffi::AnyBuffer> packed, ffi::Result<ffi::AnyBuffer> counts) {
  return to_ffi(compress_counts(stream, scratch, x, packed, counts), "compress_counts");
}

template <bool DENSE_OUT, bool MASK24>
Status launch_recipe_bwd(int dtype, const void* y1, const void* dy2, const int32_t* slot, void* dx, void* h, void* g,
                         void* dense_h, void* dense_g, void* dx_dense, void* h_dense, void* g_dense, int64_t rows,
                         int64_t cols, cudaStream_t stream) {
  const dim3 grid(unsigned(cols / 64), unsigned(rows / 64));
  return by_dtype16(dtype, [&](auto t) -> Status {
    recipe_bwd24_kernel<decltype(t), DENSE_OUT, MASK24><<<grid, 256, 0, stream>>>(
        static_cast<const uint16_t*>(y1), static_cast<const uint16_t*>(dy2), slot, values_of(dx),
        meta_of(dx, rows, cols), values_of(h), meta_of(h, rows, cols), values_of(g), meta_of(g, rows, cols),
        static_cast<uint16_t*>(dense_h), static_cast<uint16_t*>(dense_g), static_cast<uint16_t*>(dx_dense),
        static_cast<uint16_t*>(h_dense), static_cast<uint16_t*>(g_dense), rows, cols);
    JSPARSE_CUDA(cudaGetLastError());
    return {};
  });
}

// dx (T x F compressed), h^T and dy1^T (F x T compressed) and the dense rows, from y1 and dy2 (T x F). The layouts are
// checked against the library once per shape as in compress; where either did not match (or method == library) the
// kernel writes the pruned operands densely and the library compresses them. mask24 == 0 (no 2:4 activation): dx is
// dy1 itself, dense (T x F in y1's dtype), and only the F x T layout is needed.
Status recipe_bwd(cudaStream_t stream, ffi::ScratchAllocator& scratch, ffi::AnyBuffer y1, ffi::AnyBuffer dy2,
                  ffi::AnyBuffer slot, ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> h,
                  ffi::Result<ffi::AnyBuffer> g, ffi::Result<ffi::AnyBuffer> dense_h,
                  ffi::Result<ffi::AnyBuffer> dense_g, int32_t method, int32_t mask24) {
  const int dtype = dtype_code(y1.element_type());
  auto dims = y1.dimensions();
  if (dims.size() != 2) return "y1 must be 2-D (tokens, features)";
  const int64_t rows = dims[0], cols = dims[1];
  if (dtype != kBF16 && dtype != kF16) return "y1 must be bfloat16 or float16";
  if (dy2.element_type() != y1.element_type() || dy2.dimensions().size() != 2 || dy2.dimensions()[0] != rows ||
      dy2.dimensions()[1] != cols) {
    return "dy2 must have y1's shape and dtype";
  }
  if (rows % 64 || cols % 64) return "tokens and features must be multiples of 64";
  if (slot.element_type() != ffi::DataType::S32 || slot.element_count() != size_t(cols)) {
    return "slot must be int32 with one entry per feature";
  }
  for (auto* d : {&dense_h, &dense_g}) {
    auto rd = (*d)->dimensions();
    if ((*d)->element_type() != y1.element_type() || rd.size() != 2 || rd[1] != rows) {
      return "the dense rows must be (n, tokens) in y1's dtype";
    }
  }
  if (mask24 && dx->element_type() != ffi::DataType::U8) return "the compressed buffers must be uint8";
  if (!mask24 && (dx->element_type() != y1.element_type() || dx->element_count() != y1.element_count())) {
    return "without the 2:4 activation dx (dy1) must have y1's shape and dtype";
  }
  for (auto* p : {&h, &g}) {
    if ((*p)->element_type() != ffi::DataType::U8) return "the compressed buffers must be uint8";
  }
  for (auto* p : {&dx, &h, &g, &dense_h, &dense_g}) {
    if (!aligned16((*p)->untyped_data())) return "buffers must be 16-byte aligned";
  }
  if (!aligned16(y1.untyped_data()) || !aligned16(dy2.untyped_data())) return "buffers must be 16-byte aligned";
  if (h->size_bytes() != g->size_bytes()) return "h and g must have the same compressed size";
  if (method != kAuto && method != kJsparse && method != kLibrary) return "unknown method";
  std::shared_ptr<CompressEntry> entry_tf, entry_ft;
  int layout_tf = 1, layout_ft = -1;
  if (mask24) {
    JSPARSE_RETURN_IF_ERROR(compress_entry(stream, scratch, rows, cols, dtype, dx->size_bytes(), method == kAuto,
                                           &entry_tf, &layout_tf));
  }
  JSPARSE_RETURN_IF_ERROR(compress_entry(stream, scratch, cols, rows, dtype, h->size_bytes(), method == kAuto,
                                         &entry_ft, &layout_ft));
  if (method == kJsparse && !((!mask24 || jsparse_kernel_applies(*entry_tf, dtype, rows, cols)) &&
                              jsparse_kernel_applies(*entry_ft, dtype, cols, rows))) {
    return "the jsparse compress kernel needs cuSPARSELt's compressed size to be rows*cols*9/8 bytes";
  }
  const int32_t* slot_p = static_cast<const int32_t*>(slot.untyped_data());
  const int n_compressed = mask24 ? 3 : 2;
  if (method == kJsparse || (method == kAuto && layout_tf == 1 && layout_ft == 1)) {
    stats().compress_jsparse += n_compressed;
    auto run = mask24 ? launch_recipe_bwd<false, true> : launch_recipe_bwd<false, false>;
    return run(dtype, y1.untyped_data(), dy2.untyped_data(), slot_p, mask24 ? dx->untyped_data() : nullptr,
               h->untyped_data(), g->untyped_data(), dense_h->untyped_data(), dense_g->untyped_data(),
               mask24 ? nullptr : dx->untyped_data(), nullptr, nullptr, rows, cols, stream);
  }
  stats().compress_library += n_compressed;
  const size_t bytes = size_t(rows) * size_t(cols) * 2;
  TempBuffer dx_d(scratch, mask24 ? bytes : 16, stream), h_d(scratch, bytes, stream), g_d(scratch, bytes, stream);
  if (!dx_d || !h_d || !g_d) return "could not allocate memory for the pruned copies";
  auto run = mask24 ? launch_recipe_bwd<true, true> : launch_recipe_bwd<true, false>;
  JSPARSE_RETURN_IF_ERROR(run(dtype, y1.untyped_data(), dy2.untyped_data(), slot_p, nullptr, nullptr, nullptr,
                              dense_h->untyped_data(), dense_g->untyped_data(),
                              mask24 ? dx_d.get() : dx->untyped_data(), h_d.get(), g_d.get(), rows, cols, stream));
  if (mask24) JSPARSE_RETURN_IF_ERROR(library_compress(*entry_tf, dx_d.get(), dx->untyped_data(), scratch, stream));
  JSPARSE_RETURN_IF_ERROR(library_compress(*entry_ft, h_d.get(), h->untyped_data(), scratch, stream));
  return library_compress(*entry_ft, g_d.get(), g->untyped_data(), scratch, stream);
}

ffi::Error RecipeBwdImpl(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer y1, ffi::AnyBuffer dy2,
                         ffi::AnyBuffer slot, ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> h,
                         ffi::Result<ffi::AnyBuffer> g, ffi::Result<ffi::AnyBuffer> dense_h,
                         ffi::Result<ffi::AnyBuffer> dense_g, int32_t method, int32_t mask24) {
  return to_ffi(recipe_bwd(stream, scratch, y1, dy2, slot, dx, h, g, dense_h, dense_g, method, mask24),
                "recipe_bwd");
}

// ---------------------------------------------------------------------------------------------------------------------
// Bitmask packer (bitmask.h): pack_bitmask / unpack_bitmask's CUDA path

enum BitmaskDtype : int { kBitmaskBF16 = 0, kBitmaskF16 = 1, kBitmaskF32 = 2 };

int bitmask_dtype(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::BF16: return kBitmaskBF16;
    case ffi::DataType::F16: return kBitmaskF16;
    case ffi::DataType::F32: return kBitmaskF32;
    default: return -1;
  }
}

// Tail zeroers of the pack: values-buffer elements each one owns.
constexpr int64_t kBitmaskZeroSpan = 65536;

bool is_shape(ffi::AnyBuffer::Dimensions d, std::initializer_list<int64_t> want) {
  if (d.size() != want.size()) return false;
  size_t i = 0;
  for (int64_t w : want) {
    if (d[i++] != w) return false;
  }
  return true;
}

// Checks the dense (R, C) array against the packed arrays' shapes; fills rows, cols, the 16-byte vectors per row and
// the band count.
Status bitmask_shapes(ffi::AnyBuffer::Dimensions dense, ffi::DataType dtype, ffi::AnyBuffer::Dimensions bits,
                      ffi::AnyBuffer::Dimensions offsets, int64_t* rows, int64_t* cols, int64_t* row_vectors,
                      int64_t* n_bands, int items = bitmask::kItems) {
  if (bitmask_dtype(dtype) < 0) return "the dense array must be bfloat16, float16 or float32";
  if (dense.size() != 2) return "the dense array must be 2-D";
  *rows = dense[0];
  *cols = dense[1];
  if (*rows < 1 || *cols < 32 || *cols % 32) return "rows must be >= 1 and the row length a positive multiple of 32";
  if (!is_shape(bits, {*rows, *cols / 32})) return "bits must be (rows, cols / 32)";
  if (!is_shape(offsets, {*rows})) return "row_offsets must be (rows,)";
  const int64_t elements_per_vector = 16 / int64_t(ffi::ByteWidth(dtype));
  *row_vectors = *cols / elements_per_vector;
  const int64_t n_vectors = *rows * *row_vectors;
  const int64_t band = int64_t(bitmask::kThreads) * items;
  *n_bands = (n_vectors + band - 1) / band;
  return {};
}

// The pack's launch configurations (the Python wrapper's PACK_VARIANTS): the ring pack's (pack_ring.h: vectors per
// compute thread, bands in shared memory, lag, compute groups) and pack_kernel's (bitmask.h: vectors per thread,
// blocks per SM the registers must allow). 0 is the default. Before Hopper it is replaced by variant 1, pack_kernel's
// bands of the same size (so the same band counts), which exists for every dtype; the others are bfloat16-only, for
// the benchmark's sweep, and the ring variants are an error before Hopper.
//
// Measured (H100, 16384 x 8192 bf16, 85% / 95% zeros, interleaved in one process,
// benchmarks/results/remat_pack_variants.json; copy 0.191 ms): the ring with 32 KiB bands, 6 stages and a lag of 3
// 0.243 / 0.230 ms; a lag of 2 0.249 / 0.234; 48 KiB bands in 4 stages 0.246 / 0.230; two compute groups of 24 KiB
// bands in 8 stages 0.242 / 0.229 (no faster: the second group shrinks the ring's in-flight part); pack_kernel with
// 32 KiB bands at 2 blocks per SM 0.270 / 0.254, 16 KiB at 4 0.285 / 0.272. In earlier processes of the same session:
// a lag of 1 0.281 / 0.270 (a band's look-back waits for predecessors still in other blocks' rings), two groups of
// 32 KiB bands 0.28-0.32 (they spill at the 96 registers 18 warps allow), and, dropped, pack_kernel with a 4-flag
// look-back window (0.281 / 0.269), 6 items at 3 blocks (0.276 / 0.258) and the scalar mask and squares (0.296 /
// 0.277). Dropped before (git history): 4 items at 5 blocks and 2 items at 8 (both spill; 0.302 / 0.291 and 0.338 /
// 0.325), no register bound (0.41 / 0.39), a pipelined persistent pack_kernel (cp.async of the next band into shared
// memory, counted during the look-back; 0.283 / 0.272; 92458b8), persistent blocks loading the next band into
// registers (034fe81) and segments of several bands written in a second pass (2e0b922).
using DefaultPack = bitmask::RingConfig<8, 6, 3>;
using FallbackPack = bitmask::PackConfig<8, 2>;
static_assert(DefaultPack::ITEMS == FallbackPack::ITEMS, "the fallback must cut the same bands");
constexpr int kPackFallbackVariant = 1;

// Calls fn(CFG{}) with variant's configuration and returns true, or returns false for a variant unknown for the dtype
// (ALL_VARIANTS: bfloat16, or a lookup that launches nothing).
template <bool ALL_VARIANTS, typename Fn>
bool visit_pack_variant(int variant, Fn&& fn) {
  if (variant == 0) {
    fn(DefaultPack{});
    return true;
  }
  if (variant == kPackFallbackVariant) {  // for every dtype: the default's stand-in before Hopper
    fn(FallbackPack{});
    return true;
  }
  if constexpr (ALL_VARIANTS) {
    switch (variant) {
      case 2: fn(bitmask::PackConfig<4, 4>{}); return true;
      case 3: fn(bitmask::RingConfig<8, 6, 2>{}); return true;
      case 4: fn(bitmask::RingConfig<12, 4, 2>{}); return true;
      case 5: fn(bitmask::RingConfig<6, 8, 2, 2>{}); return true;
      default: break;
    }
  }
  return false;
}

template <bool RELU_, bool SQUARE_>
struct KernelFlags {
  static constexpr bool RELU = RELU_, SQUARE = SQUARE_;
};

// The current device, as the pack's launch needs it: queried once per call.
struct PackDevice {
  int device = 0, sms = 0, major = 0;
  bool ring() const { return major >= 9; }  // sm_90's bulk copies and transaction-counted mbarriers
};

Status pack_device(PackDevice* d) {
  JSPARSE_CUDA(cudaGetDevice(&d->device));
  JSPARSE_CUDA(cudaDeviceGetAttribute(&d->sms, cudaDevAttrMultiProcessorCount, d->device));
  JSPARSE_CUDA(cudaDeviceGetAttribute(&d->major, cudaDevAttrComputeCapabilityMajor, d->device));
  return {};
}

template <typename T, typename CFG>
Status launch_bitmask_pack(const PackDevice& dev, bool relu, const void* x, int64_t n_vectors, int64_t row_vectors,
                           int64_t n_bands, int64_t capacity, void* bits, void* values, void* offsets, void* counts,
                           void* h, unsigned long long* state, cudaStream_t stream) {
  using Raw = typename Elem<T>::Raw;
  const int64_t n_zero = (capacity + kBitmaskZeroSpan - 1) / kBitmaskZeroSpan;
  Status status;
  auto run = [&](auto flags) {
    using K = decltype(flags);
    if constexpr (CFG::RING) {
      auto kernel = bitmask::pack_ring_kernel<T, K::RELU, K::SQUARE, CFG>;
      // Above 48 KiB of dynamic shared memory a kernel must opt in, once per device (up to 64 devices remembered).
      static std::atomic<unsigned long long> opted_in{0};
      const unsigned long long bit = 1ull << (dev.device & 63);
      if (!(opted_in.load() & bit)) {
        const cudaError_t e =
            cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, CFG::kDynamicSmem);
        if (e != cudaSuccess) {
          status = std::string("the ring pack's launch setup: ") + cudaGetErrorString(e);
          return;
        }
        opted_in |= bit;
      }
      kernel<<<dim3(unsigned(dev.sms)), CFG::kThreads, CFG::kDynamicSmem, stream>>>(
          static_cast<const uint4*>(x), int(n_vectors), int(row_vectors), int(n_bands), capacity,
          static_cast<uint32_t*>(bits), static_cast<Raw*>(values), static_cast<int32_t*>(offsets),
          static_cast<int32_t*>(counts), static_cast<uint4*>(h), state);
    } else {
      bitmask::pack_kernel<T, K::RELU, K::SQUARE, CFG>
          <<<dim3(unsigned(n_bands + n_zero)), bitmask::kThreads, 0, stream>>>(
              static_cast<const uint4*>(x), int(n_vectors), int(row_vectors), int(n_bands), capacity,
              kBitmaskZeroSpan, static_cast<uint32_t*>(bits), static_cast<Raw*>(values),
              static_cast<int32_t*>(offsets), static_cast<int32_t*>(counts), static_cast<uint4*>(h), state);
    }
  };
  if (relu) {
    h ? run(KernelFlags<true, true>{}) : run(KernelFlags<true, false>{});
  } else {
    h ? run(KernelFlags<false, true>{}) : run(KernelFlags<false, false>{});
  }
  if (!status.empty()) return status;
  JSPARSE_CUDA(cudaGetLastError());
  return {};
}

Status bitmask_pack(cudaStream_t stream, ffi::ScratchAllocator& scratch, ffi::AnyBuffer x,
                    ffi::Result<ffi::AnyBuffer> bits, ffi::Result<ffi::AnyBuffer> values,
                    ffi::Result<ffi::AnyBuffer> offsets, ffi::Result<ffi::AnyBuffer> counts, ffi::AnyBuffer* h,
                    int32_t relu, int32_t variant) {
  int items = 0;
  bool ring = false;
  if (!visit_pack_variant<true>(variant, [&](auto cfg) {
        items = decltype(cfg)::ITEMS;
        ring = decltype(cfg)::RING;
      })) {
    return "unknown pack variant " + std::to_string(variant);
  }
  PackDevice dev;
  JSPARSE_RETURN_IF_ERROR(pack_device(&dev));
  if (ring && !dev.ring()) {
    if (variant != 0) return "pack variant " + std::to_string(variant) + " needs an sm_90 GPU";
    variant = kPackFallbackVariant;
  }
  int64_t rows, cols, row_vectors, n_bands;
  JSPARSE_RETURN_IF_ERROR(bitmask_shapes(x.dimensions(), x.element_type(), bits->dimensions(),
                                         offsets->dimensions(), &rows, &cols, &row_vectors, &n_bands, items));
  if (bits->element_type() != ffi::DataType::U32) return "bits must be uint32";
  if (offsets->element_type() != ffi::DataType::S32) return "row_offsets must be int32";
  if (counts->element_type() != ffi::DataType::S32 || !is_shape(counts->dimensions(), {n_bands})) {
    return "band counts must be int32 (" + std::to_string(n_bands) + ",)";
  }
  if (values->element_type() != x.element_type() || values->dimensions().size() != 1) {
    return "values must be 1-D with the input's dtype";
  }
  const int64_t capacity = values->dimensions()[0];
  if (capacity < 1 || capacity >= (int64_t(1) << 30)) return "the capacity must be in [1, 2**30)";
  if (h && (h->element_type() != x.element_type() || !is_shape(h->dimensions(), {rows, cols}))) {
    return "h must match the input";
  }
  if (!aligned16(x.untyped_data()) || !aligned16(values->untyped_data()) || (h && !aligned16(h->untyped_data()))) {
    return "buffers must be 16-byte aligned";
  }
  const int64_t n_vectors = rows * row_vectors;
  if (n_vectors >= (int64_t(1) << 31) - 2 * bitmask::kThreads * items) {
    return "the input must have fewer than 2**31 16-byte vectors (the pack indexes them in int32)";
  }
  TempBuffer state(scratch, size_t(n_bands + 1) * sizeof(unsigned long long), stream);
  if (!state) return "could not allocate the look-back flags";
  JSPARSE_CUDA(cudaMemsetAsync(state.get(), 0, size_t(n_bands + 1) * sizeof(unsigned long long), stream));
  auto* st = static_cast<unsigned long long*>(state.get());
  void* hp = h ? h->untyped_data() : nullptr;
  auto launch = [&](auto tag) -> Status {
    using T = decltype(tag);
    Status status;
    const bool known = visit_pack_variant<std::is_same<T, __nv_bfloat16>::value>(variant, [&](auto cfg) {
      status = launch_bitmask_pack<T, decltype(cfg)>(dev, relu, x.untyped_data(), n_vectors, row_vectors, n_bands,
                                                     capacity, bits->untyped_data(), values->untyped_data(),
                                                     offsets->untyped_data(), counts->untyped_data(), hp, st, stream);
    });
    if (!known) return "pack variant " + std::to_string(variant) + " exists for bfloat16 only";
    return status;
  };
  switch (bitmask_dtype(x.element_type())) {
    case kBitmaskBF16: return launch(__nv_bfloat16{});
    case kBitmaskF16: return launch(__half{});
    default: return launch(float{});
  }
}

ffi::Error BitmaskPackImpl(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer x,
                           ffi::Result<ffi::AnyBuffer> bits, ffi::Result<ffi::AnyBuffer> values,
                           ffi::Result<ffi::AnyBuffer> offsets, ffi::Result<ffi::AnyBuffer> counts, int32_t relu,
                           int32_t variant) {
  return to_ffi(bitmask_pack(stream, scratch, x, bits, values, offsets, counts, nullptr, relu, variant),
                "bitmask_pack");
}

ffi::Error BitmaskPackSquareImpl(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer x,
                                 ffi::Result<ffi::AnyBuffer> bits, ffi::Result<ffi::AnyBuffer> values,
                                 ffi::Result<ffi::AnyBuffer> offsets, ffi::Result<ffi::AnyBuffer> counts,
                                 ffi::Result<ffi::AnyBuffer> h, int32_t relu, int32_t variant) {
  ffi::AnyBuffer hb = *h;
  return to_ffi(bitmask_pack(stream, scratch, x, bits, values, offsets, counts, &hb, relu, variant), "bitmask_pack");
}

template <typename T>
Status launch_bitmask_unpack(const void* bits, const void* offsets, const void* values, int64_t capacity,
                             int64_t n_vectors, int64_t row_vectors, int64_t n_bands, void* r, void* h,
                             cudaStream_t stream) {
  using Raw = typename Elem<T>::Raw;
  auto args = [&](auto kernel) {
    kernel<<<dim3(unsigned(n_bands)), bitmask::kThreads, 0, stream>>>(
        static_cast<const uint32_t*>(bits), static_cast<const int32_t*>(offsets), static_cast<const Raw*>(values),
        capacity, n_vectors, row_vectors, static_cast<uint4*>(r), static_cast<uint4*>(h));
  };
  h ? args(bitmask::unpack_kernel<T, true>) : args(bitmask::unpack_kernel<T, false>);
  JSPARSE_CUDA(cudaGetLastError());
  return {};
}

Status bitmask_unpack(cudaStream_t stream, ffi::AnyBuffer bits, ffi::AnyBuffer offsets, ffi::AnyBuffer values,
                      ffi::Result<ffi::AnyBuffer> r, ffi::AnyBuffer* h) {
  int64_t rows, cols, row_vectors, n_bands;
  JSPARSE_RETURN_IF_ERROR(bitmask_shapes(r->dimensions(), r->element_type(), bits.dimensions(), offsets.dimensions(),
                                         &rows, &cols, &row_vectors, &n_bands));
  if (bits.element_type() != ffi::DataType::U32) return "bits must be uint32";
  if (offsets.element_type() != ffi::DataType::S32) return "row_offsets must be int32";
  if (values.element_type() != r->element_type() || values.dimensions().size() != 1 || values.dimensions()[0] < 1) {
    return "values must be non-empty, 1-D, with the output's dtype";
  }
  if (h && (h->element_type() != r->element_type() || !is_shape(h->dimensions(), {rows, cols}))) {
    return "h must match r";
  }
  if (!aligned16(values.untyped_data()) || !aligned16(r->untyped_data()) || (h && !aligned16(h->untyped_data()))) {
    return "buffers must be 16-byte aligned";
  }
  const int64_t capacity = values.dimensions()[0], n_vectors = rows * row_vectors;
  void* hp = h ? h->untyped_data() : nullptr;
  auto launch = [&](auto tag) {
    return launch_bitmask_unpack<decltype(tag)>(bits.untyped_data(), offsets.untyped_data(), values.untyped_data(),
                                                capacity, n_vectors, row_vectors, n_bands, r->untyped_data(), hp,
                                                stream);
  };
  switch (bitmask_dtype(r->element_type())) {
    case kBitmaskBF16: return launch(__nv_bfloat16{});
    case kBitmaskF16: return launch(__half{});
    default: return launch(float{});
  }
}

ffi::Error BitmaskUnpackImpl(cudaStream_t stream, ffi::AnyBuffer bits, ffi::AnyBuffer offsets, ffi::AnyBuffer values,
                             ffi::Result<ffi::AnyBuffer> r) {
  return to_ffi(bitmask_unpack(stream, bits, offsets, values, r, nullptr), "bitmask_unpack");
}

ffi::Error BitmaskUnpackSquareImpl(cudaStream_t stream, ffi::AnyBuffer bits, ffi::AnyBuffer offsets,
                                   ffi::AnyBuffer values, ffi::Result<ffi::AnyBuffer> r,
                                   ffi::Result<ffi::AnyBuffer> h) {
  ffi::AnyBuffer hb = *h;
  return to_ffi(bitmask_unpack(stream, bits, offsets, values, r, &hb), "bitmask_unpack");
}

// ---------------------------------------------------------------------------------------------------------------------
// Matmul

enum Search : int { kSearchNone = 0, kSearchLibrary = 1 };

// cusparseLtMatmulSearch as NVIDIA's samples and torch use it: it updates the plan (and the selection) in place;
// afterwards only the chosen configuration and the workspace size are read back.
Status library_search(Plan& plan, const void* a, const void* b, void* d, cudaStream_t stream,
                      ffi::ScratchAllocator& scratch) {
  const float alpha = 1.0f, beta = 0.0f;
  TempBuffer ws(scratch, plan.workspace, stream);
  if (!ws) return "could not allocate the search workspace";
  cudaStream_t streams[1] = {stream};
  JSPARSE_CSLT(cusparseLtMatmulSearch(plan.handle, &plan.plan, &alpha, a, b, &beta, d, d, ws.get(), streams, 1));
  JSPARSE_RETURN_IF_ERROR(plan.read_choice());
  JSPARSE_CSLT(cusparseLtMatmulGetWorkspace(plan.handle, &plan.plan, &plan.workspace));
  return {};
}

Status matmul(cudaStream_t stream, ffi::ScratchAllocator& scratch, ffi::AnyBuffer packed, ffi::AnyBuffer dense,
              ffi::Result<ffi::AnyBuffer> out, int64_t m, int64_t n, int64_t k, int32_t mode, int32_t search) {
  const int dtype = dtype_code(dense.element_type());
  if (dtype < 0) return "the dense operand must be bfloat16, float16 or float8_e4m3fn";
  const ffi::DataType want_out = dtype == kE4M3 ? ffi::DataType::BF16 : dense.element_type();
  if (out->element_type() != want_out) return "the output dtype does not match the operands";
  if (packed.element_type() != ffi::DataType::U8) return "the compressed operand must be uint8";
  if (mode < 0 || mode > 3) return "mode must be 0..3 (bit 0: B transposed, bit 1: D column-major)";
  const bool b_trans = mode & 1, d_col = mode & 2;
  auto dd = dense.dimensions();
  auto od = out->dimensions();
  const bool dense_ok = dd.size() == 2 && (b_trans ? (dd[0] == n && dd[1] == k) : (dd[0] == k && dd[1] == n));
  const bool out_ok = od.size() == 2 && (d_col ? (od[0] == n && od[1] == m) : (od[0] == m && od[1] == n));
  if (!dense_ok || !out_ok) return "operand shapes do not match m, n, k and mode";
  if (!aligned16(packed.untyped_data()) || !aligned16(dense.untyped_data()) || !aligned16(out->untyped_data())) {
    return "buffers must be 16-byte aligned";
  }
  int device = 0;
  JSPARSE_RETURN_IF_ERROR(current_device(&device));
  if (search != kSearchNone && search != kSearchLibrary) return "search must be 0 (off) or 1 (cusparseLtMatmulSearch)";
  const PlanKey key{device, m, n, k, mode, dtype, search};
  const float alpha = 1.0f, beta = 0.0f;
  std::shared_ptr<Plan> plan;
  {
    std::lock_guard<std::mutex> lock(global_mutex());
    JSPARSE_RETURN_IF_ERROR(get_plan_locked(key, &plan));
    if (packed.size_bytes() < plan->compressed_size) {
      return "the compressed operand has " + std::to_string(packed.size_bytes()) + " bytes, the plan needs " +
             std::to_string(plan->compressed_size);
    }
    if (key.search == kSearchLibrary && !plan->searched) {
      // Once per shape, outside any graph capture (see the file comment).
      JSPARSE_RETURN_IF_ERROR(
          library_search(*plan, packed.untyped_data(), dense.untyped_data(), out->untyped_data(), stream, scratch));
      plan->searched = true;
      stats().searches++;
    }
  }
  TempBuffer workspace(scratch, plan->workspace, stream);
  if (!workspace) return "could not allocate the matmul workspace (" + std::to_string(plan->workspace) + " bytes)";
  cudaStream_t streams[1] = {stream};
  JSPARSE_CSLT(cusparseLtMatmul(plan->handle, &plan->plan, &alpha, packed.untyped_data(), dense.untyped_data(), &beta,
                                out->untyped_data(), out->untyped_data(), workspace.get(), streams, 1));
  stats().matmuls++;
  return {};
}

ffi::Error MatmulImpl(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer packed,
                      ffi::AnyBuffer dense, ffi::Result<ffi::AnyBuffer> out, int64_t m, int64_t n, int64_t k,
                      int32_t mode, int32_t search) {
  return to_ffi(matmul(stream, scratch, packed, dense, out, m, n, k, mode, search), "matmul");
}

}  // namespace
}  // namespace jsparse

XLA_FFI_DEFINE_HANDLER_SYMBOL(JsparseCsltCompress, jsparse::CompressImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::ScratchAllocator>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("activation")
                                  .Attr<int32_t>("method"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JsparseCsltCompressT, jsparse::CompressTImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::ScratchAllocator>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("method"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JsparseCsltMatmul, jsparse::MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::ScratchAllocator>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("m")
                                  .Attr<int64_t>("n")
                                  .Attr<int64_t>("k")
                                  .Attr<int32_t>("mode")
                                  .Attr<int32_t>("search"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JsparseCsltCompressCounts, jsparse::CompressCountsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::ScratchAllocator>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JsparseRelu24Counts, jsparse::Relu24CountsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("mask24"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JsparseSquaredReluCounts, jsparse::SquaredReluCountsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JsparseRecipeBwd, jsparse::RecipeBwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::ScratchAllocator>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("method")
                                  .Attr<int32_t>("mask24"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JsparseBitmaskPack, jsparse::BitmaskPackImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::ScratchAllocator>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("relu")
                                  .Attr<int32_t>("variant"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JsparseBitmaskPackSquare, jsparse::BitmaskPackSquareImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::ScratchAllocator>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("relu")
                                  .Attr<int32_t>("variant"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JsparseBitmaskUnpack, jsparse::BitmaskUnpackImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JsparseBitmaskUnpackSquare, jsparse::BitmaskUnpackSquareImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

// ---------------------------------------------------------------------------------------------------------------------
// Host helpers for Python (ctypes). They use the calling thread's current device.

extern "C" {

int jsparse_cslt_version() {
  int major = 0, minor = 0, patch = 0;
  if (cusparseLtGetProperty(MAJOR_VERSION, &major) != CUSPARSE_STATUS_SUCCESS ||
      cusparseLtGetProperty(MINOR_VERSION, &minor) != CUSPARSE_STATUS_SUCCESS ||
      cusparseLtGetProperty(PATCH_LEVEL, &patch) != CUSPARSE_STATUS_SUCCESS) {
    return -1;
  }
  return major * 1000 + minor * 100 + patch;
}

int jsparse_cslt_compressed_size(int64_t rows, int64_t cols, int32_t dtype, int64_t* size, int64_t* tmp_size,
                                 char* err, int64_t err_len) {
  using namespace jsparse;
  auto fail = [&](const Status& s) {
    if (err && err_len > 0) std::snprintf(err, size_t(err_len), "%s", s.c_str());
    return 1;
  };
  if (dtype < kBF16 || dtype > kE4M3) return fail("unknown dtype code");
  int device = 0;
  Status s = current_device(&device);
  if (!s.empty()) return fail(s);
  std::shared_ptr<CompressEntry> entry;
  {
    std::lock_guard<std::mutex> lock(global_mutex());
    s = get_compress_entry_locked({device, rows, cols, dtype}, &entry);
  }
  if (!s.empty()) return fail(s);
  *size = int64_t(entry->size);
  *tmp_size = int64_t(entry->tmp_size);
  return 0;
}

void jsparse_cslt_stats(int64_t* out, int32_t n) {
  using namespace jsparse;
  int64_t live = 0;
  {
    std::lock_guard<std::mutex> lock(global_mutex());
    live = int64_t(plans_locked().size());
  }
  Stats& st = stats();
  const int64_t values[] = {st.plans_built.load(),      st.plan_hits.load(),        st.plan_evictions.load(),
                            st.searches.load(),         st.layout_checks.load(),    st.layout_mismatches.load(),
                            live,                       st.compress_jsparse.load(), st.compress_library.load(),
                            st.matmuls.load(),          st.async_allocs.load()};
  for (int i = 0; i < n && i < int(sizeof(values) / sizeof(values[0])); ++i) out[i] = values[i];
}

int jsparse_cslt_layout_status(int64_t rows, int64_t cols, int32_t dtype) {
  using namespace jsparse;
  int device = 0;
  if (!current_device(&device).empty()) return -1;
  std::lock_guard<std::mutex> lock(global_mutex());
  auto& entries = compress_entries_locked();
  auto it = entries.find({device, rows, cols, dtype});
  return it == entries.end() ? -1 : it->second->layout;
}

int jsparse_cslt_plan_info(int64_t m, int64_t n, int64_t k, int32_t mode, int32_t dtype, int32_t search,
                           int64_t* out) {
  using namespace jsparse;
  int device = 0;
  if (!current_device(&device).empty()) return 0;
  std::lock_guard<std::mutex> lock(global_mutex());
  auto& plans = plans_locked();
  auto it = plans.find({device, m, n, k, mode, dtype, search});
  if (it == plans.end()) return 0;
  const Plan& p = *it->second;
  out[0] = p.alg_id;
  out[1] = p.split_k;
  out[2] = p.split_k_mode;
  out[3] = int64_t(p.workspace);
  out[4] = p.alg_max_id;
  return 1;
}

int64_t jsparse_cslt_clear_plans() {
  using namespace jsparse;
  std::lock_guard<std::mutex> lock(global_mutex());
  auto& plans = plans_locked();
  const int64_t n = int64_t(plans.size());
  plans.clear();
  return n;
}

}  // extern "C"
