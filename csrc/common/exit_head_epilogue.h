// Per-row epilogue of the fused exit head, shared by the CPU and CUDA kernels.
//
// Everything after the classifier's dot products lives here, as host+device inline
// functions, so the CPU build (which CI runs) exercises the same arithmetic the CUDA
// kernel runs: the logit transform (tanh, MPEE memory blend), online softmax statistics
// (max, sum of exponentials, entropy numerator, argmax), the activations of ConsistentEE's
// policy network (GELU, sigmoid) and the exit decision.
// The specification is eekernels/ops/exit_head.py::exit_head_reference.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define EE_HD __host__ __device__ __forceinline__
#else
#define EE_HD inline
#endif

namespace eekernels {

enum Criterion : int64_t { kEntropy = 0, kMaxProb = 1, kPatience = 2, kPolicy = 3 };

// Online softmax statistics of a row of logits z_1..z_C:
//   m = max z, s = sum exp(z - m), t = sum exp(z - m) * (z - m), arg = first argmax.
// Then entropy = log(s) - t / s (nats) and max softmax probability = 1 / s.
struct SoftmaxStats {
  float m;
  float s;
  float t;
  int64_t arg;
  bool finite;
};

EE_HD SoftmaxStats stats_init() {
  return SoftmaxStats{-INFINITY, 0.f, 0.f, -1, true};
}

// Merge two partial statistics (associative; ties in the max keep the lower index).
EE_HD SoftmaxStats stats_merge(const SoftmaxStats& a, const SoftmaxStats& b) {
  SoftmaxStats r;
  r.finite = a.finite && b.finite;
  if (b.arg < 0) { r = a; r.finite = a.finite && b.finite; return r; }
  if (a.arg < 0) { r = b; r.finite = a.finite && b.finite; return r; }
  const bool a_wins = (a.m > b.m) || (a.m == b.m && a.arg < b.arg);
  const SoftmaxStats& hi = a_wins ? a : b;
  const SoftmaxStats& lo = a_wins ? b : a;
  const float d = lo.m - hi.m;  // <= 0
  const float e = expf(d);
  r.m = hi.m;
  r.arg = hi.arg;
  r.s = hi.s + lo.s * e;
  // Re-centre lo's sum of e*(z - m_lo) on m_hi: e*(t_lo + s_lo * (m_lo - m_hi)).
  r.t = hi.t + e * (lo.t + lo.s * d);
  return r;
}

// True for finite z (false for NaN and +-inf); needs IEEE math (no -ffast-math).
EE_HD bool is_finite(float z) { return (z - z) == 0.f; }

// Add one logit z (class index c) to running statistics.
EE_HD void stats_push(SoftmaxStats& st, float z, int64_t c) {
  if (!is_finite(z)) {
    st.finite = false;
    return;
  }
  SoftmaxStats one{z, 1.f, 0.f, c, true};
  st = stats_merge(st, one);
}

// Final logit from the classifier's raw output (dot product + bias already summed):
// optional tanh (mpee.txt eq. 9), then the classifier-memory blend (mpee.txt eq. 10).
EE_HD float transform_logit(float z, bool tanh_logits, bool has_memory, float mem, float lam) {
  if (tanh_logits) z = tanhf(z);
  if (has_memory) z = (1.f - lam) * mem + lam * z;
  return z;
}

// Exact (erf) GELU, as torch.nn.GELU(): the policy network's hidden activation
// (consistentee.txt: a two-layer MLP; the public code uses GELU).
EE_HD float gelu_erf(float x) { return 0.5f * x * (1.f + erff(x * 0.70710678118654752f)); }

// Logistic sigmoid without overflow: exp of a non-positive argument only, so a very
// negative a gives a tiny positive probability (not 0 from 1/(1+inf)); +-inf -> 1 / 0,
// NaN -> NaN.
EE_HD float stable_sigmoid(float a) {
  if (a >= 0.f) return 1.f / (1.f + expf(-a));
  const float e = expf(a);  // NaN lands here too: NaN / (1 + NaN) = NaN
  return e / (1.f + e);
}

struct Decision {
  float score;
  bool exit;
  int64_t pred;
  int32_t counter;
};

// The exit decision for one row. prev_pred/prev_counter are used by patience only,
// policy_score (the policy network's p(exit), sigmoid applied) by policy only.
// Scores are float32 and compared with the threshold rounded to float32, as the reference
// (a float32 tensor against a Python float) does; the integer counter is compared exactly.
EE_HD Decision decide(const SoftmaxStats& st, int64_t criterion, double threshold,
                      int64_t prev_pred, int32_t prev_counter, float policy_score = 0.f) {
  Decision d;
  if (!st.finite || st.arg < 0) {
    d.pred = -1;
    d.counter = 0;
    d.exit = false;
    d.score = (criterion == kPatience) ? 0.f : NAN;
    return d;
  }
  d.pred = st.arg;
  if (criterion == kPatience) {
    d.counter = (st.arg == prev_pred) ? prev_counter + 1 : 0;
    d.score = static_cast<float>(d.counter);
    d.exit = static_cast<double>(d.counter) >= threshold;
  } else if (criterion == kPolicy) {
    // ConsistentEE: exit when p(exit) > threshold (0.5 in consistentee.txt), strictly.
    // A NaN policy score never exits and stays NaN; the prediction is kept.
    d.counter = 0;
    d.score = policy_score;
    d.exit = policy_score > static_cast<float>(threshold);  // false for NaN
  } else if (criterion == kMaxProb) {
    d.counter = 0;
    d.score = 1.f / st.s;
    d.exit = d.score >= static_cast<float>(threshold);
  } else {
    d.counter = 0;
    // log(s) - t/s can round to a hair below 0 for a one-hot row; entropy is >= 0.
    d.score = fmaxf(logf(st.s) - st.t / st.s, 0.f);
    d.exit = d.score < static_cast<float>(threshold);
  }
  return d;
}

}  // namespace eekernels
