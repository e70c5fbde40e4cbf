// Fused exit head, CPU: pooler -> classifier (and, for criterion "policy", ConsistentEE's
// policy MLP on the same input) -> tanh/memory -> softmax statistics -> criterion in one
// pass over tiles of 4 rows, tiles in parallel (at::parallel_for).
// Arithmetic in float32; weights are transposed (and widened from half types) once per
// call into float32 scratch for a register-blocked micro-kernel. The per-row epilogue is shared with the CUDA kernel (exit_head_epilogue.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../common/exit_head_checks.h"
#include "../common/exit_head_epilogue.h"

namespace eekernels {
namespace {

constexpr int64_t kRows = 4;   // rows per micro-tile
constexpr int64_t kCols = 8;   // output columns per micro-tile

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// B^T of a [M, K] parameter as float32 [K, round_up(M, kCols)], zero-padded columns, so the
// micro-kernel below streams contiguous rows of it. Widens half types on the way.
template <typename scalar_t>
std::vector<float> transpose_padded(const at::Tensor& t) {
  const int64_t m = t.size(0), k = t.size(1), mp = round_up(m, kCols);
  const scalar_t* src = t.data_ptr<scalar_t>();
  std::vector<float> out(static_cast<size_t>(k * mp), 0.f);
  at::parallel_for(0, k, 64, [&](int64_t b, int64_t e) {
    for (int64_t kk = b; kk < e; ++kk)
      for (int64_t i = 0; i < m; ++i) out[kk * mp + i] = static_cast<float>(src[i * k + kk]);
  });
  return out;
}

// out[r][j] = sum_k x[r][k] * bt[k][j] for r < kRows, j < mp, as kRows interleaved axpy
// passes over the rows of bt: each bt row is read once per tile of kRows rows and the inner
// loop (contiguous, no reduction) vectorizes without -ffast-math.
inline void gemm_rows(const float* x, int64_t k, const float* bt, int64_t mp, float* out) {
  std::fill(out, out + kRows * mp, 0.f);
  for (int64_t kk = 0; kk < k; ++kk) {
    const float* __restrict__ w = bt + kk * mp;
    for (int64_t r = 0; r < kRows; ++r) {
      const float xr = x[r * k + kk];
      float* __restrict__ o = out + r * mp;
      for (int64_t j = 0; j < mp; ++j) o[j] += xr * w[j];
    }
  }
}

template <typename scalar_t>
std::vector<float> widen(const at::Tensor& t) {
  const scalar_t* src = t.data_ptr<scalar_t>();
  std::vector<float> out(t.numel());
  for (int64_t i = 0; i < t.numel(); ++i) out[i] = static_cast<float>(src[i]);
  return out;
}

template <typename scalar_t>
void exit_head_rows(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& bias,
                    const std::optional<at::Tensor>& pooler_weight,
                    const std::optional<at::Tensor>& pooler_bias,
                    const std::optional<at::Tensor>& memory, float lam, bool tanh_logits,
                    int64_t criterion, double threshold, const std::optional<at::Tensor>& prev_pred,
                    const std::optional<at::Tensor>& counter,
                    const std::optional<at::Tensor>& policy_weight,
                    const std::optional<at::Tensor>& policy_bias,
                    const std::optional<at::Tensor>& policy_out_weight,
                    const std::optional<at::Tensor>& policy_out_bias, at::Tensor& logits,
                    at::Tensor& score, at::Tensor& exit_mask, at::Tensor& pred,
                    at::Tensor& counter_out) {
  const int64_t n = hidden.size(0), h = hidden.size(1), c = weight.size(0);
  const int64_t row_stride = hidden.stride(0);
  const int64_t hp = round_up(h, kCols), cp = round_up(c, kCols);
  const bool has_pooler = pooler_weight.has_value();
  const std::vector<float> wt = transpose_padded<scalar_t>(weight);
  const std::vector<float> b = widen<scalar_t>(bias);
  const std::vector<float> pwt = has_pooler ? transpose_padded<scalar_t>(*pooler_weight) : std::vector<float>();
  const std::vector<float> pb = has_pooler ? widen<scalar_t>(*pooler_bias) : std::vector<float>();
  // ConsistentEE policy network H -> P -> 1 (criterion "policy"): its hidden layer is one
  // more GEMM on the classifier's input, same micro-kernel, same tile of rows.
  const bool has_policy = criterion == kPolicy;
  const int64_t np = has_policy ? policy_weight->size(0) : 0, npp = round_up(np, kCols);
  const std::vector<float> qwt = has_policy ? transpose_padded<scalar_t>(*policy_weight) : std::vector<float>();
  const std::vector<float> qb = has_policy ? widen<scalar_t>(*policy_bias) : std::vector<float>();
  const std::vector<float> qo = has_policy ? widen<scalar_t>(*policy_out_weight) : std::vector<float>();
  const float qob = has_policy ? widen<scalar_t>(*policy_out_bias)[0] : 0.f;
  const scalar_t* hid = hidden.data_ptr<scalar_t>();
  const float* mem = memory.has_value() ? memory->data_ptr<float>() : nullptr;
  const int64_t* prev = prev_pred.has_value() ? prev_pred->data_ptr<int64_t>() : nullptr;
  const int32_t* cnt = counter.has_value() ? counter->data_ptr<int32_t>() : nullptr;
  float* out_logits = logits.data_ptr<float>();
  float* out_score = score.data_ptr<float>();
  bool* out_exit = exit_mask.data_ptr<bool>();
  int64_t* out_pred = pred.data_ptr<int64_t>();
  int32_t* out_cnt = criterion == kPatience ? counter_out.data_ptr<int32_t>() : nullptr;

  // Parallel over tiles of kRows rows; each tile runs pooler -> classifier -> epilogue.
  const int64_t tiles = (n + kRows - 1) / kRows;
  const int64_t work_per_tile = kRows * (cp * h + (has_pooler ? hp * h : 0) + npp * h) + 1;
  const int64_t grain = std::max<int64_t>(1, (1 << 18) / work_per_tile);
  at::parallel_for(0, tiles, grain, [&](int64_t tb, int64_t te) {
    std::vector<float> x(kRows * h), pooled(has_pooler ? kRows * hp : 0), z(kRows * cp);
    std::vector<float> u(kRows * npp);  // policy pre-activations
    for (int64_t t = tb; t < te; ++t) {
      const int64_t r0 = t * kRows, rows = std::min(kRows, n - r0);
      for (int64_t r = 0; r < kRows; ++r)  // rows past N are zeros, computed and dropped
        for (int64_t k = 0; k < h; ++k)
          x[r * h + k] = r < rows ? static_cast<float>(hid[(r0 + r) * row_stride + k]) : 0.f;
      const float* feat = x.data();
      int64_t feat_stride = h;
      if (has_pooler) {
        gemm_rows(x.data(), h, pwt.data(), hp, pooled.data());
        for (int64_t r = 0; r < kRows; ++r)
          for (int64_t j = 0; j < h; ++j) pooled[r * hp + j] = std::tanh(pooled[r * hp + j] + pb[j]);
        // The classifier reads pooled rows of stride hp; compact them to stride h.
        for (int64_t r = 1; r < kRows; ++r)
          std::copy(pooled.begin() + r * hp, pooled.begin() + r * hp + h, pooled.begin() + r * h);
        feat = pooled.data();
        feat_stride = h;
      }
      gemm_rows(feat, feat_stride, wt.data(), cp, z.data());
      if (has_policy) gemm_rows(feat, feat_stride, qwt.data(), npp, u.data());
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t row = r0 + r;
        float policy_score = 0.f;
        if (has_policy) {
          // p(exit) = sigmoid(wo . GELU(Wq x + bq) + bo)   (consistentee.txt, policy network)
          float a = 0.f;
          for (int64_t j = 0; j < np; ++j) a += gelu_erf(u[r * npp + j] + qb[j]) * qo[j];
          policy_score = stable_sigmoid(a + qob);
        }
        SoftmaxStats st = stats_init();
        float* zrow = out_logits + row * c;
        for (int64_t k = 0; k < c; ++k) {
          const float v = transform_logit(z[r * cp + k] + b[k], tanh_logits, mem != nullptr,
                                          mem ? mem[row * c + k] : 0.f, lam);
          zrow[k] = v;
          stats_push(st, v, k);
        }
        const Decision d =
            decide(st, criterion, threshold, prev ? prev[row] : -1, cnt ? cnt[row] : 0, policy_score);
        out_score[row] = d.score;
        out_exit[row] = d.exit;
        out_pred[row] = d.pred;
        if (out_cnt) out_cnt[row] = d.counter;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> exit_head_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& pooler_weight, const std::optional<at::Tensor>& pooler_bias,
    const std::optional<at::Tensor>& memory, double memory_lambda, bool tanh_logits,
    int64_t criterion, double threshold, const std::optional<at::Tensor>& prev_pred,
    const std::optional<at::Tensor>& counter, const std::optional<at::Tensor>& policy_weight,
    const std::optional<at::Tensor>& policy_bias, const std::optional<at::Tensor>& policy_out_weight,
    const std::optional<at::Tensor>& policy_out_bias) {
  check_exit_head_args(hidden, weight, bias, pooler_weight, pooler_bias, memory, memory_lambda,
                       criterion, threshold, prev_pred, counter, policy_weight, policy_bias,
                       policy_out_weight, policy_out_bias);
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
                            prev_pred, counter, policy_weight, policy_bias, policy_out_weight,
                            policy_out_bias, logits, score, exit_mask, pred, counter_out);
      break;
    case at::kHalf:
      exit_head_rows<at::Half>(hidden, weight, bias, pooler_weight, pooler_bias, memory,
                               static_cast<float>(memory_lambda), tanh_logits, criterion, threshold,
                               prev_pred, counter, policy_weight, policy_bias, policy_out_weight,
                            policy_out_bias, logits, score, exit_mask, pred, counter_out);
      break;
    case at::kBFloat16:
      exit_head_rows<at::BFloat16>(hidden, weight, bias, pooler_weight, pooler_bias, memory,
                                   static_cast<float>(memory_lambda), tanh_logits, criterion,
                                   threshold, prev_pred, counter, policy_weight, policy_bias,
                                   policy_out_weight, policy_out_bias, logits, score, exit_mask,
                                   pred, counter_out);
      break;
    default:
      TORCH_CHECK(false, "exit_head: unsupported dtype ", hidden.scalar_type());
  }
  return {logits, score, exit_mask, pred, counter_out};
}

}  // namespace
}  // namespace eekernels

TORCH_LIBRARY_IMPL(eekernels, CPU, m) { m.impl("exit_head", &eekernels::exit_head_cpu); }
