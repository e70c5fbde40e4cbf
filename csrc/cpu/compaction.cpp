// Ragged batch compaction, CPU (spec: eekernels/ops/compaction.py).
//
//   compact_rows(keep, tensors) -> (index, compacted): a serial scan of the keep mask (N is
//     a batch of rows: tiny next to the copies) gives the survivor count M and the int64
//     index; then each tensor's kept rows are copied as raw bytes (memcpy of row_bytes,
//     any dtype) into a new contiguous [M, ...] tensor, rows in parallel (at::parallel_for).
//   scatter_exits(out_logits, out_layer, batch_index, exit, logits, layer), in place: checks
//     every exited row's batch position first (an error leaves the outputs untouched),
//     then copies the rows.
//
// The argument checks of both ops live here too (check_compact_rows_args,
// check_scatter_exits_args, with external linkage) and are shared with the CUDA kernels in
// csrc/cuda/compaction.cu: this file is always compiled. The Python wrapper validates first
// with friendlier messages; these guard direct torch.ops.eekernels.* calls.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

namespace eekernels {

// Each row t[i] (every dim but the first) is one contiguous block of memory. An empty
// tensor has no rows to copy, whatever its strides (torch's .contiguous() keeps an empty
// tensor's strides, so the Python wrapper cannot normalise them).
bool compaction_rows_contiguous(const at::Tensor& t) {
  if (t.numel() == 0) return true;
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= 1; --d) {
    if (t.size(d) != 1 && t.stride(d) != expected) return false;
    expected *= t.size(d);
  }
  return true;
}

// Bytes in one row of t.
int64_t compaction_row_bytes(const at::Tensor& t) {
  int64_t elems = 1;
  for (int64_t d = 1; d < t.dim(); ++d) elems *= t.size(d);
  return elems * static_cast<int64_t>(t.element_size());
}

void check_compact_rows_args(const at::Tensor& keep, at::TensorList tensors) {
  TORCH_CHECK(keep.layout() == at::kStrided, "compact_rows: keep must be a dense tensor");
  TORCH_CHECK(keep.dim() == 1 && keep.scalar_type() == at::kBool,
              "compact_rows: keep must be a 1-d bool tensor, got ", keep.scalar_type(), " ", keep.sizes());
  TORCH_CHECK(keep.is_contiguous(), "compact_rows: keep must be contiguous");
  const int64_t n = keep.size(0);
  for (size_t j = 0; j < tensors.size(); ++j) {
    const at::Tensor& t = tensors[j];
    TORCH_CHECK(t.layout() == at::kStrided && !t.is_quantized(),
                "compact_rows: tensors[", j, "] must be a dense, non-quantized tensor");
    TORCH_CHECK(t.dim() >= 1 && t.size(0) == n, "compact_rows: tensors[", j, "] must have N=", n,
                " rows, got shape ", t.sizes());
    TORCH_CHECK(t.device() == keep.device(), "compact_rows: tensors[", j, "] is on ", t.device(),
                ", keep on ", keep.device());
    TORCH_CHECK(compaction_rows_contiguous(t), "compact_rows: each row of tensors[", j,
                "] must be contiguous (any row stride), got strides ", t.strides());
    TORCH_CHECK(!t.is_conj() && !t.is_neg(), "compact_rows: tensors[", j,
                "] has a lazy conj/neg bit; resolve it first");
  }
}

void check_scatter_exits_args(const at::Tensor& out_logits, const at::Tensor& out_layer,
                              const at::Tensor& batch_index, const at::Tensor& exit,
                              const at::Tensor& logits, int64_t layer) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat,
              "scatter_exits: logits must be float32 [N, C], got ", logits.scalar_type(), " ", logits.sizes());
  const int64_t n = logits.size(0), c = logits.size(1);
  const auto dev = logits.device();
  auto on_dev = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.layout() == at::kStrided, "scatter_exits: ", name, " must be a dense tensor");
    TORCH_CHECK(t.device() == dev, "scatter_exits: ", name, " is on ", t.device(), ", logits on ", dev);
  };
  on_dev(out_logits, "out_logits");
  on_dev(out_layer, "out_layer");
  on_dev(batch_index, "batch_index");
  on_dev(exit, "exit");
  TORCH_CHECK(c <= 1 || n == 0 || logits.stride(1) == 1, "scatter_exits: logits' last dim must be contiguous");
  TORCH_CHECK(out_logits.dim() == 2 && out_logits.scalar_type() == at::kFloat && out_logits.size(1) == c,
              "scatter_exits: out_logits must be float32 [B, ", c, "], got ", out_logits.scalar_type(), " ",
              out_logits.sizes());
  TORCH_CHECK(c <= 1 || out_logits.stride(1) == 1, "scatter_exits: out_logits' last dim must be contiguous");
  const int64_t b = out_logits.size(0);
  TORCH_CHECK(out_layer.dim() == 1 && out_layer.size(0) == b &&
                  (out_layer.scalar_type() == at::kInt || out_layer.scalar_type() == at::kLong),
              "scatter_exits: out_layer must be int32 or int64 [", b, "], got ", out_layer.scalar_type(), " ",
              out_layer.sizes());
  TORCH_CHECK(batch_index.dim() == 1 && batch_index.size(0) == n && batch_index.scalar_type() == at::kLong &&
                  batch_index.is_contiguous(),
              "scatter_exits: batch_index must be contiguous int64 [", n, "], got ", batch_index.scalar_type(),
              " ", batch_index.sizes());
  TORCH_CHECK(exit.dim() == 1 && exit.size(0) == n && exit.scalar_type() == at::kBool && exit.is_contiguous(),
              "scatter_exits: exit must be contiguous bool [", n, "], got ", exit.scalar_type(), " ", exit.sizes());
  TORCH_CHECK(layer >= 1, "scatter_exits: layer is 1-based and must be >= 1, got ", layer);
  TORCH_CHECK(out_layer.scalar_type() == at::kLong || layer <= INT32_MAX,
              "scatter_exits: layer ", layer, " does not fit out_layer's int32");
}

namespace {

std::tuple<at::Tensor, std::vector<at::Tensor>> compact_rows_cpu(const at::Tensor& keep,
                                                                 at::TensorList tensors) {
  check_compact_rows_args(keep, tensors);
  const int64_t n = keep.size(0);
  const bool* k = keep.const_data_ptr<bool>();
  int64_t m = 0;
  for (int64_t i = 0; i < n; ++i) m += k[i] ? 1 : 0;
  at::Tensor index = at::empty({m}, keep.options().dtype(at::kLong));
  int64_t* idx = index.data_ptr<int64_t>();
  for (int64_t i = 0, j = 0; i < n; ++i)
    if (k[i]) idx[j++] = i;

  std::vector<at::Tensor> outs;
  outs.reserve(tensors.size());
  for (const at::Tensor& t : tensors) {
    std::vector<int64_t> sizes = t.sizes().vec();
    sizes[0] = m;
    at::Tensor out = at::empty(sizes, t.options());
    const int64_t row_bytes = compaction_row_bytes(t);
    if (m > 0 && row_bytes > 0) {
      const char* src = static_cast<const char*>(t.const_data_ptr());
      char* dst = static_cast<char*>(out.data_ptr());
      const int64_t src_stride = t.stride(0) * static_cast<int64_t>(t.element_size());
      const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / row_bytes);
      at::parallel_for(0, m, grain, [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r)
          std::memcpy(dst + r * row_bytes, src + idx[r] * src_stride, static_cast<size_t>(row_bytes));
      });
    }
    outs.push_back(std::move(out));
  }
  return {index, outs};
}

template <typename layer_t>
void scatter_rows(const at::Tensor& out_logits, const at::Tensor& out_layer, const int64_t* bidx,
                  const bool* ex, const at::Tensor& logits, int64_t layer) {
  const int64_t n = logits.size(0), c = logits.size(1);
  const float* src = logits.const_data_ptr<float>();
  float* dst = out_logits.data_ptr<float>();
  layer_t* lay = out_layer.data_ptr<layer_t>();
  const int64_t src_stride = logits.stride(0), dst_stride = out_logits.stride(0);
  const int64_t lay_stride = out_layer.stride(0);
  for (int64_t i = 0; i < n; ++i) {
    if (!ex[i]) continue;
    const int64_t b = bidx[i];
    if (c > 0) std::memcpy(dst + b * dst_stride, src + i * src_stride, static_cast<size_t>(c) * sizeof(float));
    lay[b * lay_stride] = static_cast<layer_t>(layer);
  }
}

void scatter_exits_cpu(const at::Tensor& out_logits, const at::Tensor& out_layer,
                       const at::Tensor& batch_index, const at::Tensor& exit, const at::Tensor& logits,
                       int64_t layer) {
  check_scatter_exits_args(out_logits, out_layer, batch_index, exit, logits, layer);
  const int64_t n = logits.size(0), b = out_logits.size(0);
  const int64_t* bidx = batch_index.const_data_ptr<int64_t>();
  const bool* ex = exit.const_data_ptr<bool>();
  for (int64_t i = 0; i < n; ++i)  // all positions first: an error writes nothing
    TORCH_CHECK(!ex[i] || (bidx[i] >= 0 && bidx[i] < b), "scatter_exits: batch_index[", i, "] = ", bidx[i],
                " is out of range for a batch of B=", b);
  switch (out_layer.scalar_type()) {
    case at::kInt: scatter_rows<int32_t>(out_logits, out_layer, bidx, ex, logits, layer); break;
    case at::kLong: scatter_rows<int64_t>(out_logits, out_layer, bidx, ex, logits, layer); break;
    default: TORCH_CHECK(false, "scatter_exits: out_layer must be int32 or int64, got ", out_layer.scalar_type());
  }
}

}  // namespace
}  // namespace eekernels

TORCH_LIBRARY_IMPL(eekernels, CPU, m) {
  m.impl("compact_rows", &eekernels::compact_rows_cpu);
  m.impl("scatter_exits", &eekernels::scatter_exits_cpu);
}
