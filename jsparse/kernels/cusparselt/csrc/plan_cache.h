// Process-wide cuSPARSELt state: one handle per device, matmul plans per (device, m, n, k, mode, dtype, search), and
// compress descriptors + layout-check results per (device, rows, cols, dtype).
//
// cuSPARSELt objects keep internal pointers to each other, so every entry lives on the heap behind a shared_ptr and
// never moves; lookups hold one global mutex only to find or build an entry. Plans are evicted least-recently-used
// beyond $JSPARSE_CUSPARSELT_PLAN_CACHE entries (default 512); an evicted plan still in use by another thread stays
// alive until that call returns.
#pragma once

#include <cuda_runtime.h>
#include <cusparseLt.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

namespace jsparse {

// Every helper returns an error string: empty on success.
using Status = std::string;

inline Status cslt_error(const char* what, cusparseStatus_t s) {
  return std::string(what) + " failed: " + cusparseLtGetErrorName(s) + " (" + cusparseLtGetErrorString(s) + ")";
}

inline Status cuda_error(const char* what, cudaError_t e) {
  return std::string(what) + " failed: " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
}

#define JSPARSE_CSLT(expr)                                                 \
  do {                                                                     \
    cusparseStatus_t status_ = (expr);                                     \
    if (status_ != CUSPARSE_STATUS_SUCCESS) return cslt_error(#expr, status_); \
  } while (0)

#define JSPARSE_CUDA(expr)                                    \
  do {                                                        \
    cudaError_t error_ = (expr);                              \
    if (error_ != cudaSuccess) return cuda_error(#expr, error_); \
  } while (0)

#define JSPARSE_RETURN_IF_ERROR(expr) \
  do {                                \
    Status s_ = (expr);               \
    if (!s_.empty()) return s_;       \
  } while (0)

enum DType : int { kBF16 = 0, kF16 = 1, kE4M3 = 2 };

inline cudaDataType cuda_input_type(int dtype) {
  return dtype == kBF16 ? CUDA_R_16BF : (dtype == kF16 ? CUDA_R_16F : CUDA_R_8F_E4M3);
}
// fp8 products write bf16 (the 8-bit output modes need scales); 16-bit products write their input type.
inline cudaDataType cuda_output_type(int dtype) { return dtype == kE4M3 ? CUDA_R_16BF : cuda_input_type(dtype); }

struct Stats {
  std::atomic<int64_t> plans_built{0}, plan_hits{0}, plan_evictions{0}, searches{0}, layout_checks{0},
      layout_mismatches{0}, compress_jsparse{0}, compress_library{0}, matmuls{0}, async_allocs{0};
};

inline Stats& stats() {
  static Stats s;
  return s;
}

inline std::mutex& global_mutex() {
  static std::mutex mu;
  return mu;
}

// ---------------------------------------------------------------------------------------------------------------------
// Handles: one per device, for the life of the process (destroying them at exit would race with XLA's teardown).

inline Status device_handle_locked(int device, const cusparseLtHandle_t** out) {
  static std::unordered_map<int, std::unique_ptr<cusparseLtHandle_t>> handles;
  auto it = handles.find(device);
  if (it == handles.end()) {
    auto h = std::make_unique<cusparseLtHandle_t>();
    JSPARSE_CSLT(cusparseLtInit(h.get()));
    it = handles.emplace(device, std::move(h)).first;
  }
  *out = it->second.get();
  return {};
}

// ---------------------------------------------------------------------------------------------------------------------
// Matmul plans

struct PlanKey {
  int device;
  int64_t m, n, k;
  int mode, dtype, search;
  bool operator==(const PlanKey& o) const {
    return device == o.device && m == o.m && n == o.n && k == o.k && mode == o.mode && dtype == o.dtype &&
           search == o.search;
  }
};

struct PlanKeyHash {
  size_t operator()(const PlanKey& key) const {
    uint64_t h = 1469598103934665603ull;
    for (int64_t v : {int64_t(key.device), key.m, key.n, key.k, int64_t(key.mode), int64_t(key.dtype),
                      int64_t(key.search)}) {
      h = (h ^ uint64_t(v)) * 1099511628211ull;
    }
    return size_t(h);
  }
};

struct Plan {
  const cusparseLtHandle_t* handle = nullptr;
  cusparseLtMatDescriptor_t a, b, c;
  cusparseLtMatmulDescriptor_t matmul;
  cusparseLtMatmulAlgSelection_t selection;
  cusparseLtMatmulPlan_t plan;
  bool has_a = false, has_b = false, has_c = false, has_selection = false, has_plan = false;
  size_t workspace = 0;
  size_t compressed_size = 0;
  int alg_id = -1, alg_max_id = -1, split_k = 1, split_k_mode = 0;
  bool searched = false;
  uint64_t last_use = 0;

  Plan() = default;
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;
  ~Plan() {
    if (has_plan) cusparseLtMatmulPlanDestroy(&plan);
    if (has_selection) cusparseLtMatmulAlgSelectionDestroy(&selection);
    if (has_c) cusparseLtMatDescriptorDestroy(&c);
    if (has_b) cusparseLtMatDescriptorDestroy(&b);
    if (has_a) cusparseLtMatDescriptorDestroy(&a);
  }

  Status read_choice() {
    JSPARSE_CSLT(cusparseLtMatmulAlgGetAttribute(handle, &selection, CUSPARSELT_MATMUL_ALG_CONFIG_ID, &alg_id,
                                                 sizeof(alg_id)));
    JSPARSE_CSLT(cusparseLtMatmulAlgGetAttribute(handle, &selection, CUSPARSELT_MATMUL_ALG_CONFIG_MAX_ID,
                                                 &alg_max_id, sizeof(alg_max_id)));
    JSPARSE_CSLT(cusparseLtMatmulAlgGetAttribute(handle, &selection, CUSPARSELT_MATMUL_SPLIT_K, &split_k,
                                                 sizeof(split_k)));
    JSPARSE_CSLT(cusparseLtMatmulAlgGetAttribute(handle, &selection, CUSPARSELT_MATMUL_SPLIT_K_MODE, &split_k_mode,
                                                 sizeof(split_k_mode)));
    return {};
  }

  // (Re)initialises the plan from the selection and reads its workspace and compressed sizes.
  Status init_plan() {
    if (has_plan) {
      JSPARSE_CSLT(cusparseLtMatmulPlanDestroy(&plan));
      has_plan = false;
    }
    JSPARSE_CSLT(cusparseLtMatmulPlanInit(handle, &plan, &matmul, &selection));
    has_plan = true;
    JSPARSE_CSLT(cusparseLtMatmulGetWorkspace(handle, &plan, &workspace));
    size_t tmp = 0;
    JSPARSE_CSLT(cusparseLtSpMMACompressedSize(handle, &plan, &compressed_size, &tmp));
    return read_choice();
  }

  // D = A op(B), A row-major m x k (2:4 along k). mode bit 0: B is row-major n x k with op T (else row-major k x n,
  // op N); bit 1: D is column-major m x n, i.e. row-major n x m (else row-major m x n).
  Status build(const cusparseLtHandle_t* h, const PlanKey& key) {
    handle = h;
    const cudaDataType in_t = cuda_input_type(key.dtype), out_t = cuda_output_type(key.dtype);
    const uint32_t alignment = 16;
    const bool b_trans = key.mode & 1, d_col = key.mode & 2;
    JSPARSE_CSLT(cusparseLtStructuredDescriptorInit(h, &a, key.m, key.k, key.k, alignment, in_t, CUSPARSE_ORDER_ROW,
                                                    CUSPARSELT_SPARSITY_50_PERCENT));
    has_a = true;
    if (b_trans) {
      JSPARSE_CSLT(cusparseLtDenseDescriptorInit(h, &b, key.n, key.k, key.k, alignment, in_t, CUSPARSE_ORDER_ROW));
    } else {
      JSPARSE_CSLT(cusparseLtDenseDescriptorInit(h, &b, key.k, key.n, key.n, alignment, in_t, CUSPARSE_ORDER_ROW));
    }
    has_b = true;
    if (d_col) {
      JSPARSE_CSLT(cusparseLtDenseDescriptorInit(h, &c, key.m, key.n, key.m, alignment, out_t, CUSPARSE_ORDER_COL));
    } else {
      JSPARSE_CSLT(cusparseLtDenseDescriptorInit(h, &c, key.m, key.n, key.n, alignment, out_t, CUSPARSE_ORDER_ROW));
    }
    has_c = true;
    const cusparseOperation_t op_b = b_trans ? CUSPARSE_OPERATION_TRANSPOSE : CUSPARSE_OPERATION_NON_TRANSPOSE;
    JSPARSE_CSLT(cusparseLtMatmulDescriptorInit(h, &matmul, CUSPARSE_OPERATION_NON_TRANSPOSE, op_b, &a, &b, &c, &c,
                                                CUSPARSE_COMPUTE_32F));
    JSPARSE_CSLT(cusparseLtMatmulAlgSelectionInit(h, &selection, &matmul, CUSPARSELT_MATMUL_ALG_DEFAULT));
    has_selection = true;
    return init_plan();
  }
};

inline size_t plan_capacity() {
  static const size_t capacity = [] {
    const char* env = std::getenv("JSPARSE_CUSPARSELT_PLAN_CACHE");
    long v = env ? std::atol(env) : 0;
    return size_t(v > 0 ? v : 512);
  }();
  return capacity;
}

using PlanMap = std::unordered_map<PlanKey, std::shared_ptr<Plan>, PlanKeyHash>;

inline PlanMap& plans_locked() {
  static PlanMap plans;
  return plans;
}

inline uint64_t next_tick_locked() {
  static uint64_t tick = 0;
  return ++tick;
}

// Finds or builds the plan for `key`; the caller holds global_mutex().
inline Status get_plan_locked(const PlanKey& key, std::shared_ptr<Plan>* out) {
  PlanMap& plans = plans_locked();
  auto it = plans.find(key);
  if (it != plans.end()) {
    stats().plan_hits++;
    it->second->last_use = next_tick_locked();
    *out = it->second;
    return {};
  }
  const cusparseLtHandle_t* h = nullptr;
  JSPARSE_RETURN_IF_ERROR(device_handle_locked(key.device, &h));
  auto plan = std::make_shared<Plan>();
  JSPARSE_RETURN_IF_ERROR(plan->build(h, key));
  if (plans.size() >= plan_capacity()) {
    auto oldest = plans.begin();
    for (auto i = plans.begin(); i != plans.end(); ++i) {
      if (i->second->last_use < oldest->second->last_use) oldest = i;
    }
    plans.erase(oldest);
    stats().plan_evictions++;
  }
  plan->last_use = next_tick_locked();
  plans.emplace(key, plan);
  stats().plans_built++;
  *out = plan;
  return {};
}

// ---------------------------------------------------------------------------------------------------------------------
// Compress descriptors (the library's compress is plan-free through the *2 helpers: the compressed form of A depends
// on A's descriptor only) and the per-shape layout check result.

struct CompressKey {
  int device;
  int64_t rows, cols;
  int dtype;
  bool operator==(const CompressKey& o) const {
    return device == o.device && rows == o.rows && cols == o.cols && dtype == o.dtype;
  }
};

struct CompressKeyHash {
  size_t operator()(const CompressKey& key) const {
    uint64_t h = 1469598103934665603ull;
    for (int64_t v : {int64_t(key.device), key.rows, key.cols, int64_t(key.dtype)}) {
      h = (h ^ uint64_t(v)) * 1099511628211ull;
    }
    return size_t(h);
  }
};

struct CompressEntry {
  const cusparseLtHandle_t* handle = nullptr;
  cusparseLtMatDescriptor_t desc;
  bool has_desc = false;
  size_t size = 0, tmp_size = 0;
  int layout = -1;  // -1 unchecked, 0 mismatch (use the library), 1 verified (use the jsparse kernel)

  CompressEntry() = default;
  CompressEntry(const CompressEntry&) = delete;
  CompressEntry& operator=(const CompressEntry&) = delete;
  ~CompressEntry() {
    if (has_desc) cusparseLtMatDescriptorDestroy(&desc);
  }

  Status build(const cusparseLtHandle_t* h, const CompressKey& key) {
    handle = h;
    JSPARSE_CSLT(cusparseLtStructuredDescriptorInit(h, &desc, key.rows, key.cols, key.cols, 16,
                                                    cuda_input_type(key.dtype), CUSPARSE_ORDER_ROW,
                                                    CUSPARSELT_SPARSITY_50_PERCENT));
    has_desc = true;
    JSPARSE_CSLT(cusparseLtSpMMACompressedSize2(h, &desc, &size, &tmp_size));
    return {};
  }
};

using CompressMap = std::unordered_map<CompressKey, std::shared_ptr<CompressEntry>, CompressKeyHash>;

inline CompressMap& compress_entries_locked() {
  static CompressMap entries;
  return entries;
}

inline Status get_compress_entry_locked(const CompressKey& key, std::shared_ptr<CompressEntry>* out) {
  CompressMap& entries = compress_entries_locked();
  auto it = entries.find(key);
  if (it == entries.end()) {
    const cusparseLtHandle_t* h = nullptr;
    JSPARSE_RETURN_IF_ERROR(device_handle_locked(key.device, &h));
    auto entry = std::make_shared<CompressEntry>();
    JSPARSE_RETURN_IF_ERROR(entry->build(h, key));
    it = entries.emplace(key, entry).first;
  }
  *out = it->second;
  return {};
}

}  // namespace jsparse
