// Fused exit head, CPU: pooler -> classifier -> tanh/memory -> softmax statistics ->
// criterion, one pass per row, rows in parallel (at::parallel_for). Arithmetic in float32;
// weights of half types are widened once per call into a float32 scratch, hidden rows one
// at a time. The per-row epilogue is shared with the CUDA kernel (exit_head_epilogue.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../common/exit_head_checks.h"
#include "../common/exit_head_epilogue.h"

namespace eekernels {
namespace {

// float32 dot product written so the compiler vectorizes it without -ffast-math:
// eight independent partial sums, combined pairwise.
inline float dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int k = 0; k < 8; ++k) acc[k] += a[i + k] * b[i + k];
  }
  for (int k = 0; i < n; ++i, ++k) acc[k] += a[i] * b[i];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// A float32 view of a parameter: the tensor's own data if it is float32, else a widened copy.
template <typename scalar_t>
const float* as_float(const at::Tensor& t, std::vector<float>& storage) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return t.data_ptr<float>();
  } else {
    const scalar_t* src = t.data_ptr<scalar_t>();
    const int64_t n = t.numel();
    storage.resize(n);
    at::parallel_for(0, n, 1 << 14, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) storage[i] = static_cast<float>(src[i]);
    });
    return storage.data();
  }
}

template <typename scalar_t>
void exit_head_rows(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& bias,
                    const std::optional<at::Tensor>& pooler_weight,
                    const std::optional<at::Tensor>& pooler_bias,
                    const std::optional<at::Tensor>& memory, float lam, bool tanh_logits,
                    int64_t criterion, double threshold, const std::optional<at::Tensor>& prev_pred,
                    const std::optional<at::Tensor>& counter, at::Tensor& logits, at::Tensor& score,
                    at::Tensor& exit_mask, at::Tensor& pred, at::Tensor& counter_out) {
  const int64_t n = hidden.size(0), h = hidden.size(1), c = weight.size(0);
  const int64_t row_stride = hidden.stride(0);
  std::vector<float> w_store, b_store, pw_store, pb_store;
  const float* w = as_float<scalar_t>(weight, w_store);
  const float* b = as_float<scalar_t>(bias, b_store);
  const bool has_pooler = pooler_weight.has_value();
  const float* pw = has_pooler ? as_float<scalar_t>(*pooler_weight, pw_store) : nullptr;
  const float* pb = has_pooler ? as_float<scalar_t>(*pooler_bias, pb_store) : nullptr;
  const scalar_t* hid = hidden.data_ptr<scalar_t>();
  const float* mem = memory.has_value() ? memory->data_ptr<float>() : nullptr;
  const int64_t* prev = prev_pred.has_value() ? prev_pred->data_ptr<int64_t>() : nullptr;
  const int32_t* cnt = counter.has_value() ? counter->data_ptr<int32_t>() : nullptr;
  float* out_logits = logits.data_ptr<float>();
  float* out_score = score.data_ptr<float>();
  bool* out_exit = exit_mask.data_ptr<bool>();
  int64_t* out_pred = pred.data_ptr<int64_t>();
  int32_t* out_cnt = criterion == kPatience ? counter_out.data_ptr<int32_t>() : nullptr;

  const int64_t work_per_row = c * h + (has_pooler ? h * h : 0) + 1;
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / work_per_row);
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> x(h), pooled(has_pooler ? h : 0);
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row = hid + r * row_stride;
      for (int64_t k = 0; k < h; ++k) x[k] = static_cast<float>(row[k]);
      const float* feat = x.data();
      if (has_pooler) {
        for (int64_t j = 0; j < h; ++j) pooled[j] = std::tanh(dot(pw + j * h, x.data(), h) + pb[j]);
        feat = pooled.data();
      }
      SoftmaxStats st = stats_init();
      float* zrow = out_logits + r * c;
      for (int64_t k = 0; k < c; ++k) {
        const float z = transform_logit(dot(w + k * h, feat, h) + b[k], tanh_logits, mem != nullptr,
                                        mem ? mem[r * c + k] : 0.f, lam);
        zrow[k] = z;
        stats_push(st, z, k);
      }
      const Decision d = decide(st, criterion, threshold, prev ? prev[r] : -1, cnt ? cnt[r] : 0);
      out_score[r] = d.score;
      out_exit[r] = d.exit;
      out_pred[r] = d.pred;
      if (out_cnt) out_cnt[r] = d.counter;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> exit_head_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& pooler_weight, const std::optional<at::Tensor>& pooler_bias,
    const std::optional<at::Tensor>& memory, double memory_lambda, bool tanh_logits,
    int64_t criterion, double threshold, const std::optional<at::Tensor>& prev_pred,
    const std::optional<at::Tensor>& counter) {
  check_exit_head_args(hidden, weight, bias, pooler_weight, pooler_bias, memory, memory_lambda,
                       criterion, threshold, prev_pred, counter);
  const int64_t n = hidden.size(0), c = weight.size(0);
  const auto opts = hidden.options();
  at::Tensor logits = at::empty({n, c}, opts.dtype(at::kFloat));
  at::Tensor score = at::empty({n}, opts.dtype(at::kFloat));
  at::Tensor exit_mask = at::empty({n}, opts.dtype(at::kBool));
  at::Tensor pred = at::empty({n}, opts.dtype(at::kLong));
  at::Tensor counter_out = at::empty({criterion == kPatience ? n : 0}, opts.dtype(at::kInt));
  if (n == 0) return {logits, score, exit_mask, pred, counter_out};
  switch (hidden.scalar_type()) {
    case at::kFloat:
      exit_head_rows<float>(hidden, weight, bias, pooler_weight, pooler_bias, memory,
                            static_cast<float>(memory_lambda), tanh_logits, criterion, threshold,
                            prev_pred, counter, logits, score, exit_mask, pred, counter_out);
      break;
    case at::kHalf:
      exit_head_rows<at::Half>(hidden, weight, bias, pooler_weight, pooler_bias, memory,
                               static_cast<float>(memory_lambda), tanh_logits, criterion, threshold,
                               prev_pred, counter, logits, score, exit_mask, pred, counter_out);
      break;
    case at::kBFloat16:
      exit_head_rows<at::BFloat16>(hidden, weight, bias, pooler_weight, pooler_bias, memory,
                                   static_cast<float>(memory_lambda), tanh_logits, criterion,
                                   threshold, prev_pred, counter, logits, score, exit_mask, pred,
                                   counter_out);
      break;
    default:
      TORCH_CHECK(false, "exit_head: unsupported dtype ", hidden.scalar_type());
  }
  return {logits, score, exit_mask, pred, counter_out};
}

}  // namespace
}  // namespace eekernels

TORCH_LIBRARY_IMPL(eekernels, CPU, m) { m.impl("exit_head", &eekernels::exit_head_cpu); }
