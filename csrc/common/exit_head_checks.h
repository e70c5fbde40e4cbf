// Argument checks of the exit_head op shared by the CPU and CUDA implementations.
// They refuse every call the Python wrapper's validation refuses (and non-contiguous
// weights, which the wrapper copies): the wrapper's eager CPU calls go to the kernel
// unvalidated and, when these refuse, take the validated path, whose message names the
// problem (eekernels/ops/exit_head.py). They also guard direct torch.ops.eekernels.exit_head
// calls, so a bad call errors instead of crashing a kernel.
#pragma once

#include <torch/library.h>

#include <optional>

namespace eekernels {

// What the head reads of each row (eekernels/ops/contracts/exit_head.py POOLINGS):
// hidden [N, H] as given, or the masked mean of hidden [N, S, H]'s tokens.
enum Pooling : int64_t { kPoolCls = 0, kPoolMean = 1 };

inline void check_exit_head_args(const at::Tensor& hidden, const at::Tensor& weight,
                                 const at::Tensor& bias,
                                 const std::optional<at::Tensor>& pooler_weight,
                                 const std::optional<at::Tensor>& pooler_bias,
                                 const std::optional<at::Tensor>& memory, double memory_lambda,
                                 int64_t criterion, double threshold,
                                 const std::optional<at::Tensor>& prev_pred,
                                 const std::optional<at::Tensor>& counter,
                                 const std::optional<at::Tensor>& policy_weight,
                                 const std::optional<at::Tensor>& policy_bias,
                                 const std::optional<at::Tensor>& policy_out_weight,
                                 const std::optional<at::Tensor>& policy_out_bias,
                                 const std::optional<at::Tensor>& token_mask, int64_t pooling) {
  // Sparse or other layouts would be read as dense memory.
  for (const auto* t : {&hidden, &weight, &bias}) {
    TORCH_CHECK(t->layout() == at::kStrided, "exit_head: tensors must be dense (strided), got layout ", t->layout());
  }
  for (const auto* t : {&pooler_weight, &pooler_bias, &memory, &prev_pred, &counter, &policy_weight, &policy_bias,
                        &policy_out_weight, &policy_out_bias, &token_mask}) {
    TORCH_CHECK(!t->has_value() || (*t)->layout() == at::kStrided,
                "exit_head: tensors must be dense (strided), got layout ", (*t)->layout());
  }
  TORCH_CHECK(pooling == kPoolCls || pooling == kPoolMean, "exit_head: pooling must be 0 (cls) or 1 (mean), got ",
              pooling);
  if (pooling == kPoolCls) {
    TORCH_CHECK(hidden.dim() == 2, "exit_head: hidden must be [N, H] with pooling 0 (cls), got ", hidden.sizes());
    TORCH_CHECK(!token_mask.has_value(), "exit_head: token_mask is given only with pooling 1 (mean)");
  } else {
    TORCH_CHECK(hidden.dim() == 3, "exit_head: hidden must be [N, S, H] with pooling 1 (mean), got ",
                hidden.sizes());
  }
  const auto dt = hidden.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "exit_head: hidden must be float32, float16 or bfloat16, got ", dt);
  // No element to read or one element per row/token (H = 1): any strides. Row (and token)
  // strides are free; the kernels take them.
  const int64_t n = hidden.size(0), h = hidden.size(-1);
  TORCH_CHECK(hidden.numel() == 0 || h == 1 || hidden.stride(-1) == 1,
              "exit_head: hidden's last dim must be contiguous");
  const auto dev = hidden.device();
  if (token_mask.has_value()) {
    TORCH_CHECK(token_mask->device() == dev, "exit_head: token_mask is on ", token_mask->device(), ", hidden on ",
                dev);
    TORCH_CHECK(token_mask->scalar_type() == at::kBool && token_mask->dim() == 2 && token_mask->size(0) == n &&
                    token_mask->size(1) == hidden.size(1),
                "exit_head: token_mask must be bool [", n, ", ", hidden.size(1), "], got ", token_mask->scalar_type(),
                " ", token_mask->sizes());
  }
  auto same = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device() == dev, "exit_head: ", name, " is on ", t.device(), ", hidden on ", dev);
    TORCH_CHECK(t.is_contiguous(), "exit_head: ", name, " must be contiguous");
  };
  same(weight, "weight");
  same(bias, "bias");
  TORCH_CHECK(h >= 1, "exit_head: hidden must have H >= 1, got ", hidden.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == h && weight.size(0) >= 1,
              "exit_head: weight must be [C, ", h, "], got ", weight.sizes());
  const int64_t c = weight.size(0);
  TORCH_CHECK(weight.scalar_type() == dt && bias.scalar_type() == dt,
              "exit_head: weight and bias must have hidden's dtype ", dt);
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == c, "exit_head: bias must be [", c, "]");
  TORCH_CHECK(pooler_weight.has_value() == pooler_bias.has_value(),
              "exit_head: pooler_weight and pooler_bias go together");
  if (pooler_weight.has_value()) {
    same(*pooler_weight, "pooler_weight");
    same(*pooler_bias, "pooler_bias");
    TORCH_CHECK(pooler_weight->scalar_type() == dt && pooler_bias->scalar_type() == dt,
                "exit_head: pooler weights must have hidden's dtype ", dt);
    TORCH_CHECK(pooler_weight->dim() == 2 && pooler_weight->size(0) == h && pooler_weight->size(1) == h,
                "exit_head: pooler_weight must be [", h, ", ", h, "]");
    TORCH_CHECK(pooler_bias->dim() == 1 && pooler_bias->size(0) == h,
                "exit_head: pooler_bias must be [", h, "]");
  }
  if (memory.has_value()) {
    same(*memory, "memory");
    TORCH_CHECK(memory->scalar_type() == at::kFloat && memory->dim() == 2 &&
                    memory->size(0) == n && memory->size(1) == c,
                "exit_head: memory must be float32 [", n, ", ", c, "]");
  }
  TORCH_CHECK(memory_lambda >= 0.0 && memory_lambda <= 1.0, "exit_head: memory_lambda must be in [0, 1]");
  TORCH_CHECK(criterion >= 0 && criterion <= 3, "exit_head: criterion must be 0, 1, 2 or 3, got ", criterion);
  TORCH_CHECK(threshold >= 0.0, "exit_head: threshold must be >= 0 and not NaN, got ", threshold);
  // ConsistentEE policy network (criterion 3): all four parameters, and only then.
  const int given = int(policy_weight.has_value()) + int(policy_bias.has_value()) +
                    int(policy_out_weight.has_value()) + int(policy_out_bias.has_value());
  if (criterion == 3) {
    TORCH_CHECK(given == 4, "exit_head: criterion 3 (policy) needs policy_weight, policy_bias, ",
                "policy_out_weight and policy_out_bias");
    TORCH_CHECK(threshold <= 1.0, "exit_head: the policy threshold must be in [0, 1], got ", threshold);
    for (const auto* t : {&*policy_weight, &*policy_bias, &*policy_out_weight, &*policy_out_bias}) {
      same(*t, "a policy parameter");
      TORCH_CHECK(t->scalar_type() == dt, "exit_head: policy parameters must have hidden's dtype ", dt,
                  ", got ", t->scalar_type());
    }
    TORCH_CHECK(policy_weight->dim() == 2 && policy_weight->size(0) >= 1 && policy_weight->size(1) == h,
                "exit_head: policy_weight must be [P, ", h, "] with P >= 1, got ", policy_weight->sizes());
    const int64_t p = policy_weight->size(0);
    TORCH_CHECK(policy_bias->dim() == 1 && policy_bias->size(0) == p, "exit_head: policy_bias must be [", p,
                "], got ", policy_bias->sizes());
    TORCH_CHECK(policy_out_weight->dim() == 1 && policy_out_weight->size(0) == p,
                "exit_head: policy_out_weight must be [", p, "], got ", policy_out_weight->sizes());
    TORCH_CHECK(policy_out_bias->dim() == 1 && policy_out_bias->size(0) == 1,
                "exit_head: policy_out_bias must be [1], got ", policy_out_bias->sizes());
  } else {
    TORCH_CHECK(given == 0, "exit_head: policy parameters are given only with criterion 3 (policy), got criterion ",
                criterion);
  }
  TORCH_CHECK(criterion == 2 || (!prev_pred.has_value() && !counter.has_value()),
              "exit_head: prev_pred and counter are patience state, given only with criterion 2 (patience)");
  if (prev_pred.has_value()) {
    same(*prev_pred, "prev_pred");
    TORCH_CHECK(prev_pred->scalar_type() == at::kLong && prev_pred->dim() == 1 && prev_pred->size(0) == n,
                "exit_head: prev_pred must be int64 [", n, "]");
  }
  if (counter.has_value()) {
    same(*counter, "counter");
    TORCH_CHECK(counter->scalar_type() == at::kInt && counter->dim() == 1 && counter->size(0) == n,
                "exit_head: counter must be int32 [", n, "]");
  }
}

}  // namespace eekernels
