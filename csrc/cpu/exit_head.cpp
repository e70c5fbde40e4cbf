// Fused exit head, CPU: with pooling "mean", first the masked mean of each row's tokens into
// a float32 [N, H] buffer (token_mean below); then the GEMMs (pooler, classifier and, for criterion "policy",
// ConsistentEE's policy layer) go through ATen's BLAS (at::addmm: MKL / oneDNN SGEMM) in
// float32, the classifier's straight into the logits output; then one pass per row does the
// rest (logit transform, softmax statistics, criterion) in place, rows in parallel.
// Half-type inputs are widened to float32 first, so every dtype runs the same SGEMMs.
// The decision and the logit transform are the shared epilogue of the CUDA kernel
// (exit_head_epilogue.h); the softmax statistics are computed here in two passes over the
// row (max, then sums of exponentials), which vectorize where the online merge cannot.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../common/exit_head_checks.h"
#include "../common/exit_head_epilogue.h"
#include "exit_head.h"

// Let the row loops below vectorize: GCC does not if-convert float selects (the clamps,
// max) when it must preserve floating-point traps, which nothing here observes. NaN and
// inf arithmetic stays IEEE (this is not -ffast-math), and the NaN contract relies on it.
#pragma GCC optimize("no-trapping-math")

namespace eekernels {
namespace {

// float32 view of a parameter: itself when float32 (no copy), else widened.
at::Tensor as_float(const at::Tensor& t) { return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat); }

// exp(x) for x <= 0, branch-free so that a loop of it vectorizes (glibc's expf does not
// without -ffast-math): x = n ln2 + r, |r| <= ln2/2, exp(r) by its degree-6 Taylor
// polynomial (relative error < 2e-7 before rounding), times 2^n built in the exponent bits.
// Below -87 (2^n would be subnormal) the result is flushed to 0; against the row's sum,
// which is >= 1, such a term is below float32 resolution anyway.
__attribute__((always_inline)) inline float exp_nonpositive(float x) {
  const float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693145751953125f, kLn2Lo = 1.42860682030941723e-6f;
  const float kRound = 12582912.f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const float xc = x < -87.f ? -87.f : x;
  const float n = (xc * kLog2e + kRound) - kRound;
  const float r = (xc - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.f ? 0.f : p * scale;
}

// Sum of v[0..n) in `Lanes` interleaved partial sums: an order the compiler may vectorize
// (a single running sum it may not reorder without -ffast-math).
constexpr int64_t kLanes = 8;
template <int64_t Lanes>
__attribute__((always_inline)) inline float lane_sum(const float* v, int64_t n) {
  float acc[Lanes];
  for (int64_t j = 0; j < Lanes; ++j) acc[j] = 0.f;
  int64_t k = 0;
  for (; k + Lanes <= n; k += Lanes)
    for (int64_t j = 0; j < Lanes; ++j) acc[j] += v[k + j];
  for (int64_t j = 0; k + j < n; ++j) acc[j] += v[k + j];
  float s = 0.f;
  for (int64_t j = 0; j < Lanes; ++j) s += acc[j];
  return s;
}

// Max of z[0..c) and a finiteness check (0 for finite values, NaN when any is NaN or
// +-inf), in `Lanes` interleaved lanes: loops without branches that vectorize. Each lane is
// a dependency chain, so many classes want more lanes (32: four AVX2 registers) than a few
// do (8 or 1: less to set up and reduce); row_stats picks.
template <int64_t Lanes>
__attribute__((always_inline)) inline void max_and_check(const float* z, int64_t c, float& m, float& bad) {
  float mx[Lanes], chk[Lanes];
  for (int64_t j = 0; j < Lanes; ++j) {
    mx[j] = -INFINITY;
    chk[j] = 0.f;
  }
  int64_t k = 0;
  for (; k + Lanes <= c; k += Lanes)
    for (int64_t j = 0; j < Lanes; ++j) {
      const float v = z[k + j];
      mx[j] = v > mx[j] ? v : mx[j];
      chk[j] += v - v;  // 0 for a finite v, NaN for NaN or +-inf
    }
  for (int64_t j = 0; k + j < c; ++j) {
    const float v = z[k + j];
    mx[j] = v > mx[j] ? v : mx[j];
    chk[j] += v - v;
  }
  m = mx[0];
  bad = chk[0];
  for (int64_t j = 1; j < Lanes; ++j) {
    m = mx[j] > m ? mx[j] : m;
    bad += chk[j];
  }
}

// Rows at least this long take the wide lanes; the block search below needs as many values.
constexpr int64_t kWideLanes = 32;

// The first index of z holding m (m occurs in z): whole blocks compared at once (a count of
// hits, which vectorizes where a loop that stops at the first hit does not), then the block
// with the hit scanned. Ties go to the lowest index.
__attribute__((always_inline)) inline int64_t first_index_of(const float* z, int64_t c, float m) {
  int64_t k = 0;
  for (; k + kWideLanes <= c; k += kWideLanes) {
    int32_t hits = 0;
    for (int64_t j = 0; j < kWideLanes; ++j) hits += z[k + j] == m;
    if (hits != 0) break;
  }
  while (z[k] != m) ++k;
  return k;
}

// Softmax statistics (exit_head_epilogue.h's SoftmaxStats) of one row of final logits:
// max, its first index, then s = sum exp(z - m) and t = sum exp(z - m) * (z - m), with
// `scratch` (2C floats) holding the terms; without scratch only max and argmax (s = 1, t = 0).
// A row with a NaN or +-inf is marked non-finite and not summed (decide() rejects it).
template <int64_t Lanes>
__attribute__((always_inline)) inline SoftmaxStats stats_in_lanes(const float* z, int64_t c, float* scratch) {
  float m, bad;
  max_and_check<Lanes>(z, c, m, bad);
  SoftmaxStats st = stats_init();
  if (bad != 0.f) {  // NaN != 0 too
    st.finite = false;
    return st;
  }
  const int64_t arg = first_index_of(z, c, m);
  if (scratch == nullptr) return SoftmaxStats{m, 1.f, 0.f, arg, true};
  float* e = scratch;
  float* ed = scratch + c;
  for (int64_t q = 0; q < c; ++q) {
    const float d = z[q] - m;
    e[q] = exp_nonpositive(d);
    ed[q] = e[q] * d;
  }
  return SoftmaxStats{m, lane_sum<Lanes>(e, c), lane_sum<Lanes>(ed, c), arg, true};
}

// stats_in_lanes with as many lanes as the row fills: one for a few classes (nothing to set
// up and reduce), kLanes, kWideLanes for many. Every pass vectorizes where it has lanes; an
// AVX2 + FMA (x86-64-v3) clone is picked at load time where the CPU has them.
__attribute__((target_clones("arch=x86-64-v3", "default")))
SoftmaxStats row_stats(const float* z, int64_t c, float* scratch) {
  if (c >= kWideLanes) return stats_in_lanes<kWideLanes>(z, c, scratch);
  if (c >= kLanes) return stats_in_lanes<kLanes>(z, c, scratch);
  return stats_in_lanes<1>(z, c, scratch);
}

// 1 + erf(z), branch-free so that a loop of it vectorizes: erfc(|z|) by Abramowitz & Stegun
// 7.1.26 (|error| <= 1.5e-7; ATen's vectorized erf, which at::gelu uses on CPU, is the same
// approximation), then 2 - erfc for z >= 0. For z < 0 the result is erfc(|z|) itself, with
// no cancellation. NaN stays NaN; +-inf give 2 and 0.
__attribute__((always_inline)) inline float one_plus_erf(float z) {
  const float a = __builtin_fabsf(z);  // std::fabs would be a call: it is compiled without the pragma above
  const float t = 1.f / (1.f + 0.3275911f * a);
  float p = 1.061405429f;
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  const float q = p * t * exp_nonpositive(-a * a);
  return z >= 0.f ? 2.f - q : q;
}

// ConsistentEE's policy logit of one row, wo . GELU(u) + bo (consistentee.txt), u the row's
// P hidden units: exact (erf) GELU x / 2 (1 + erf(x / sqrt 2)), summed in kLanes interleaved
// lanes so that the loop vectorizes (an x86-64-v3 clone where the CPU has AVX2 + FMA).
__attribute__((target_clones("arch=x86-64-v3", "default")))
float policy_logit(const float* u, const float* wo, int64_t p, float bo) {
  constexpr float kSqrtHalf = 0.70710678118654752f;
  float acc[kLanes] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t k = 0;
  for (; k + kLanes <= p; k += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) {
      const float x = u[k + j];
      acc[j] += 0.5f * x * one_plus_erf(x * kSqrtHalf) * wo[k + j];
    }
  for (int64_t j = 0; k + j < p; ++j) {
    const float x = u[k + j];
    acc[j] += 0.5f * x * one_plus_erf(x * kSqrtHalf) * wo[k + j];
  }
  float s = bo;
  for (int64_t j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

// Pooling "mean": float32 [N, H], row r the mean of hidden[r, t, :] over the tokens t with
// token_mask[r, t] (every token without a mask), 0 for a row without one. Tokens outside the
// mask are never read. hidden [N, S, H] has any row and token strides and a contiguous last
// dim (or H = 1), token_mask any strides. Float accumulation in token order (the order the
// engine's padding never changes, so a row's mean is the same batched or alone), rows in
// parallel once a thread's share is worth waking it.
at::Tensor token_mean(const at::Tensor& hidden, const std::optional<at::Tensor>& token_mask) {
  const int64_t n = hidden.size(0), s = hidden.size(1), h = hidden.size(2);
  at::Tensor out = at::zeros({n, h}, hidden.options().dtype(at::kFloat));
  if (n == 0 || s == 0 || h == 0) return out;
  const int64_t hs0 = hidden.stride(0), hs1 = hidden.stride(1);
  const bool* mask = token_mask.has_value() ? token_mask->const_data_ptr<bool>() : nullptr;
  const int64_t ms0 = mask ? token_mask->stride(0) : 0, ms1 = mask ? token_mask->stride(1) : 0;
  float* o = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 65536 / (s * h));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "exit_head_token_mean", [&] {
    const scalar_t* x = hidden.const_data_ptr<scalar_t>();
    at::parallel_for(0, n, grain, [&](int64_t rb, int64_t re) {
      for (int64_t row = rb; row < re; ++row) {
        float* __restrict__ acc = o + row * h;
        int64_t count = 0;
        for (int64_t t = 0; t < s; ++t) {
          if (mask != nullptr && !mask[row * ms0 + t * ms1]) continue;
          const scalar_t* __restrict__ xt = x + row * hs0 + t * hs1;
          for (int64_t k = 0; k < h; ++k) acc[k] += static_cast<float>(xt[k]);
          ++count;
        }
        if (count > 1) {
          const float cnt = static_cast<float>(count);  // a division, as torch's mean
          for (int64_t k = 0; k < h; ++k) acc[k] /= cnt;
        }
      }
    });
  });
  return out;
}

}  // namespace

// Also bound in csrc/register.cpp as eekernels._C.exit_head_cpu, which the Python wrapper
// calls without the dispatcher's boxing (a few microseconds a call at small batches).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> exit_head_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& pooler_weight, const std::optional<at::Tensor>& pooler_bias,
    const std::optional<at::Tensor>& memory, double memory_lambda, bool tanh_logits,
    int64_t criterion, double threshold, const std::optional<at::Tensor>& prev_pred,
    const std::optional<at::Tensor>& counter, const std::optional<at::Tensor>& policy_weight,
    const std::optional<at::Tensor>& policy_bias, const std::optional<at::Tensor>& policy_out_weight,
    const std::optional<at::Tensor>& policy_out_bias, const std::optional<at::Tensor>& token_mask,
    int64_t pooling) {
  check_exit_head_args(hidden, weight, bias, pooler_weight, pooler_bias, memory, memory_lambda,
                       criterion, threshold, prev_pred, counter, policy_weight, policy_bias,
                       policy_out_weight, policy_out_bias, token_mask, pooling);
  const int64_t n = hidden.size(0), c = weight.size(0);
  const auto opts = hidden.options();
  at::Tensor logits = at::empty({n, c}, opts.dtype(at::kFloat));
  at::Tensor score = at::empty({n}, opts.dtype(at::kFloat));
  at::Tensor exit_mask = at::empty({n}, opts.dtype(at::kBool));
  at::Tensor pred = at::empty({n}, opts.dtype(at::kLong));
  at::Tensor counter_out = at::empty({criterion == kPatience ? n : 0}, opts.dtype(at::kInt));
  if (n == 0) return {logits, score, exit_mask, pred, counter_out};

  // GEMMs. hidden's rows may be strided (states[:, 0]): BLAS takes the row stride as lda.
  // With pooling "mean" their input is the float32 mean (never rounded to a half type).
  at::Tensor x = pooling == kPoolMean ? token_mean(hidden, token_mask) : as_float(hidden);
  if (pooler_weight.has_value()) {
    x = at::addmm(as_float(*pooler_bias), x, as_float(*pooler_weight).t());
    x.tanh_();
  }
  at::addmm_out(logits, as_float(bias), x, as_float(weight).t());
  // ConsistentEE policy network, p(exit) = sigmoid(wo . GELU(Wq x + bq) + bo)
  // (consistentee.txt): the hidden layer is one more SGEMM, its GELU and output unit run in
  // the row pass (policy_logit), so no [N, P] GELU output is written and read again.
  const bool has_policy = criterion == kPolicy;
  at::Tensor u, qo;
  float qob = 0.f;
  if (has_policy) {
    u = at::addmm(as_float(*policy_bias), x, as_float(*policy_weight).t());
    qo = as_float(*policy_out_weight);
    qob = as_float(*policy_out_bias).item<float>();
  }
  const int64_t np = has_policy ? u.size(1) : 0;
  const float* pu = has_policy ? u.data_ptr<float>() : nullptr;
  const float* pqo = has_policy ? qo.data_ptr<float>() : nullptr;

  const float lam = static_cast<float>(memory_lambda);
  const float* mem = memory.has_value() ? memory->data_ptr<float>() : nullptr;
  const int64_t* prev = prev_pred.has_value() ? prev_pred->data_ptr<int64_t>() : nullptr;
  const int32_t* cnt = counter.has_value() ? counter->data_ptr<int32_t>() : nullptr;
  float* out_logits = logits.data_ptr<float>();
  float* out_score = score.data_ptr<float>();
  bool* out_exit = exit_mask.data_ptr<bool>();
  int64_t* out_pred = pred.data_ptr<int64_t>();
  int32_t* out_cnt = criterion == kPatience ? counter_out.data_ptr<int32_t>() : nullptr;
  const bool transform = tanh_logits || mem != nullptr;

  // Only entropy and max_prob read the sums of exponentials; patience and policy need the
  // row's finiteness and argmax alone.
  const bool sums = criterion == kEntropy || criterion == kMaxProb;
  // A thread's share is worth waking it only past a few microseconds of work, so small
  // batches run on the calling thread (a policy unit costs about 8 logits' work).
  const int64_t grain = std::max<int64_t>(1, 16384 / (c + 16 + 8 * np));
  at::parallel_for(0, n, grain, [&](int64_t rb, int64_t re) {
    std::vector<float> scratch(sums ? 2 * c : 0);
    for (int64_t row = rb; row < re; ++row) {
      float* z = out_logits + row * c;
      if (transform)
        for (int64_t k = 0; k < c; ++k)
          z[k] = transform_logit(z[k], tanh_logits, mem != nullptr, mem ? mem[row * c + k] : 0.f, lam);
      const float policy_score = pu != nullptr ? stable_sigmoid(policy_logit(pu + row * np, pqo, np, qob)) : 0.f;
      const Decision d = decide(row_stats(z, c, sums ? scratch.data() : nullptr), criterion, threshold,
                                prev ? prev[row] : -1, cnt ? cnt[row] : 0, policy_score);
      out_score[row] = d.score;
      out_exit[row] = d.exit;
      out_pred[row] = d.pred;
      if (out_cnt) out_cnt[row] = d.counter;
    }
  });
  return {logits, score, exit_mask, pred, counter_out};
}

}  // namespace eekernels

TORCH_LIBRARY_IMPL(eekernels, CPU, m) { m.impl("exit_head", &eekernels::exit_head_cpu); }
