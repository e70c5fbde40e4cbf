// Fused exit head, CUDA: (optional pooler) -> classifier -> tanh/memory -> softmax
// statistics -> exit criterion. The per-row epilogue (logit transform, online softmax
// statistics, decision) is the shared host+device code of exit_head_epilogue.h, the same
// functions the CPU kernel runs; the specification is
// eekernels/ops/exit_head.py::exit_head_reference (float32 arithmetic throughout).
//
// Kernels
//   1. pooler (only when pooler_weight is given): pooled = tanh(X Wp^T + bp) into a float32
//      scratch [N, H] (never rounded to a half type). Output tiles of 64 rows x 64 columns,
//      one thread block each (grid: row tiles in x, column tiles in y), so even N = 512,
//      H = 768 gives 96 blocks.
//        - float16 / bfloat16 on sm_80+ with 16-byte aligned rows and H % 8 == 0: tensor
//          cores (nvcuda::wmma 16x16x16, float accumulators), 4 warps of 32x32 each, a
//          4-stage cp.async pipeline over K tiles of 64 (72 KB dynamic shared memory).
//        - otherwise (float32, unaligned or odd H, pre-Ampere): FP32 FMA tiles, 256 threads
//          of 4x4 outputs, K tiles of 16 staged through shared memory with a register
//          prefetch of the next tile.
//   2. rows: one warp per row (grid-stride), outputs in chunks of CT (1, 2, 4 or 8): each
//      lane accumulates CT partial dot products over its slice of H, reading the row with
//      16-byte vector loads (when H % 8 == 0 and rows/weights are 16-byte aligned; scalar
//      loads otherwise) and the weights through the read-only cache; butterfly shuffles
//      give every lane the full dot products, then every lane runs the (warp-uniform)
//      epilogue and lane 0 stores the decision. Its input is hidden itself, or the float32
//      pooled scratch. With criterion "policy" (ConsistentEE), the outputs are the C
//      classes followed by the P hidden units of the policy network (rows of policy_weight):
//      the same loop computes their dot products on the same input, and the epilogue folds
//      each unit into the running sum wo . GELU(Wq x + bq) instead of the softmax stats.
//   0. mean pooling (pooling "mean" only, hidden [N, S, H]): token_mean_kernel writes each
//      row's masked mean of its tokens to a float32 scratch [N, H] (one thread per column, a
//      block per row and chunk of 128 columns, rows grid-strided; the tokens summed in order
//      in float32, a masked token never read, 0 for a row without a real token). Kernels 1
//      and 2 then read that float32 scratch (the FP32 FMA pooler: the mean is never rounded
//      to a half type for the tensor cores).
// No host synchronisation and no allocation besides the outputs and the pooler's and the
// mean's scratch, so the op can be captured in a CUDA graph.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <atomic>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

#include "../common/exit_head_checks.h"
#include "../common/exit_head_epilogue.h"

namespace eekernels {
namespace {

// ----------------------------------------------------------------------------- types

// at:: scalar type -> CUDA storage type (same bit layout).
template <typename T> struct DevType { using type = T; };
template <> struct DevType<at::Half> { using type = __half; };
template <> struct DevType<at::BFloat16> { using type = __nv_bfloat16; };

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Eight consecutive elements as 16-byte vectors: two float4 for float32, one uint4 for
// the 16-bit types. Loads need a 16-byte aligned address.
template <typename T> struct Pack8;
template <> struct Pack8<float> { float4 a, b; };
template <> struct Pack8<__half> { uint4 a; };
template <> struct Pack8<__nv_bfloat16> { uint4 a; };

// Streaming load (each row is read once): evict-first.
__device__ __forceinline__ Pack8<float> load_stream(const float* p) {
  const float4* q = reinterpret_cast<const float4*>(p);
  return Pack8<float>{__ldcs(q), __ldcs(q + 1)};
}
__device__ __forceinline__ Pack8<__half> load_stream(const __half* p) {
  return Pack8<__half>{__ldcs(reinterpret_cast<const uint4*>(p))};
}
__device__ __forceinline__ Pack8<__nv_bfloat16> load_stream(const __nv_bfloat16* p) {
  return Pack8<__nv_bfloat16>{__ldcs(reinterpret_cast<const uint4*>(p))};
}

// Read-only-cache load (weights, reused by every row).
__device__ __forceinline__ Pack8<float> load_ro(const float* p) {
  const float4* q = reinterpret_cast<const float4*>(p);
  return Pack8<float>{__ldg(q), __ldg(q + 1)};
}
__device__ __forceinline__ Pack8<__half> load_ro(const __half* p) {
  return Pack8<__half>{__ldg(reinterpret_cast<const uint4*>(p))};
}
__device__ __forceinline__ Pack8<__nv_bfloat16> load_ro(const __nv_bfloat16* p) {
  return Pack8<__nv_bfloat16>{__ldg(reinterpret_cast<const uint4*>(p))};
}

__device__ __forceinline__ void unpack(const Pack8<float>& p, float (&f)[8]) {
  f[0] = p.a.x; f[1] = p.a.y; f[2] = p.a.z; f[3] = p.a.w;
  f[4] = p.b.x; f[5] = p.b.y; f[6] = p.b.z; f[7] = p.b.w;
}
__device__ __forceinline__ void unpack_word(unsigned int w, __half, float& lo, float& hi) {
  __half2 h;
  static_assert(sizeof(h) == sizeof(w), "half2 size");
  memcpy(&h, &w, sizeof(w));
  const float2 f = __half22float2(h);
  lo = f.x; hi = f.y;
}
__device__ __forceinline__ void unpack_word(unsigned int w, __nv_bfloat16, float& lo, float& hi) {
  __nv_bfloat162 h;
  static_assert(sizeof(h) == sizeof(w), "bfloat162 size");
  memcpy(&h, &w, sizeof(w));
  const float2 f = __bfloat1622float2(h);
  lo = f.x; hi = f.y;
}
template <typename T>
__device__ __forceinline__ void unpack(const Pack8<T>& p, float (&f)[8]) {
  unpack_word(p.a.x, T(), f[0], f[1]);
  unpack_word(p.a.y, T(), f[2], f[3]);
  unpack_word(p.a.z, T(), f[4], f[5]);
  unpack_word(p.a.w, T(), f[6], f[7]);
}

// ----------------------------------------------------------------------------- rows kernel

constexpr int kRowWarps = 4;             // warps (rows in flight) per block
constexpr int kRowThreads = kRowWarps * 32;
constexpr int kUnroll = 4;               // vector loads in flight per lane and pass

// ConsistentEE's policy network H -> P -> 1 (criterion "policy"); all nullptr otherwise.
template <typename TW>
struct PolicyArgs {
  const TW* w;      // [P, H] hidden layer
  const TW* b;      // [P]
  const TW* w_out;  // [P] output unit
  const TW* b_out;  // [1]
};

struct RowArgs {
  const float* memory;      // [N, C] or nullptr
  const int64_t* prev_pred; // [N] or nullptr
  const int32_t* prev_cnt;  // [N] or nullptr
  float* logits;            // [N, C]
  float* score;             // [N]
  bool* exit_mask;          // [N]
  int64_t* pred;            // [N]
  int32_t* counter;         // [N] (patience) or nullptr
  int64_t n;
  int c;
  int h;
  int p;                    // policy hidden units (0 without the policy criterion)
  float lam;
  bool tanh_logits;
  int64_t criterion;
  double threshold;
};

// x: [N, H] rows of stride ldx (elements), w: [C, H] contiguous, b: [C]; q: the policy
// network (a.p > 0 only), q.w [P, H] contiguous.
// VEC: H % 8 == 0 and x rows / w / q.w are 16-byte aligned (checked on the host).
template <typename TI, typename TW, int CT, bool VEC>
__global__ void __launch_bounds__(kRowThreads)
exit_head_rows_kernel(const TI* __restrict__ x, int64_t ldx, const TW* __restrict__ w,
                      const TW* __restrict__ b, PolicyArgs<TW> q, RowArgs a) {
  const int lane = threadIdx.x & 31;
  const int64_t nwarps = static_cast<int64_t>(gridDim.x) * kRowWarps;
  const int C = a.c, H = a.h;
  // Output o < C is class o (row o of w); o >= C is the policy's hidden unit o - C.
  const int O = C + a.p;
  const bool has_memory = a.memory != nullptr;
  // One pass over the outputs reads each row once (stream it past the caches); with more
  // than CT outputs the row is re-read per chunk of outputs, so keep it cached then.
  const bool single_pass = O <= CT;
  // The row loop is warp-uniform, so full-mask shuffles are safe.
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowWarps + (threadIdx.x >> 5); row < a.n;
       row += nwarps) {
    const TI* xr = x + row * ldx;
    SoftmaxStats st = stats_init();
    float policy_acc = 0.f;  // wo . GELU(Wq x + bq), summed in unit order (warp-uniform)
    for (int c0 = 0; c0 < O; c0 += CT) {
      float acc[CT];
#pragma unroll
      for (int j = 0; j < CT; ++j) acc[j] = 0.f;
      if constexpr (VEC) {
        const int hp = H >> 3;  // packs of 8 elements
        for (int p0 = 0; p0 < hp; p0 += 32 * kUnroll) {
          Pack8<TI> xp[kUnroll];
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            const int p = p0 + u * 32 + lane;
            if (p < hp) {
              const TI* src = xr + static_cast<int64_t>(p) * 8;
              xp[u] = single_pass ? load_stream(src) : load_ro(src);
            }
          }
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            const int p = p0 + u * 32 + lane;
            if (p < hp) {
              float xf[8];
              unpack(xp[u], xf);
#pragma unroll
              for (int j = 0; j < CT; ++j) {
                if (CT == 1 || c0 + j < O) {
                  float wf[8];
                  const int o = c0 + j;
                  const TW* wr = o < C ? w + static_cast<int64_t>(o) * H : q.w + static_cast<int64_t>(o - C) * H;
                  unpack(load_ro(wr + static_cast<int64_t>(p) * 8), wf);
#pragma unroll
                  for (int e = 0; e < 8; ++e) acc[j] = fmaf(xf[e], wf[e], acc[j]);
                }
              }
            }
          }
        }
      } else {
        for (int h0 = 0; h0 < H; h0 += 32 * kUnroll) {
          float xv[kUnroll];
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            const int hh = h0 + u * 32 + lane;
            xv[u] = hh < H ? to_float(xr[hh]) : 0.f;
          }
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            const int hh = h0 + u * 32 + lane;
            if (hh < H) {
#pragma unroll
              for (int j = 0; j < CT; ++j) {
                const int o = c0 + j;
                if (CT == 1 || o < O) {
                  const TW* wr = o < C ? w + static_cast<int64_t>(o) * H : q.w + static_cast<int64_t>(o - C) * H;
                  acc[j] = fmaf(xv[u], to_float(__ldg(wr + hh)), acc[j]);
                }
              }
            }
          }
        }
      }
      // Butterfly reduction: every lane ends with the full dot products.
#pragma unroll
      for (int j = 0; j < CT; ++j) {
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) acc[j] += __shfl_xor_sync(0xffffffffu, acc[j], off);
      }
      // Epilogue for this chunk of outputs, in output order (uniform across the warp).
#pragma unroll
      for (int j = 0; j < CT; ++j) {
        const int cls = c0 + j;
        if (CT == 1 || cls < C) {
          const int64_t idx = row * C + cls;
          const float mem = has_memory ? a.memory[idx] : 0.f;
          const float z = transform_logit(acc[j] + to_float(b[cls]), a.tanh_logits, has_memory, mem, a.lam);
          if (lane == j) a.logits[idx] = z;
          stats_push(st, z, cls);
        } else if (cls < O) {
          // Policy hidden unit (consistentee.txt: a two-layer MLP beside the classifier).
          const int unit = cls - C;
          policy_acc = fmaf(gelu_erf(acc[j] + to_float(q.b[unit])), to_float(q.w_out[unit]), policy_acc);
        }
      }
    }
    if (lane == 0) {
      const int64_t pp = a.prev_pred ? a.prev_pred[row] : int64_t(-1);
      const int32_t pc = a.prev_cnt ? a.prev_cnt[row] : 0;
      const float ps = a.p > 0 ? stable_sigmoid(policy_acc + to_float(q.b_out[0])) : 0.f;
      const Decision d = decide(st, a.criterion, a.threshold, pp, pc, ps);
      a.score[row] = d.score;
      a.exit_mask[row] = d.exit;
      a.pred[row] = d.pred;
      if (a.counter) a.counter[row] = d.counter;
    }
  }
}

template <typename TI, typename TW, int CT>
void launch_rows_ct(const TI* x, int64_t ldx, const TW* w, const TW* b, const PolicyArgs<TW>& q,
                    const RowArgs& a, bool vec, cudaStream_t stream) {
  const int64_t blocks64 = (a.n + kRowWarps - 1) / kRowWarps;
  const unsigned int blocks = static_cast<unsigned int>(blocks64 < (int64_t(1) << 24) ? blocks64 : (int64_t(1) << 24));
  if (vec) {
    exit_head_rows_kernel<TI, TW, CT, true><<<blocks, kRowThreads, 0, stream>>>(x, ldx, w, b, q, a);
  } else {
    exit_head_rows_kernel<TI, TW, CT, false><<<blocks, kRowThreads, 0, stream>>>(x, ldx, w, b, q, a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename TI, typename TW>
void launch_rows(const TI* x, int64_t ldx, const TW* w, const TW* b, const PolicyArgs<TW>& q,
                 const RowArgs& a, cudaStream_t stream) {
  const bool vec = (a.h % 8 == 0) && aligned16(x) && aligned16(w) && (a.p == 0 || aligned16(q.w)) &&
                   (a.n <= 1 || (ldx * static_cast<int64_t>(sizeof(TI))) % 16 == 0);
  const int outputs = a.c + a.p;  // classes, then the policy's hidden units
  if (outputs == 1) {
    launch_rows_ct<TI, TW, 1>(x, ldx, w, b, q, a, vec, stream);
  } else if (outputs == 2) {
    launch_rows_ct<TI, TW, 2>(x, ldx, w, b, q, a, vec, stream);
  } else if (outputs <= 4) {
    launch_rows_ct<TI, TW, 4>(x, ldx, w, b, q, a, vec, stream);
  } else {
    launch_rows_ct<TI, TW, 8>(x, ldx, w, b, q, a, vec, stream);
  }
}

// ----------------------------------------------------------------------------- pooler, tensor cores

constexpr int kTcBM = 64, kTcBN = 64, kTcBK = 64, kTcStages = 4;
constexpr int kTcLds = kTcBK + 8;   // padded smem row (elements): 144 bytes, 16-byte multiple
constexpr int kTcLdc = kTcBN + 4;   // padded float row of the epilogue tile
constexpr int kTcThreads = 128;     // 4 warps as 2 x 2, each a 32 x 32 sub-tile
constexpr size_t kTcSmemBytes =
    static_cast<size_t>(kTcStages) * (kTcBM + kTcBN) * kTcLds * 2;  // 73728
static_assert(static_cast<size_t>(kTcBM) * kTcLdc * sizeof(float) <= kTcSmemBytes,
              "epilogue tile must fit in the pipeline buffers");

// cp.async helpers (sm_80+). Only defined where the tensor-core kernel has a body.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src, bool valid) {
#if defined(__CUDA_ARCH__)
  const unsigned int dst = static_cast<unsigned int>(__cvta_generic_to_shared(smem_dst));
  const int src_size = valid ? 16 : 0;  // 0: nothing is read, the 16 bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src), "r"(src_size));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}
#endif

// out[m][o] = tanh(sum_k A[m][k] * Wp[o][k] + bp[o]) for m < N, o < H; out is float32 [N, H].
// Requires (host-checked): sm_80+, H % 8 == 0, A rows and Wp 16-byte aligned.
template <typename T>
__global__ void __launch_bounds__(kTcThreads)
pooler_wmma_kernel(const T* __restrict__ A, int64_t lda, const T* __restrict__ Wp,
                   const T* __restrict__ bp, float* __restrict__ out, int64_t N, int H) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* As = reinterpret_cast<T*>(smem_raw);              // [stages][BM][Lds]
  T* Bs = As + kTcStages * kTcBM * kTcLds;             // [stages][BN][Lds]  (Wp rows: o-major)

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int warp_m = warp >> 1, warp_n = warp & 1;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTcBM;
  const int n0 = blockIdx.y * kTcBN;
  const int ktiles = (H + kTcBK - 1) / kTcBK;

  auto load_stage = [&](int stage, int kt) {
    const int k0 = kt * kTcBK;
    T* as = As + stage * kTcBM * kTcLds;
    T* bs = Bs + stage * kTcBN * kTcLds;
    constexpr int kChunksPerRow = kTcBK / 8;  // 16-byte chunks
#pragma unroll
    for (int i = 0; i < (kTcBM * kChunksPerRow) / kTcThreads; ++i) {
      const int idx = tid + i * kTcThreads;
      const int r = idx / kChunksPerRow, cc = idx % kChunksPerRow;
      const int64_t gm = m0 + r;
      const int gk = k0 + cc * 8;
      const bool valid = gm < N && gk < H;  // H % 8 == 0: a chunk is all in or all out
      const T* src = valid ? A + gm * lda + gk : A;
      cp_async16(as + r * kTcLds + cc * 8, src, valid);
    }
#pragma unroll
    for (int i = 0; i < (kTcBN * kChunksPerRow) / kTcThreads; ++i) {
      const int idx = tid + i * kTcThreads;
      const int r = idx / kChunksPerRow, cc = idx % kChunksPerRow;
      const int go = n0 + r;
      const int gk = k0 + cc * 8;
      const bool valid = go < H && gk < H;
      const T* src = valid ? Wp + static_cast<int64_t>(go) * H + gk : Wp;
      cp_async16(bs + r * kTcLds + cc * 8, src, valid);
    }
  };

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  // Prologue: stages 0 .. S-2 in flight (one commit group per stage, empty if past the end).
#pragma unroll
  for (int s = 0; s < kTcStages - 1; ++s) {
    if (s < ktiles) load_stage(s, s);
    cp_async_commit();
  }

  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<kTcStages - 2>();  // tile kt has landed (for this thread's copies)
    __syncthreads();                 // ... for all threads; and stage (kt-1) % S is free
    {
      const int nk = kt + kTcStages - 1;
      if (nk < ktiles) load_stage(nk % kTcStages, nk);
      cp_async_commit();
    }
    const int stage = kt % kTcStages;
    const T* as = As + stage * kTcBM * kTcLds;
    const T* bs = Bs + stage * kTcBN * kTcLds;
#pragma unroll
    for (int kk = 0; kk < kTcBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i)
        wmma::load_matrix_sync(fa[i], as + (warp_m * 32 + i * 16) * kTcLds + kk, kTcLds);
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::load_matrix_sync(fb[j], bs + (warp_n * 32 + j * 16) * kTcLds + kk, kTcLds);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // all warps done with the pipeline buffers; reuse them for the tile

  float* Cs = reinterpret_cast<float*>(smem_raw);  // [BM][Ldc]
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(Cs + (warp_m * 32 + i * 16) * kTcLdc + warp_n * 32 + j * 16, acc[i][j],
                              kTcLdc, wmma::mem_row_major);
  __syncthreads();
  for (int idx = tid; idx < kTcBM * kTcBN; idx += kTcThreads) {
    const int r = idx / kTcBN, c = idx % kTcBN;
    const int64_t gm = m0 + r;
    const int go = n0 + c;
    if (gm < N && go < H) out[gm * H + go] = tanhf(Cs[r * kTcLdc + c] + to_float(bp[go]));
  }
#else
  __trap();  // never launched: the host takes this path only on sm_80+
#endif
}

// ----------------------------------------------------------------------------- pooler, FP32 FMA

constexpr int kSmBM = 64, kSmBN = 64, kSmBK = 16, kSmThreads = 256;

// Same contract as pooler_wmma_kernel; any dtype, alignment, H and architecture. The input
// rows (TA) may be float32 while the weights (TW) are a half type (the mean of pooling "mean").
template <typename TA, typename TW>
__global__ void __launch_bounds__(kSmThreads)
pooler_simt_kernel(const TA* __restrict__ A, int64_t lda, const TW* __restrict__ Wp,
                   const TW* __restrict__ bp, float* __restrict__ out, int64_t N, int H) {
  __shared__ float As[kSmBK][kSmBM + 1];  // k-major: As[k][m]
  __shared__ float Bs[kSmBK][kSmBN + 1];  // k-major: Bs[k][o]
  const int tid = threadIdx.x;
  const int tx = tid & 15, ty = tid >> 4;  // thread owns rows ty + 16 i, columns tx + 16 j
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kSmBM;
  const int n0 = blockIdx.y * kSmBN;
  const int ktiles = (H + kSmBK - 1) / kSmBK;
  constexpr int kPer = (kSmBM * kSmBK) / kSmThreads;  // 4 elements of A and of B per thread
  static_assert(kSmBM == kSmBN, "A and B tiles share the load mapping");

  float ra[kPer], rb[kPer];
  auto load_regs = [&](int kt) {
    const int k0 = kt * kSmBK;
#pragma unroll
    for (int e = 0; e < kPer; ++e) {
      const int idx = tid + e * kSmThreads;
      const int r = idx / kSmBK, kk = idx % kSmBK;
      const int gk = k0 + kk;
      const int64_t gm = m0 + r;
      const int go = n0 + r;
      ra[e] = (gm < N && gk < H) ? to_float(A[gm * lda + gk]) : 0.f;
      rb[e] = (go < H && gk < H) ? to_float(Wp[static_cast<int64_t>(go) * H + gk]) : 0.f;
    }
  };

  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

  if (ktiles > 0) load_regs(0);
  for (int kt = 0; kt < ktiles; ++kt) {
    __syncthreads();  // previous tile fully consumed
#pragma unroll
    for (int e = 0; e < kPer; ++e) {
      const int idx = tid + e * kSmThreads;
      const int r = idx / kSmBK, kk = idx % kSmBK;
      As[kk][r] = ra[e];
      Bs[kk][r] = rb[e];
    }
    __syncthreads();
    if (kt + 1 < ktiles) load_regs(kt + 1);  // in flight during the FMAs below
#pragma unroll
    for (int kk = 0; kk < kSmBK; ++kk) {
      float av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = As[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = Bs[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t gm = m0 + ty + 16 * i;
    if (gm >= N) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int go = n0 + tx + 16 * j;
      if (go < H) out[gm * H + go] = tanhf(acc[i][j] + to_float(bp[go]));
    }
  }
}

// ----------------------------------------------------------------------------- mean pooling

constexpr int kMeanThreads = 128;  // columns per block

// out[r][k] = mean of x[r, t, k] over the tokens t with mask[r, t] (every token without a
// mask), float32 [N, H]; 0 for a row without one. A masked token is never read. x has row
// stride ldn and token stride lds (elements, the last dim contiguous), mask any strides.
// Threads are consecutive columns (coalesced); the mask byte is the same for the block.
template <typename T>
__global__ void __launch_bounds__(kMeanThreads)
token_mean_kernel(const T* __restrict__ x, int64_t ldn, int64_t lds, const bool* __restrict__ mask, int64_t mn,
                  int64_t ms, float* __restrict__ out, int64_t n, int64_t s, int h) {
  const int col = blockIdx.y * kMeanThreads + threadIdx.x;
  for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
    const T* xr = x + row * ldn;
    float acc = 0.f;
    int64_t cnt = 0;
    for (int64_t t = 0; t < s; ++t) {
      if (mask != nullptr && !mask[row * mn + t * ms]) continue;  // block-uniform branch
      ++cnt;
      if (col < h) acc += to_float(xr[t * lds + col]);
    }
    if (col < h) out[row * static_cast<int64_t>(h) + col] = cnt > 0 ? acc / static_cast<float>(cnt) : 0.f;
  }
}

template <typename T>
void launch_token_mean(const T* x, int64_t ldn, int64_t lds, const bool* mask, int64_t mn, int64_t ms, float* out,
                       int64_t n, int64_t s, int h, cudaStream_t stream) {
  if (n == 0 || h == 0) return;
  const unsigned int rows = static_cast<unsigned int>(n < (int64_t(1) << 20) ? n : (int64_t(1) << 20));
  const unsigned int col_blocks = static_cast<unsigned int>((h + kMeanThreads - 1) / kMeanThreads);
  TORCH_CHECK(col_blocks <= 65535u, "exit_head (CUDA): H too large for the mean-pooling kernel, got H=", h);
  token_mean_kernel<T><<<dim3(rows, col_blocks), kMeanThreads, 0, stream>>>(x, ldn, lds, mask, mn, ms, out, n, s, h);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ----------------------------------------------------------------------------- host

// Whether pooler_wmma_kernel<T> can run on the current device: its code must have been
// compiled for a virtual architecture >= 8.0 (a build carrying only older PTX, JIT-compiled
// for this device, would hold the trapping stub), and it opts in to > 48 KB of dynamic
// shared memory. Host-side function attributes only (no stream work, so capture-safe);
// the answer is cached per device.
template <typename T>
bool wmma_pooler_ready(const cudaDeviceProp* prop) {
  if (prop->major < 8 || prop->sharedMemPerBlockOptin < kTcSmemBytes) return false;
  static std::atomic<uint64_t> checked{0}, usable{0};
  const int dev = static_cast<int>(c10::cuda::current_device());
  const uint64_t bit = (dev >= 0 && dev < 64) ? (uint64_t(1) << dev) : 0;
  if (bit != 0 && (checked.load(std::memory_order_acquire) & bit)) {
    return (usable.load(std::memory_order_acquire) & bit) != 0;
  }
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, pooler_wmma_kernel<T>));
  const bool ok = attr.ptxVersion >= 80;
  if (ok) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(pooler_wmma_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(kTcSmemBytes)));
  }
  if (bit != 0) {
    if (ok) usable.fetch_or(bit, std::memory_order_acq_rel);
    checked.fetch_or(bit, std::memory_order_acq_rel);
  }
  return ok;
}

template <typename TA, typename T>
void launch_pooler(const TA* x, int64_t ldx, const T* wp, const T* bp, float* out, int64_t n, int h,
                   cudaStream_t stream) {
  if (h == 0) return;  // nothing to pool (an empty [N, 0] feature)
  // Tensor cores for half inputs and weights; float32 rows (the mean) take the FP32 FMA tiles.
  if constexpr (std::is_same<TA, T>::value && !std::is_same<T, float>::value) {
    const bool use_tc = h % 8 == 0 && aligned16(x) && aligned16(wp) &&
                        (n <= 1 || (ldx * static_cast<int64_t>(sizeof(T))) % 16 == 0) &&
                        wmma_pooler_ready<T>(at::cuda::getCurrentDeviceProperties());
    if (use_tc) {
      const int64_t row_tiles = (n + kTcBM - 1) / kTcBM;
      TORCH_CHECK(row_tiles <= INT32_MAX, "exit_head: too many rows for the pooler kernel");
      const dim3 grid(static_cast<unsigned int>(row_tiles), static_cast<unsigned int>((h + kTcBN - 1) / kTcBN));
      pooler_wmma_kernel<T><<<grid, kTcThreads, kTcSmemBytes, stream>>>(x, ldx, wp, bp, out, n, h);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  const int64_t row_tiles = (n + kSmBM - 1) / kSmBM;
  TORCH_CHECK(row_tiles <= INT32_MAX, "exit_head: too many rows for the pooler kernel");
  const dim3 grid(static_cast<unsigned int>(row_tiles), static_cast<unsigned int>((h + kSmBN - 1) / kSmBN));
  pooler_simt_kernel<TA, T><<<grid, kSmThreads, 0, stream>>>(x, ldx, wp, bp, out, n, h);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void run_exit_head(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& bias,
                   const std::optional<at::Tensor>& pooler_weight,
                   const std::optional<at::Tensor>& pooler_bias,
                   const std::optional<at::Tensor>& policy_weight,
                   const std::optional<at::Tensor>& policy_bias,
                   const std::optional<at::Tensor>& policy_out_weight,
                   const std::optional<at::Tensor>& policy_out_bias,
                   const std::optional<at::Tensor>& token_mask, int64_t pooling, int64_t ldx,
                   const RowArgs& a, cudaStream_t stream) {
  using T = typename DevType<scalar_t>::type;
  static_assert(sizeof(T) == sizeof(scalar_t), "storage types must match");
  const T* x = reinterpret_cast<const T*>(hidden.const_data_ptr<scalar_t>());
  const T* w = reinterpret_cast<const T*>(weight.const_data_ptr<scalar_t>());
  const T* b = reinterpret_cast<const T*>(bias.const_data_ptr<scalar_t>());
  auto ptr = [](const std::optional<at::Tensor>& t) -> const T* {
    return t.has_value() ? reinterpret_cast<const T*>(t->const_data_ptr<scalar_t>()) : nullptr;
  };
  const PolicyArgs<T> q{ptr(policy_weight), ptr(policy_bias), ptr(policy_out_weight), ptr(policy_out_bias)};
  if (pooling == kPoolMean) {
    // The float32 mean [N, H] is the head's input (one scratch buffer, never rounded).
    at::Tensor mean = at::empty({a.n, static_cast<int64_t>(a.h)}, hidden.options().dtype(at::kFloat));
    float* pm = mean.data_ptr<float>();
    const bool* mask = token_mask.has_value() ? token_mask->const_data_ptr<bool>() : nullptr;
    launch_token_mean<T>(x, hidden.stride(0), hidden.stride(1), mask, mask ? token_mask->stride(0) : 0,
                         mask ? token_mask->stride(1) : 0, pm, a.n, hidden.size(1), a.h, stream);
    if (pooler_weight.has_value()) {
      at::Tensor pooled = at::empty({a.n, static_cast<int64_t>(a.h)}, hidden.options().dtype(at::kFloat));
      float* pp = pooled.data_ptr<float>();
      launch_pooler<float, T>(pm, a.h, reinterpret_cast<const T*>(pooler_weight->const_data_ptr<scalar_t>()),
                              reinterpret_cast<const T*>(pooler_bias->const_data_ptr<scalar_t>()), pp, a.n, a.h,
                              stream);
      launch_rows<float, T>(pp, a.h, w, b, q, a, stream);
    } else {
      launch_rows<float, T>(pm, a.h, w, b, q, a, stream);
    }
  } else if (pooler_weight.has_value()) {
    // Pooled features stay float32 (one scratch buffer); the classifier reads them as input.
    at::Tensor pooled = at::empty({a.n, static_cast<int64_t>(a.h)}, hidden.options().dtype(at::kFloat));
    float* pp = pooled.data_ptr<float>();
    launch_pooler<T, T>(x, ldx, reinterpret_cast<const T*>(pooler_weight->const_data_ptr<scalar_t>()),
                     reinterpret_cast<const T*>(pooler_bias->const_data_ptr<scalar_t>()), pp, a.n, a.h,
                     stream);
    launch_rows<float, T>(pp, a.h, w, b, q, a, stream);
  } else {
    launch_rows<T, T>(x, ldx, w, b, q, a, stream);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> exit_head_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& pooler_weight, const std::optional<at::Tensor>& pooler_bias,
    const std::optional<at::Tensor>& memory, double memory_lambda, bool tanh_logits,
    int64_t criterion, double threshold, const std::optional<at::Tensor>& prev_pred,
    const std::optional<at::Tensor>& counter, const std::optional<at::Tensor>& policy_weight,
    const std::optional<at::Tensor>& policy_bias, const std::optional<at::Tensor>& policy_out_weight,
    const std::optional<at::Tensor>& policy_out_bias, const std::optional<at::Tensor>& token_mask,
    int64_t pooling) {
  TORCH_CHECK(hidden.is_cuda(), "exit_head (CUDA): hidden must be a CUDA tensor, got ", hidden.device());
  check_exit_head_args(hidden, weight, bias, pooler_weight, pooler_bias, memory, memory_lambda,
                       criterion, threshold, prev_pred, counter, policy_weight, policy_bias,
                       policy_out_weight, policy_out_bias, token_mask, pooling);
  const int64_t n = hidden.size(0), h = hidden.size(-1), c = weight.size(0);
  const int64_t np = criterion == kPolicy ? policy_weight->size(0) : 0;
  TORCH_CHECK(h <= INT32_MAX / 8 && c + np <= INT32_MAX / 8,
              "exit_head (CUDA): H and C + P must fit in int32, got H=", h, ", C=", c, ", P=", np);
  TORCH_CHECK(hidden.stride(0) >= 0, "exit_head (CUDA): hidden's row stride must be >= 0");

  const at::cuda::OptionalCUDAGuard guard(hidden.device());
  const auto opts = hidden.options();
  at::Tensor logits = at::empty({n, c}, opts.dtype(at::kFloat));
  at::Tensor score = at::empty({n}, opts.dtype(at::kFloat));
  at::Tensor exit_mask = at::empty({n}, opts.dtype(at::kBool));
  at::Tensor pred = at::empty({n}, opts.dtype(at::kLong));
  at::Tensor counter_out = at::empty({criterion == kPatience ? n : 0}, opts.dtype(at::kInt));
  if (n == 0) return {logits, score, exit_mask, pred, counter_out};

  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  RowArgs a;
  a.memory = memory.has_value() ? memory->const_data_ptr<float>() : nullptr;
  // prev_pred / counter only matter for patience (decide() ignores them otherwise).
  a.prev_pred = (criterion == kPatience && prev_pred.has_value()) ? prev_pred->const_data_ptr<int64_t>() : nullptr;
  a.prev_cnt = (criterion == kPatience && counter.has_value()) ? counter->const_data_ptr<int32_t>() : nullptr;
  a.logits = logits.data_ptr<float>();
  a.score = score.data_ptr<float>();
  a.exit_mask = exit_mask.data_ptr<bool>();
  a.pred = pred.data_ptr<int64_t>();
  a.counter = criterion == kPatience ? counter_out.data_ptr<int32_t>() : nullptr;
  a.n = n;
  a.c = static_cast<int>(c);
  a.h = static_cast<int>(h);
  a.p = static_cast<int>(np);
  a.lam = static_cast<float>(memory_lambda);
  a.tanh_logits = tanh_logits;
  a.criterion = criterion;
  a.threshold = threshold;

  const int64_t ldx = hidden.stride(0);
  switch (hidden.scalar_type()) {
    case at::kFloat:
      run_exit_head<float>(hidden, weight, bias, pooler_weight, pooler_bias, policy_weight, policy_bias,
                                policy_out_weight, policy_out_bias, token_mask, pooling, ldx, a, stream);
      break;
    case at::kHalf:
      run_exit_head<at::Half>(hidden, weight, bias, pooler_weight, pooler_bias, policy_weight, policy_bias,
                                policy_out_weight, policy_out_bias, token_mask, pooling, ldx, a, stream);
      break;
    case at::kBFloat16:
      run_exit_head<at::BFloat16>(hidden, weight, bias, pooler_weight, pooler_bias, policy_weight, policy_bias,
                                policy_out_weight, policy_out_bias, token_mask, pooling, ldx, a, stream);
      break;
    default:
      TORCH_CHECK(false, "exit_head (CUDA): unsupported dtype ", hidden.scalar_type());
  }
  return {logits, score, exit_mask, pred, counter_out};
}

}  // namespace
}  // namespace eekernels

TORCH_LIBRARY_IMPL(eekernels, CUDA, m) { m.impl("exit_head", &eekernels::exit_head_cuda); }
