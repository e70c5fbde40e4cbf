// Ragged batch compaction, CUDA (spec: eekernels/ops/compaction.py).
//
// compact_rows(keep, tensors) -> (index, compacted)
//   1. compact_scan_kernel, one block of 1024 threads: over chunks of 4096 flags (4
//      consecutive flags per thread), a block-wide exclusive scan of the per-thread counts
//      (warp shuffles + one warp scanning the 32 warp totals) plus a running carry writes
//      the kept positions to index (int64, ascending) and the survivor count M to device
//      memory. N is a batch of rows (thousands): a single block loops N / 4096 times.
//   2. The count is copied into pinned host memory and the stream synchronised
//      (c10::cuda::memcpy_and_sync): the op's one device->host read, needed to allocate the
//      [M, ...] outputs. Hence not capturable in a CUDA graph.
//   3. compact_gather_kernel: one launch copies the kept rows of up to kMaxSlots tensors
//      (more tensors: one launch per group). Rows are raw bytes, so any dtype works; each
//      tensor is copied in vectors of the widest of 16/8/4/2/1 bytes that divides its
//      source/destination addresses, row size and row stride (16-byte uint4 loads/stores
//      for aligned rows). Blocks are laid out tensor after tensor; per tensor either
//        - long rows (>= kChunkVecs/2 vectors): one block per (row, chunk of kChunkVecs
//          vectors), no per-element division; or
//        - short rows: one block per group of rows_per_block = kChunkVecs / row_vecs whole
//          rows (the output rows are contiguous, so the block writes one contiguous span).
//      Each thread issues its kUnroll loads before its stores.
//   The source row stride is arbitrary (any stride of dim 0); rows must be contiguous
//   (the Python wrapper copies tensors whose rows are not).
//
// scatter_exits(out_logits, out_layer, batch_index, exit, logits, layer), in place:
//   scatter_exits_kernel, one warp per active row (grid-stride): rows with exit False are
//   skipped; otherwise the row's logits go to out_logits[batch_index[i]] (float4 copies
//   when aligned) and lane 0 writes layer to out_layer[batch_index[i]]. batch_index values
//   are not validated on the device (that would need a host read): rows whose position is
//   out of [0, B) are skipped, never written out of bounds. No host synchronisation.
//
// The argument checks are shared with the CPU kernels (defined in csrc/cpu/compaction.cpp).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

namespace eekernels {

// Defined in csrc/cpu/compaction.cpp.
int64_t compaction_row_bytes(const at::Tensor& t);
void check_compact_rows_args(const at::Tensor& keep, at::TensorList tensors);
void check_scatter_exits_args(const at::Tensor& out_logits, const at::Tensor& out_layer,
                              const at::Tensor& batch_index, const at::Tensor& exit,
                              const at::Tensor& logits, int64_t layer);

namespace {

// ----------------------------------------------------------------------------- scan

constexpr int kScanThreads = 1024;
constexpr int kScanWarps = kScanThreads / 32;  // 32: one warp scans the warp totals
constexpr int kScanItems = 4;                  // consecutive flags per thread per chunk
static_assert(kScanWarps == 32, "the second-level scan assumes 32 warps");

__global__ void __launch_bounds__(kScanThreads)
compact_scan_kernel(const uint8_t* __restrict__ keep, int64_t n, int64_t* __restrict__ index,
                    int64_t* __restrict__ count) {
  __shared__ int warp_incl[kScanWarps];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  int64_t carry = 0;  // kept rows before this chunk (same value in every thread)
  for (int64_t base = 0; base < n; base += int64_t{kScanThreads} * kScanItems) {
    const int64_t first = base + int64_t{tid} * kScanItems;
    bool f[kScanItems];
    int cnt = 0;
#pragma unroll
    for (int j = 0; j < kScanItems; ++j) {
      f[j] = first + j < n && keep[first + j] != 0;
      cnt += f[j] ? 1 : 0;
    }
    int x = cnt;  // inclusive scan within the warp
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, x, o);
      if (lane >= o) x += y;
    }
    if (lane == 31) warp_incl[warp] = x;
    __syncthreads();
    if (warp == 0) {  // inclusive scan of the 32 warp totals
      int w = warp_incl[lane];
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, w, o);
        if (lane >= o) w += y;
      }
      warp_incl[lane] = w;
    }
    __syncthreads();
    int64_t pos = carry + (warp > 0 ? warp_incl[warp - 1] : 0) + (x - cnt);  // exclusive
#pragma unroll
    for (int j = 0; j < kScanItems; ++j)
      if (f[j]) index[pos++] = first + j;
    carry += warp_incl[kScanWarps - 1];
    __syncthreads();  // warp_incl is rewritten by the next chunk
  }
  if (tid == 0) *count = carry;
}

// ----------------------------------------------------------------------------- gather

constexpr int kGatherThreads = 256;
constexpr int kUnroll = 4;
constexpr int64_t kChunkVecs = int64_t{kGatherThreads} * kUnroll;  // vectors per block
constexpr int kMaxSlots = 8;                                         // tensors per launch

struct GatherSlot {
  const char* src;         // first source row
  char* dst;               // contiguous output [M, row]
  int64_t src_stride;      // bytes between source rows (multiple of vec_bytes)
  int64_t row_vecs;        // vectors per row
  int64_t block_end;       // cumulative block count: this slot's blocks end here
  int64_t chunks_per_row;  // long rows: blocks per row; 0 for short rows
  int32_t rows_per_block;  // short rows: whole rows per block; 0 for long rows
  int32_t vec_bytes;       // 16, 8, 4, 2 or 1
};

struct GatherParams {
  GatherSlot slot[kMaxSlots];
  int num;
};

template <int N> struct VecOf;
template <> struct VecOf<16> { using type = uint4; };
template <> struct VecOf<8> { using type = uint2; };
template <> struct VecOf<4> { using type = uint32_t; };
template <> struct VecOf<2> { using type = uint16_t; };
template <> struct VecOf<1> { using type = uint8_t; };

template <int VB>
__device__ __forceinline__ void gather_block(const GatherSlot& s, int64_t local,
                                             const int64_t* __restrict__ index, int64_t m) {
  using V = typename VecOf<VB>::type;
  const V* __restrict__ src = reinterpret_cast<const V*>(s.src);
  V* __restrict__ dst = reinterpret_cast<V*>(s.dst);
  const int64_t stride = s.src_stride / VB;
  const int64_t rv = s.row_vecs;
  V buf[kUnroll];
  if (s.chunks_per_row > 0) {  // long rows: one chunk of one row
    const int64_t r = local / s.chunks_per_row;
    const int64_t c0 = (local - r * s.chunks_per_row) * kChunkVecs + threadIdx.x;
    const V* sp = src + index[r] * stride;
    V* dp = dst + r * rv;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t c = c0 + u * kGatherThreads;
      if (c < rv) buf[u] = sp[c];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t c = c0 + u * kGatherThreads;
      if (c < rv) dp[c] = buf[u];
    }
  } else {  // short rows: rows_per_block whole rows, rows_per_block * rv <= kChunkVecs
    const int64_t r0 = local * s.rows_per_block;
    const int64_t left = m - r0;
    const int rows = left < s.rows_per_block ? static_cast<int>(left) : s.rows_per_block;
    const int rvi = static_cast<int>(rv);
    const int total = rows * rvi;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int e = threadIdx.x + u * kGatherThreads;
      if (e < total) {
        const int rr = e / rvi;
        buf[u] = src[index[r0 + rr] * stride + (e - rr * rvi)];
      }
    }
    V* dp = dst + r0 * rv;  // the block's output rows are one contiguous span
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int e = threadIdx.x + u * kGatherThreads;
      if (e < total) dp[e] = buf[u];
    }
  }
}

__global__ void __launch_bounds__(kGatherThreads)
compact_gather_kernel(const __grid_constant__ GatherParams p, const int64_t* __restrict__ index, int64_t m) {
  const int64_t b = blockIdx.x;
  int k = 0;
  while (k + 1 < p.num && b >= p.slot[k].block_end) ++k;
  const GatherSlot& s = p.slot[k];
  const int64_t local = b - (k > 0 ? p.slot[k - 1].block_end : 0);
  switch (s.vec_bytes) {  // uniform per block
    case 16: gather_block<16>(s, local, index, m); break;
    case 8: gather_block<8>(s, local, index, m); break;
    case 4: gather_block<4>(s, local, index, m); break;
    case 2: gather_block<2>(s, local, index, m); break;
    default: gather_block<1>(s, local, index, m); break;
  }
}

int vec_bytes_for(uintptr_t src, uintptr_t dst, int64_t row_bytes, int64_t stride_bytes) {
  for (int v = 16; v > 1; v >>= 1)
    if (src % v == 0 && dst % v == 0 && row_bytes % v == 0 && stride_bytes % v == 0) return v;
  return 1;
}

void launch_gather(GatherParams& p, int64_t blocks, const int64_t* index, int64_t m, cudaStream_t stream) {
  TORCH_CHECK(blocks <= INT32_MAX, "compact_rows: too many rows to copy in one launch");
  compact_gather_kernel<<<static_cast<unsigned>(blocks), kGatherThreads, 0, stream>>>(p, index, m);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, std::vector<at::Tensor>> compact_rows_cuda(const at::Tensor& keep,
                                                                  at::TensorList tensors) {
  check_compact_rows_args(keep, tensors);
  TORCH_CHECK(keep.is_cuda(), "compact_rows: keep must be a CUDA tensor here");
  const c10::cuda::CUDAGuard guard(keep.device());
  const int64_t n = keep.size(0);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor index = at::empty({n}, keep.options().dtype(at::kLong));
  int64_t m = 0;
  if (n > 0) {
    at::Tensor count = at::empty({1}, keep.options().dtype(at::kLong));
    compact_scan_kernel<<<1, kScanThreads, 0, stream>>>(
        reinterpret_cast<const uint8_t*>(keep.const_data_ptr<bool>()), n, index.data_ptr<int64_t>(),
        count.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // The one device->host read: the output sizes depend on M. Pinned destination.
    at::Tensor host = at::empty({1}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    c10::cuda::memcpy_and_sync(host.data_ptr<int64_t>(), count.const_data_ptr<int64_t>(), sizeof(int64_t),
                               cudaMemcpyDeviceToHost, stream);
    m = *host.const_data_ptr<int64_t>();
    TORCH_CHECK(m >= 0 && m <= n, "compact_rows: internal error, survivor count ", m, " out of [0, ", n, "]");
  }

  std::vector<at::Tensor> outs;
  outs.reserve(tensors.size());
  GatherParams p{};
  int64_t blocks = 0;
  const int64_t* idx = index.const_data_ptr<int64_t>();
  for (const at::Tensor& t : tensors) {
    std::vector<int64_t> sizes = t.sizes().vec();
    sizes[0] = m;
    at::Tensor out = at::empty(sizes, t.options());
    const int64_t row_bytes = compaction_row_bytes(t);
    if (m > 0 && row_bytes > 0) {
      GatherSlot& s = p.slot[p.num];
      s.src = static_cast<const char*>(t.const_data_ptr());
      s.dst = static_cast<char*>(out.data_ptr());
      s.src_stride = t.stride(0) * static_cast<int64_t>(t.element_size());
      s.vec_bytes = vec_bytes_for(reinterpret_cast<uintptr_t>(s.src), reinterpret_cast<uintptr_t>(s.dst),
                                  row_bytes, s.src_stride);
      s.row_vecs = row_bytes / s.vec_bytes;
      if (s.row_vecs * 2 > kChunkVecs) {
        s.chunks_per_row = (s.row_vecs + kChunkVecs - 1) / kChunkVecs;
        s.rows_per_block = 0;
        blocks += m * s.chunks_per_row;
      } else {
        s.chunks_per_row = 0;
        s.rows_per_block = static_cast<int32_t>(kChunkVecs / s.row_vecs);
        blocks += (m + s.rows_per_block - 1) / s.rows_per_block;
      }
      s.block_end = blocks;
      if (++p.num == kMaxSlots) {
        launch_gather(p, blocks, idx, m, stream);
        p = GatherParams{};
        blocks = 0;
      }
    }
    outs.push_back(std::move(out));
  }
  if (p.num > 0) launch_gather(p, blocks, idx, m, stream);
  return {index.narrow(0, 0, m), outs};
}

// ----------------------------------------------------------------------------- scatter

constexpr int kScatterThreads = 256;  // 8 warps, one row each

template <typename layer_t, bool VEC4>
__global__ void __launch_bounds__(kScatterThreads)
scatter_exits_kernel(float* __restrict__ out, int64_t out_stride, layer_t* __restrict__ out_layer,
                     int64_t layer_stride, const int64_t* __restrict__ bidx, const bool* __restrict__ exit,
                     const float* __restrict__ logits, int64_t in_stride, int64_t n, int64_t c, int64_t batch,
                     layer_t layer) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t{gridDim.x} * (kScatterThreads / 32);
  for (int64_t i = int64_t{blockIdx.x} * (kScatterThreads / 32) + (threadIdx.x >> 5); i < n; i += warps) {
    if (!exit[i]) continue;
    const int64_t b = bidx[i];
    if (b < 0 || b >= batch) continue;  // unchecked on the device: skip, never write out of bounds
    const float* src = logits + i * in_stride;
    float* dst = out + b * out_stride;
    if (VEC4) {
      const float4* s4 = reinterpret_cast<const float4*>(src);
      float4* d4 = reinterpret_cast<float4*>(dst);
      for (int64_t k = lane; k < c / 4; k += 32) d4[k] = s4[k];
    } else {
      for (int64_t k = lane; k < c; k += 32) dst[k] = src[k];
    }
    if (lane == 0) out_layer[b * layer_stride] = layer;
  }
}

template <typename layer_t>
void launch_scatter(const at::Tensor& out_logits, const at::Tensor& out_layer, const at::Tensor& batch_index,
                    const at::Tensor& exit, const at::Tensor& logits, int64_t layer, cudaStream_t stream) {
  const int64_t n = logits.size(0), c = logits.size(1);
  const float* src = logits.const_data_ptr<float>();
  float* dst = out_logits.data_ptr<float>();
  const bool vec4 = c % 4 == 0 && logits.stride(0) % 4 == 0 && out_logits.stride(0) % 4 == 0 &&
                    reinterpret_cast<uintptr_t>(src) % 16 == 0 && reinterpret_cast<uintptr_t>(dst) % 16 == 0;
  const int64_t blocks = std::min<int64_t>((n + kScatterThreads / 32 - 1) / (kScatterThreads / 32), 65536);
  auto kernel = vec4 ? scatter_exits_kernel<layer_t, true> : scatter_exits_kernel<layer_t, false>;
  kernel<<<static_cast<unsigned>(blocks), kScatterThreads, 0, stream>>>(
      dst, out_logits.stride(0), out_layer.data_ptr<layer_t>(), out_layer.stride(0),
      batch_index.const_data_ptr<int64_t>(), exit.const_data_ptr<bool>(), src, logits.stride(0), n, c,
      out_logits.size(0), static_cast<layer_t>(layer));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void scatter_exits_cuda(const at::Tensor& out_logits, const at::Tensor& out_layer, const at::Tensor& batch_index,
                        const at::Tensor& exit, const at::Tensor& logits, int64_t layer) {
  check_scatter_exits_args(out_logits, out_layer, batch_index, exit, logits, layer);
  TORCH_CHECK(logits.is_cuda(), "scatter_exits: tensors must be CUDA tensors here");
  if (logits.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(logits.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  switch (out_layer.scalar_type()) {
    case at::kInt: launch_scatter<int32_t>(out_logits, out_layer, batch_index, exit, logits, layer, stream); break;
    case at::kLong: launch_scatter<int64_t>(out_logits, out_layer, batch_index, exit, logits, layer, stream); break;
    default: TORCH_CHECK(false, "scatter_exits: out_layer must be int32 or int64, got ", out_layer.scalar_type());
  }
}

}  // namespace
}  // namespace eekernels

TORCH_LIBRARY_IMPL(eekernels, CUDA, m) {
  m.impl("compact_rows", &eekernels::compact_rows_cuda);
  m.impl("scatter_exits", &eekernels::scatter_exits_cuda);
}
