// The CPU exit head (csrc/cpu/exit_head.cpp): the kernel of torch.ops.eekernels.exit_head on
// CPU tensors, also bound in csrc/register.cpp as eekernels._C.exit_head_cpu for calls that
// skip the dispatcher. Arguments as the op's schema (eekernels/ops/exit_head.py).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace eekernels {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> exit_head_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& pooler_weight, const std::optional<at::Tensor>& pooler_bias,
    const std::optional<at::Tensor>& memory, double memory_lambda, bool tanh_logits,
    int64_t criterion, double threshold, const std::optional<at::Tensor>& prev_pred,
    const std::optional<at::Tensor>& counter, const std::optional<at::Tensor>& policy_weight,
    const std::optional<at::Tensor>& policy_bias, const std::optional<at::Tensor>& policy_out_weight,
    const std::optional<at::Tensor>& policy_out_bias, const std::optional<at::Tensor>& token_mask,
    int64_t pooling);

}  // namespace eekernels
