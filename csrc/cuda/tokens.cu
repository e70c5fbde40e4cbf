// Token gather/scatter for token-level early exit, CUDA (spec: eekernels/ops/tokens.py).
//
// pack_tokens(hidden, active) / pack_tokens_padded(hidden, active)
//   1. tokens_scan_kernel, one block of 1024 threads: over chunks of 4096 flags of the flat
//      [B*S] mask (4 consecutive flags per thread), a block-wide exclusive scan (warp
//      shuffles + one warp scanning the warp totals) plus a running carry writes the flat
//      positions of the active tokens (int64, ascending) and cu_seqlens[b] (the prefix at
//      flat position b*S); then each sample's length and the largest length, and
//      [nnz, max_len] to a two-element device buffer.
//   2. Those two numbers are copied into pinned host memory and the stream synchronised
//      (c10::cuda::memcpy_and_sync): the op's one device->host read (output sizes).
//   3. pack_gather_kernel (varlen) or pack_padded_kernel ([B, M] slots; padding slots get
//      zeros and index -1): one warp per output row, grid-stride.
// scatter_tokens(hidden, index, values), in place: scatter_rows_kernel, one warp per index
//   entry; entries < 0 (padding) or >= B*S are skipped (never written out of bounds; the
//   GPU cannot raise without a host read). No host synchronisation.
// mpee_prune(hidden, valid, memory, attention, keep_ratio): ONE fused kernel, one block per
//   sample (mpee.txt eq. 7-8), no host synchronisation (the width comes from S):
//   a. candidates (valid, position >= 1) and their memory keys (a total order: larger
//      memory first, -0.0 == 0.0, NaN last) go to shared memory (global workspace when S
//      is too large for 48 KB); n = #candidates, m = ceil(keep_ratio * n - 1e-6) (double);
//   b. each candidate's rank = #candidates with a higher key, or an equal key and a lower
//      position (O(S^2 / threads), S <= 512 typical); kept iff rank < m, else fused;
//   c. a block prefix sum over the kept flags in position order gives each kept token's
//      slot 1 + #kept before it: its position, memory, valid flag are written;
//   d. rows: one warp per output slot copies [CLS] and the kept rows and zeroes the
//      padding; the fusion row sum_i attention[i] * hidden[i] is accumulated in float32,
//      one thread per column vector.
//
// Row copies use the widest of 16/8/4/2-byte vectors that divides the row size, the
// strides and the base addresses (16-byte uint4 loads/stores for aligned fp16 rows of
// H = 768). hidden may have any B and S strides (its last dim contiguous).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <tuple>

#include "common/tokens_common.h"

namespace eekernels {
namespace {

template <int N> struct TokVec;
template <> struct TokVec<16> { using type = uint4; };
template <> struct TokVec<8> { using type = uint2; };
template <> struct TokVec<4> { using type = uint32_t; };
template <> struct TokVec<2> { using type = uint16_t; };

// Widest vector that divides every address, row size and stride given (>= 2 bytes: every
// float dtype here has 2- or 4-byte elements).
int tokens_vec_bytes(std::initializer_list<int64_t> values) {
  for (int v = 16; v > 2; v >>= 1) {
    bool ok = true;
    for (int64_t x : values) ok = ok && (x % v == 0);
    if (ok) return v;
  }
  return 2;
}

template <int VB>
__device__ __forceinline__ void copy_row(char* dst, const char* src, int64_t nvec, int lane) {
  using V = typename TokVec<VB>::type;
  const V* __restrict__ s = reinterpret_cast<const V*>(src);
  V* __restrict__ d = reinterpret_cast<V*>(dst);
  for (int64_t c = lane; c < nvec; c += 32) d[c] = s[c];
}

template <int VB>
__device__ __forceinline__ void zero_row(char* dst, int64_t nvec, int lane) {
  using V = typename TokVec<VB>::type;
  V* d = reinterpret_cast<V*>(dst);
  const V z{};
  for (int64_t c = lane; c < nvec; c += 32) d[c] = z;
}

// Exclusive block scan of one int per thread (NT threads, NT / 32 <= 32 warps); `total`
// gets the block's sum. Every thread must call it. Uses `warp_buf` [32].
template <int NT>
__device__ __forceinline__ int block_exclusive_scan(int x, int* warp_buf, int& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int incl = x;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  if (lane == 31) warp_buf[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    int w = lane < NT / 32 ? warp_buf[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += y;
    }
    if (lane < NT / 32) warp_buf[lane] = w;
  }
  __syncthreads();
  const int before = warp > 0 ? warp_buf[warp - 1] : 0;
  total = warp_buf[NT / 32 - 1];
  __syncthreads();  // warp_buf is reused by the next call
  return before + incl - x;
}

// Block reduction (sum or max) of one value per thread; the result is returned to every
// thread. Uses `buf` [32].
template <int NT, bool MAX, typename T>
__device__ __forceinline__ T block_reduce(T x, T* buf) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const T y = __shfl_xor_sync(0xffffffffu, x, o);
    x = MAX ? (y > x ? y : x) : x + y;
  }
  if (lane == 0) buf[warp] = x;
  __syncthreads();
  T r = buf[0];
  for (int w = 1; w < NT / 32; ++w) r = MAX ? (buf[w] > r ? buf[w] : r) : r + buf[w];
  __syncthreads();
  return r;
}

// ----------------------------------------------------------------------------- pack

constexpr int kScanThreads = 1024;
constexpr int kScanItems = 4;

__global__ void __launch_bounds__(kScanThreads)
tokens_scan_kernel(const uint8_t* __restrict__ active, int64_t total, int64_t s, int64_t b,
                   int64_t* __restrict__ index, int32_t* __restrict__ cu, int64_t* __restrict__ lengths,
                   int64_t* __restrict__ stats) {
  __shared__ int warp_buf[32];
  const int tid = threadIdx.x;
  int64_t carry = 0;  // active tokens before this chunk (same value in every thread)
  for (int64_t base = 0; base < total; base += int64_t{kScanThreads} * kScanItems) {
    const int64_t first = base + int64_t{tid} * kScanItems;
    bool f[kScanItems];
    int cnt = 0;
#pragma unroll
    for (int j = 0; j < kScanItems; ++j) {
      f[j] = first + j < total && active[first + j] != 0;
      cnt += f[j] ? 1 : 0;
    }
    int chunk_total;
    int64_t pos = carry + block_exclusive_scan<kScanThreads>(cnt, warp_buf, chunk_total);
#pragma unroll
    for (int j = 0; j < kScanItems; ++j) {
      const int64_t p = first + j;
      if (p < total && p % s == 0) cu[p / s] = static_cast<int32_t>(pos);  // sample p / s starts here
      if (f[j]) index[pos++] = p;
    }
    carry += chunk_total;
  }
  if (tid == 0) cu[b] = static_cast<int32_t>(carry);
  __syncthreads();  // cu is read back below by other threads
  int64_t longest = 0;
  for (int64_t r = tid; r < b; r += kScanThreads) {
    const int64_t n = int64_t{cu[r + 1]} - cu[r];
    lengths[r] = n;
    longest = n > longest ? n : longest;
  }
  __shared__ int64_t max_buf[32];
  longest = block_reduce<kScanThreads, true, int64_t>(longest, max_buf);
  if (tid == 0) {
    stats[0] = carry;
    stats[1] = longest;
  }
}

constexpr int kRowThreads = 256;  // 8 warps, one row each
constexpr int kRowWarps = kRowThreads / 32;

struct RowLayout {  // [B, S, H] rows in bytes
  const char* base;
  int64_t s, sb, ss, nvec;
};

template <int VB>
__global__ void __launch_bounds__(kRowThreads)
pack_gather_kernel(RowLayout in, const int64_t* __restrict__ index, char* __restrict__ out, int64_t rows) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t{gridDim.x} * kRowWarps;
  for (int64_t k = int64_t{blockIdx.x} * kRowWarps + (threadIdx.x >> 5); k < rows; k += warps) {
    const int64_t p = index[k], bb = p / in.s;
    copy_row<VB>(out + k * in.nvec * VB, in.base + bb * in.sb + (p - bb * in.s) * in.ss, in.nvec, lane);
  }
}

template <int VB>
__global__ void __launch_bounds__(kRowThreads)
pack_padded_kernel(RowLayout in, const int64_t* __restrict__ flat, const int32_t* __restrict__ cu,
                   char* __restrict__ out, int64_t* __restrict__ out_index, int64_t b, int64_t m) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t{gridDim.x} * kRowWarps;
  for (int64_t r = int64_t{blockIdx.x} * kRowWarps + (threadIdx.x >> 5); r < b * m; r += warps) {
    const int64_t bb = r / m, k = r - bb * m;
    const int64_t lo = cu[bb], len = int64_t{cu[bb + 1]} - lo;
    char* dst = out + r * in.nvec * VB;
    if (k < len) {
      const int64_t p = flat[lo + k];
      copy_row<VB>(dst, in.base + bb * in.sb + (p - bb * in.s) * in.ss, in.nvec, lane);
      if (lane == 0) out_index[r] = p;
    } else {
      zero_row<VB>(dst, in.nvec, lane);
      if (lane == 0) out_index[r] = -1;
    }
  }
}

unsigned row_blocks(int64_t rows) {
  return static_cast<unsigned>(std::min<int64_t>((rows + kRowWarps - 1) / kRowWarps, 65536));
}

RowLayout row_layout(const at::Tensor& hidden, int vb) {
  const int64_t e = static_cast<int64_t>(hidden.element_size());
  return {static_cast<const char*>(hidden.const_data_ptr()), hidden.size(1), hidden.stride(0) * e,
          hidden.stride(1) * e, hidden.size(2) * e / vb};
}

int hidden_vec_bytes(const at::Tensor& hidden, const void* out) {
  const int64_t e = static_cast<int64_t>(hidden.element_size());
  return tokens_vec_bytes({static_cast<int64_t>(reinterpret_cast<uintptr_t>(hidden.const_data_ptr())),
                           static_cast<int64_t>(reinterpret_cast<uintptr_t>(out)), hidden.size(2) * e,
                           hidden.stride(0) * e, hidden.stride(1) * e});
}

#define EEK_VEC_SWITCH(vb, ...)                         \
  switch (vb) {                                         \
    case 16: { constexpr int VB = 16; __VA_ARGS__ } break; \
    case 8: { constexpr int VB = 8; __VA_ARGS__ } break;   \
    case 4: { constexpr int VB = 4; __VA_ARGS__ } break;   \
    default: { constexpr int VB = 2; __VA_ARGS__ } break;  \
  }

// The scan (step 1) and the host read (step 2); returns {nnz, max_len}.
std::pair<int64_t, int64_t> scan_active(const at::Tensor& active, int64_t b, int64_t s, at::Tensor& index,
                                        at::Tensor& cu, at::Tensor& lengths, cudaStream_t stream) {
  const int64_t total = b * s;
  TORCH_CHECK(total <= INT32_MAX, "pack_tokens: B*S=", total, " active flags do not fit int32 cu_seqlens");
  if (total == 0) {
    cu.zero_();
    lengths.zero_();
    return {0, 0};
  }
  at::Tensor stats = at::empty({2}, active.options().dtype(at::kLong));
  tokens_scan_kernel<<<1, kScanThreads, 0, stream>>>(
      reinterpret_cast<const uint8_t*>(active.const_data_ptr<bool>()), total, s, b, index.data_ptr<int64_t>(),
      cu.data_ptr<int32_t>(), lengths.data_ptr<int64_t>(), stats.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // The one device->host read: the output sizes depend on it. Pinned destination.
  at::Tensor host = at::empty({2}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  c10::cuda::memcpy_and_sync(host.data_ptr<int64_t>(), stats.const_data_ptr<int64_t>(), 2 * sizeof(int64_t),
                             cudaMemcpyDeviceToHost, stream);
  const int64_t nnz = host.const_data_ptr<int64_t>()[0], longest = host.const_data_ptr<int64_t>()[1];
  TORCH_CHECK(nnz >= 0 && nnz <= total && longest >= 0 && longest <= s,
              "pack_tokens: internal error, counts out of range");
  return {nnz, longest};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, c10::SymInt> pack_tokens_cuda(const at::Tensor& hidden,
                                                                           const at::Tensor& active) {
  check_pack_tokens_args("pack_tokens", hidden, active);
  TORCH_CHECK(hidden.is_cuda(), "pack_tokens: hidden must be a CUDA tensor here");
  const c10::cuda::CUDAGuard guard(hidden.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t b = hidden.size(0), s = hidden.size(1), h = hidden.size(2);
  at::Tensor index = at::empty({b * s}, active.options().dtype(at::kLong));
  at::Tensor cu = at::empty({b + 1}, active.options().dtype(at::kInt));
  at::Tensor lengths = at::empty({b}, active.options().dtype(at::kLong));
  const auto [nnz, longest] = scan_active(active, b, s, index, cu, lengths, stream);
  at::Tensor values = at::empty({nnz, h}, hidden.options());
  if (nnz > 0 && h > 0) {
    const int vb = hidden_vec_bytes(hidden, values.data_ptr());
    const RowLayout in = row_layout(hidden, vb);
    EEK_VEC_SWITCH(vb, {
      pack_gather_kernel<VB><<<row_blocks(nnz), kRowThreads, 0, stream>>>(
          in, index.const_data_ptr<int64_t>(), static_cast<char*>(values.data_ptr()), nnz);
    })
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {values, index.narrow(0, 0, nnz), cu, c10::SymInt(longest)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pack_tokens_padded_cuda(const at::Tensor& hidden,
                                                                       const at::Tensor& active) {
  check_pack_tokens_args("pack_tokens_padded", hidden, active);
  TORCH_CHECK(hidden.is_cuda(), "pack_tokens_padded: hidden must be a CUDA tensor here");
  const c10::cuda::CUDAGuard guard(hidden.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t b = hidden.size(0), s = hidden.size(1), h = hidden.size(2);
  at::Tensor flat = at::empty({b * s}, active.options().dtype(at::kLong));
  at::Tensor cu = at::empty({b + 1}, active.options().dtype(at::kInt));
  at::Tensor lengths = at::empty({b}, active.options().dtype(at::kLong));
  const int64_t m = scan_active(active, b, s, flat, cu, lengths, stream).second;
  at::Tensor values = at::empty({b, m, h}, hidden.options());
  at::Tensor index = at::empty({b, m}, active.options().dtype(at::kLong));
  if (b * m > 0) {
    const int vb = hidden_vec_bytes(hidden, values.data_ptr());
    const RowLayout in = row_layout(hidden, vb);
    EEK_VEC_SWITCH(vb, {
      pack_padded_kernel<VB><<<row_blocks(b * m), kRowThreads, 0, stream>>>(
          in, flat.const_data_ptr<int64_t>(), cu.const_data_ptr<int32_t>(), static_cast<char*>(values.data_ptr()),
          index.data_ptr<int64_t>(), b, m);
    })
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {values, index, lengths};
}

// ----------------------------------------------------------------------------- scatter

template <int VB>
__global__ void __launch_bounds__(kRowThreads)
scatter_rows_kernel(char* __restrict__ hidden, const int64_t* __restrict__ index, const char* __restrict__ values,
                    int64_t rows, int64_t total, int64_t nvec) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t{gridDim.x} * kRowWarps;
  for (int64_t j = int64_t{blockIdx.x} * kRowWarps + (threadIdx.x >> 5); j < rows; j += warps) {
    const int64_t p = index[j];
    if (p < 0 || p >= total) continue;  // padding (-1) or out of range: never written
    copy_row<VB>(hidden + p * nvec * VB, values + j * nvec * VB, nvec, lane);
  }
}

void scatter_tokens_cuda(const at::Tensor& hidden, const at::Tensor& index, const at::Tensor& values) {
  check_scatter_tokens_args(hidden, index, values);
  TORCH_CHECK(hidden.is_cuda(), "scatter_tokens: hidden must be a CUDA tensor here");
  const int64_t rows = index.numel(), h = hidden.size(2);
  if (rows == 0 || h == 0) return;
  const c10::cuda::CUDAGuard guard(hidden.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t row_bytes = h * static_cast<int64_t>(hidden.element_size());
  const int vb = tokens_vec_bytes({static_cast<int64_t>(reinterpret_cast<uintptr_t>(hidden.data_ptr())),
                                   static_cast<int64_t>(reinterpret_cast<uintptr_t>(values.const_data_ptr())),
                                   row_bytes});
  EEK_VEC_SWITCH(vb, {
    scatter_rows_kernel<VB><<<row_blocks(rows), kRowThreads, 0, stream>>>(
        static_cast<char*>(hidden.data_ptr()), index.const_data_ptr<int64_t>(),
        static_cast<const char*>(values.const_data_ptr()), rows, hidden.size(0) * hidden.size(1), row_bytes / VB);
  })
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ----------------------------------------------------------------------------- mpee_prune

constexpr int kPruneThreads = 256;
constexpr int64_t kPruneSmemLimit = 47 * 1024;  // 48 KB default limit, less the static buffers

// Per-token scratch of one sample: key int32 [S], cand uint8 [S], state uint8 [S]
// (1 kept, 2 fused); in shared memory, or in a global workspace for very long sequences.
constexpr int64_t kPruneBytesPerToken = 6;

// Bytes of scratch per sample, a multiple of 16 (keeps the int32 keys aligned).
__host__ __device__ __forceinline__ int64_t prune_scratch_stride(int64_t s) {
  return (s * kPruneBytesPerToken + 15) / 16 * 16;
}

template <typename scalar_t, int VB, bool SMEM>
__global__ void __launch_bounds__(kPruneThreads)
mpee_prune_kernel(RowLayout in, const bool* __restrict__ valid, const float* __restrict__ mem,
                  const float* __restrict__ att, double keep_ratio, int64_t width, uint8_t* __restrict__ workspace,
                  char* __restrict__ out_h, bool* __restrict__ out_valid, float* __restrict__ out_mem,
                  int64_t* __restrict__ out_src) {
  extern __shared__ __align__(16) unsigned char tok_smem[];
  __shared__ int warp_buf[32];
  __shared__ float fbuf[32];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t b = blockIdx.x, s = in.s, nvec = in.nvec;
  unsigned char* scratch = SMEM ? tok_smem : workspace + b * prune_scratch_stride(s);
  int32_t* key = reinterpret_cast<int32_t*>(scratch);
  uint8_t* cand = scratch + 4 * s;
  uint8_t* state = cand + s;
  const bool* v = valid + b * s;
  const float* mm = mem + b * s;
  const float* aa = att + b * s;
  const char* hrow = in.base + b * in.sb;
  const int64_t row_bytes = nvec * VB;
  char* orow = out_h + b * width * row_bytes;
  bool* ov = out_valid + b * width;
  float* om = out_mem + b * width;
  int64_t* os = out_src + b * width;

  // a. candidates, keys, n and m (eq. 7).
  int local = 0;
  for (int64_t t = tid; t < s; t += kPruneThreads) {
    const bool c = t >= 1 && v[t];
    cand[t] = c;
    key[t] = mpee_memory_key(mm[t]);
    local += c ? 1 : 0;
  }
  const int n = block_reduce<kPruneThreads, false, int>(local, warp_buf);  // also a barrier
  const int64_t keep = mpee_keep_count(n, keep_ratio);
  const int64_t m = keep < n ? keep : n;

  // b. rank = candidates ahead of t; kept iff rank < m.
  float fused_mem = 0.0f;
  for (int64_t t = tid; t < s; t += kPruneThreads) {
    uint8_t st = 0;
    if (cand[t]) {
      const int32_t k = key[t];
      int64_t rank = 0;
      for (int64_t j = 1; j < s && rank < m; ++j)
        rank += (cand[j] && (key[j] > k || (key[j] == k && j < t))) ? 1 : 0;
      st = rank < m ? 1 : 2;
      if (st == 2) fused_mem += mm[t];
    }
    state[t] = st;
  }
  fused_mem = block_reduce<kPruneThreads, false, float>(fused_mem, fbuf);  // sum; also a barrier

  // c. slots of the kept tokens: block prefix sum over the kept flags, position order.
  int carry = 0;
  for (int64_t base = 0; base < s; base += kPruneThreads) {
    const int64_t t = base + tid;
    const int kept = (t < s && state[t] == 1) ? 1 : 0;
    int chunk_total;
    const int before = block_exclusive_scan<kPruneThreads>(kept, warp_buf, chunk_total);
    if (kept) {
      const int64_t slot = 1 + carry + before;
      os[slot] = t;
      om[slot] = mm[t];
      ov[slot] = true;
    }
    carry += chunk_total;
  }
  const int64_t fslot = 1 + m;
  const bool has_fusion = n > m;
  if (tid == 0) {
    os[0] = 0;
    om[0] = mm[0];
    ov[0] = true;
    os[fslot] = -1;
    om[fslot] = has_fusion ? fused_mem : 0.0f;
    ov[fslot] = has_fusion;
  }
  for (int64_t slot = fslot + 1 + tid; slot < width; slot += kPruneThreads) {
    os[slot] = -1;
    om[slot] = 0.0f;
    ov[slot] = false;
  }
  __syncthreads();  // os[] of the kept slots is read back below by other warps

  // d. rows: [CLS] and kept rows copied, padding zeroed (one warp per slot) ...
  for (int64_t slot = warp; slot < width; slot += kPruneThreads / 32) {
    if (slot == fslot) continue;
    char* dst = orow + slot * row_bytes;
    if (slot <= m)
      copy_row<VB>(dst, hrow + os[slot] * in.ss, nvec, lane);
    else
      zero_row<VB>(dst, nvec, lane);
  }
  // ... and the fusion token (eq. 8): sum of attention[i] * hidden[i], float32.
  using V = typename TokVec<VB>::type;
  constexpr int kElems = VB / static_cast<int>(sizeof(scalar_t));
  for (int64_t c = tid; c < nvec; c += kPruneThreads) {
    float acc[kElems];
#pragma unroll
    for (int e = 0; e < kElems; ++e) acc[e] = 0.0f;
    if (has_fusion) {
      for (int64_t t = 1; t < s; ++t) {
        if (state[t] != 2) continue;
        const float w = aa[t];
        alignas(16) scalar_t x[kElems];
        *reinterpret_cast<V*>(x) = reinterpret_cast<const V*>(hrow + t * in.ss)[c];
#pragma unroll
        for (int e = 0; e < kElems; ++e) acc[e] += w * static_cast<float>(x[e]);
      }
    }
    alignas(16) scalar_t o[kElems];
#pragma unroll
    for (int e = 0; e < kElems; ++e) o[e] = static_cast<scalar_t>(acc[e]);
    reinterpret_cast<V*>(orow + fslot * row_bytes)[c] = *reinterpret_cast<const V*>(o);
  }
}

struct PruneArgs {
  RowLayout in;
  const bool* valid;
  const float* memory;
  const float* attention;
  double keep_ratio;
  int64_t width;
  uint8_t* workspace;
  char* out_h;
  bool* out_valid;
  float* out_mem;
  int64_t* out_src;
  int64_t batch;
  bool smem;
  size_t smem_bytes;
  cudaStream_t stream;
};

// One launch of the fused kernel for a dtype and vector width (a function template, so that
// the impossible combinations, vectors narrower than an element, are never instantiated).
template <typename scalar_t, int VB>
void launch_prune(const PruneArgs& a) {
  if constexpr (static_cast<size_t>(VB) < sizeof(scalar_t)) {
    TORCH_CHECK(false, "mpee_prune: internal error, vector narrower than an element");
  } else {
    auto kernel = a.smem ? mpee_prune_kernel<scalar_t, VB, true> : mpee_prune_kernel<scalar_t, VB, false>;
    kernel<<<static_cast<unsigned>(a.batch), kPruneThreads, a.smem_bytes, a.stream>>>(
        a.in, a.valid, a.memory, a.attention, a.keep_ratio, a.width, a.workspace, a.out_h, a.out_valid, a.out_mem,
        a.out_src);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mpee_prune_cuda(const at::Tensor& hidden,
                                                                           const at::Tensor& valid,
                                                                           const at::Tensor& memory,
                                                                           const at::Tensor& attention,
                                                                           double keep_ratio) {
  check_mpee_prune_args(hidden, valid, memory, attention, keep_ratio);
  TORCH_CHECK(hidden.is_cuda(), "mpee_prune: hidden must be a CUDA tensor here");
  const c10::cuda::CUDAGuard guard(hidden.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t b = hidden.size(0), s = hidden.size(1), h = hidden.size(2);
  const int64_t width = mpee_width(s, keep_ratio);
  at::Tensor out_h = at::empty({b, width, h}, hidden.options());
  at::Tensor out_valid = at::empty({b, width}, valid.options());
  at::Tensor out_mem = at::empty({b, width}, memory.options());
  at::Tensor out_src = at::empty({b, width}, memory.options().dtype(at::kLong));
  if (b == 0) return {out_h, out_valid, out_mem, out_src};
  TORCH_CHECK(s <= INT32_MAX, "mpee_prune: S=", s, " is too long");
  const int64_t scratch = prune_scratch_stride(s);
  const bool smem = scratch <= kPruneSmemLimit;
  at::Tensor workspace;
  if (!smem) workspace = at::empty({b, scratch}, valid.options().dtype(at::kByte));
  uint8_t* ws = smem ? nullptr : workspace.data_ptr<uint8_t>();
  const int vb = hidden_vec_bytes(hidden, out_h.data_ptr());
  const RowLayout in = row_layout(hidden, vb);
  const size_t smem_bytes = smem ? static_cast<size_t>(scratch) : 0;
  const PruneArgs a{in, valid.const_data_ptr<bool>(), memory.const_data_ptr<float>(),
                    attention.const_data_ptr<float>(), keep_ratio, width, ws,
                    static_cast<char*>(out_h.data_ptr()), out_valid.data_ptr<bool>(), out_mem.data_ptr<float>(),
                    out_src.data_ptr<int64_t>(), b, smem, smem_bytes, stream};
  AT_DISPATCH_SWITCH(hidden.scalar_type(), "mpee_prune_cuda",
                     AT_DISPATCH_CASE(at::kFloat, [&] { EEK_VEC_SWITCH(vb, { launch_prune<scalar_t, VB>(a); }) })
                     AT_DISPATCH_CASE(at::kHalf, [&] { EEK_VEC_SWITCH(vb, { launch_prune<scalar_t, VB>(a); }) })
                     AT_DISPATCH_CASE(at::kBFloat16, [&] { EEK_VEC_SWITCH(vb, { launch_prune<scalar_t, VB>(a); }) }));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out_h, out_valid, out_mem, out_src};
}

}  // namespace
}  // namespace eekernels

TORCH_LIBRARY_IMPL(eekernels, CUDA, m) {
  m.impl("pack_tokens", &eekernels::pack_tokens_cuda);
  m.impl("pack_tokens_padded", &eekernels::pack_tokens_padded_cuda);
  m.impl("scatter_tokens", &eekernels::scatter_tokens_cuda);
  m.impl("mpee_prune", &eekernels::mpee_prune_cuda);
}
