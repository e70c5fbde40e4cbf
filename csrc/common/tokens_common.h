// Shared by the CPU (csrc/cpu/tokens.cpp) and CUDA (csrc/cuda/tokens.cu) token ops:
// argument checks, MPEE's output width and keep count, and the total order on memory
// values used to rank tokens. Spec: eekernels/ops/tokens.py.
//
// The Python wrapper validates first with friendlier messages; these checks guard direct
// torch.ops.eekernels.* calls so that a bad call errors instead of crashing a kernel.
#pragma once

#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define EEK_HD __host__ __device__ __forceinline__
#else
#define EEK_HD inline
#endif

namespace eekernels {

// MPEE (mpee.txt eq. 7): m = ceil(keep_ratio * n), computed as ceil(keep_ratio * n - 1e-6)
// in double so that exact products such as 0.7 * 10 keep 7 (same as the Python reference).
EEK_HD int64_t mpee_keep_count(int64_t n, double keep_ratio) {
  const double m = ceil(keep_ratio * static_cast<double>(n) - 1e-6);
  return m < 0.0 ? 0 : static_cast<int64_t>(m);
}

// Output width from the padded width S alone (no host sync): [CLS] + kept + fusion token.
EEK_HD int64_t mpee_width(int64_t s, double keep_ratio) { return 2 + mpee_keep_count(s - 1, keep_ratio); }

// A signed integer that orders float32 memory values like the reference's stable sort of
// -memory: larger memory first; -0.0 == +0.0; NaN below everything (sorted last).
EEK_HD int32_t mpee_memory_key(float v) {
  if (v != v) return INT32_MIN;  // NaN
  if (v == 0.0f) return 0;       // -0.0 and +0.0 tie
  int32_t bits;
#if defined(__CUDA_ARCH__)
  bits = __float_as_int(v);
#else
  std::memcpy(&bits, &v, sizeof(bits));
#endif
  return bits >= 0 ? bits : (bits ^ INT32_MAX);
}

inline bool tokens_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// hidden: float32/16/bf16 [B, S, H] with a contiguous last dim (any strides for B and S).
inline void check_tokens_hidden(const char* op, const at::Tensor& hidden) {
  TORCH_CHECK(hidden.layout() == at::kStrided, op, ": hidden must be a dense tensor");
  TORCH_CHECK(hidden.dim() == 3, op, ": hidden must be [B, S, H], got ", hidden.sizes());
  TORCH_CHECK(tokens_float_dtype(hidden.scalar_type()), op,
              ": hidden must be float32, float16 or bfloat16, got ", hidden.scalar_type());
  // An empty hidden (B or S = 0) has no rows to read, whatever its strides.
  TORCH_CHECK(hidden.size(2) <= 1 || hidden.numel() == 0 || hidden.stride(2) == 1, op, ": hidden's last dim must be contiguous, got strides ",
              hidden.strides());
}

inline void check_tokens_mask(const char* op, const char* name, const at::Tensor& mask, const at::Tensor& hidden) {
  TORCH_CHECK(mask.layout() == at::kStrided && mask.scalar_type() == at::kBool && mask.dim() == 2, op, ": ", name,
              " must be a bool [B, S] tensor, got ", mask.scalar_type(), " ", mask.sizes());
  TORCH_CHECK(mask.size(0) == hidden.size(0) && mask.size(1) == hidden.size(1), op, ": ", name, " must be [",
              hidden.size(0), ", ", hidden.size(1), "], got ", mask.sizes());
  TORCH_CHECK(mask.device() == hidden.device(), op, ": ", name, " is on ", mask.device(), ", hidden on ",
              hidden.device());
  TORCH_CHECK(mask.is_contiguous(), op, ": ", name, " must be contiguous");
}

inline void check_pack_tokens_args(const char* op, const at::Tensor& hidden, const at::Tensor& active) {
  check_tokens_hidden(op, hidden);
  check_tokens_mask(op, "active", active, hidden);
}

inline void check_scatter_tokens_args(const at::Tensor& hidden, const at::Tensor& index, const at::Tensor& values) {
  const char* op = "scatter_tokens";
  check_tokens_hidden(op, hidden);
  TORCH_CHECK(hidden.is_contiguous(), op, ": hidden is written in place and must be contiguous");
  TORCH_CHECK(index.layout() == at::kStrided && index.scalar_type() == at::kLong &&
                  (index.dim() == 1 || index.dim() == 2),
              op, ": index must be an int64 [nnz] or [B, M] tensor, got ", index.scalar_type(), " ", index.sizes());
  TORCH_CHECK(index.is_contiguous(), op, ": index must be contiguous");
  TORCH_CHECK(values.layout() == at::kStrided && values.dim() == index.dim() + 1, op,
              ": values must have one dim more than index, got ", values.sizes(), " for index ", index.sizes());
  for (int64_t d = 0; d < index.dim(); ++d)
    TORCH_CHECK(values.size(d) == index.size(d), op, ": values ", values.sizes(), " does not match index ",
                index.sizes());
  TORCH_CHECK(values.size(-1) == hidden.size(2), op, ": values' last dim must be H=", hidden.size(2), ", got ",
              values.sizes());
  TORCH_CHECK(values.scalar_type() == hidden.scalar_type(), op, ": values (", values.scalar_type(),
              ") must have hidden's dtype (", hidden.scalar_type(), ")");
  TORCH_CHECK(index.device() == hidden.device() && values.device() == hidden.device(), op,
              ": index and values must be on hidden's device ", hidden.device());
  TORCH_CHECK(values.is_contiguous(), op, ": values must be contiguous");
}

inline void check_mpee_prune_args(const at::Tensor& hidden, const at::Tensor& valid, const at::Tensor& memory,
                                  const at::Tensor& attention, double keep_ratio) {
  const char* op = "mpee_prune";
  check_tokens_hidden(op, hidden);
  TORCH_CHECK(hidden.size(1) >= 1, op, ": the sequence needs at least the [CLS] token, got S=0");
  check_tokens_mask(op, "valid", valid, hidden);
  auto per_token = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.layout() == at::kStrided && t.scalar_type() == at::kFloat && t.dim() == 2 &&
                    t.size(0) == hidden.size(0) && t.size(1) == hidden.size(1),
                op, ": ", name, " must be float32 [", hidden.size(0), ", ", hidden.size(1), "], got ",
                t.scalar_type(), " ", t.sizes());
    TORCH_CHECK(t.device() == hidden.device(), op, ": ", name, " is on ", t.device(), ", hidden on ",
                hidden.device());
    TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  };
  per_token(memory, "memory");
  per_token(attention, "attention");
  TORCH_CHECK(keep_ratio > 0.0 && keep_ratio <= 1.0, op, ": keep_ratio must be in (0, 1], got ", keep_ratio);
}

}  // namespace eekernels
