// Token gather/scatter for token-level early exit, CPU (spec: eekernels/ops/tokens.py).
//
//   pack_tokens(hidden, active) -> (values, index, cu_seqlens, max_seqlen): a serial scan of
//     the [B, S] mask (tiny next to the copies) gives cu_seqlens, the flat index and the
//     counts; the active rows are then copied (memcpy of H elements) in parallel.
//   pack_tokens_padded(hidden, active) -> (values [B, M, H], index [B, M], lengths [B]):
//     the same scan; every output slot is written (a row or zeros / -1), slots in parallel.
//   scatter_tokens(hidden, index, values), in place: every position is checked first (an
//     out-of-range index writes nothing and raises), then rows are copied in parallel.
//   mpee_prune(hidden, valid, memory, attention, keep_ratio): samples in parallel; per
//     sample the valid non-[CLS] tokens are sorted by (memory desc, position asc), the top
//     m kept in position order, the rest fused in float32 (mpee.txt eq. 7-8).
//
// Rows are copied as raw bytes, so pack/scatter are exact for every float dtype; hidden
// may have any stride for B and S, its last dim must be contiguous.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include "common/tokens_common.h"

namespace eekernels {
namespace {

struct RowSource {  // [B, S, H] rows with arbitrary B/S strides, in bytes
  const char* base;
  int64_t sb, ss, row_bytes;
  const char* row(int64_t b, int64_t s) const { return base + b * sb + s * ss; }
};

RowSource row_source(const at::Tensor& hidden) {
  const int64_t e = static_cast<int64_t>(hidden.element_size());
  return {static_cast<const char*>(hidden.const_data_ptr()), hidden.stride(0) * e, hidden.stride(1) * e,
          hidden.size(2) * e};
}

int64_t grain_rows(int64_t row_bytes) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(row_bytes, 1)); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, c10::SymInt> pack_tokens_cpu(const at::Tensor& hidden,
                                                                      const at::Tensor& active) {
  check_pack_tokens_args("pack_tokens", hidden, active);
  const int64_t b = hidden.size(0), s = hidden.size(1), h = hidden.size(2);
  const bool* a = active.const_data_ptr<bool>();
  at::Tensor cu = at::empty({b + 1}, active.options().dtype(at::kInt));
  int32_t* cup = cu.data_ptr<int32_t>();
  int64_t nnz = 0, max_len = 0;
  cup[0] = 0;
  for (int64_t r = 0; r < b; ++r) {
    int64_t cnt = 0;
    for (int64_t t = 0; t < s; ++t) cnt += a[r * s + t] ? 1 : 0;
    nnz += cnt;
    max_len = std::max(max_len, cnt);
    TORCH_CHECK(nnz <= INT32_MAX, "pack_tokens: more than 2^31-1 active tokens do not fit int32 cu_seqlens");
    cup[r + 1] = static_cast<int32_t>(nnz);
  }
  at::Tensor index = at::empty({nnz}, active.options().dtype(at::kLong));
  int64_t* idx = index.data_ptr<int64_t>();
  for (int64_t i = 0, j = 0; i < b * s; ++i)
    if (a[i]) idx[j++] = i;
  at::Tensor values = at::empty({nnz, h}, hidden.options());
  const RowSource src = row_source(hidden);
  if (nnz > 0 && src.row_bytes > 0) {
    char* dst = static_cast<char*>(values.data_ptr());
    at::parallel_for(0, nnz, grain_rows(src.row_bytes), [&](int64_t lo, int64_t hi) {
      for (int64_t k = lo; k < hi; ++k)
        std::memcpy(dst + k * src.row_bytes, src.row(idx[k] / s, idx[k] % s), static_cast<size_t>(src.row_bytes));
    });
  }
  return {values, index, cu, c10::SymInt(max_len)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pack_tokens_padded_cpu(const at::Tensor& hidden,
                                                                      const at::Tensor& active) {
  check_pack_tokens_args("pack_tokens_padded", hidden, active);
  const int64_t b = hidden.size(0), s = hidden.size(1), h = hidden.size(2);
  const bool* a = active.const_data_ptr<bool>();
  at::Tensor lengths = at::empty({b}, active.options().dtype(at::kLong));
  int64_t* len = lengths.data_ptr<int64_t>();
  int64_t m = 0;
  for (int64_t r = 0; r < b; ++r) {
    int64_t cnt = 0;
    for (int64_t t = 0; t < s; ++t) cnt += a[r * s + t] ? 1 : 0;
    len[r] = cnt;
    m = std::max(m, cnt);
  }
  at::Tensor index = at::empty({b, m}, active.options().dtype(at::kLong));
  at::Tensor values = at::empty({b, m, h}, hidden.options());
  int64_t* idx = index.data_ptr<int64_t>();
  const RowSource src = row_source(hidden);
  char* dst = static_cast<char*>(values.data_ptr());
  // Sample by sample: the index row first (a scan of the sample's mask), then its rows.
  at::parallel_for(0, b, std::max<int64_t>(1, grain_rows(src.row_bytes * std::max<int64_t>(m, 1))),
                   [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      int64_t k = 0;
      for (int64_t t = 0; t < s; ++t)
        if (a[r * s + t]) idx[r * m + k++] = r * s + t;
      for (; k < m; ++k) idx[r * m + k] = -1;
      if (src.row_bytes == 0) continue;
      for (k = 0; k < m; ++k) {
        char* d = dst + (r * m + k) * src.row_bytes;
        const int64_t p = idx[r * m + k];
        if (p >= 0)
          std::memcpy(d, src.row(r, p - r * s), static_cast<size_t>(src.row_bytes));
        else
          std::memset(d, 0, static_cast<size_t>(src.row_bytes));  // all-zero bits: +0.0 in every float dtype
      }
    }
  });
  return {values, index, lengths};
}

void scatter_tokens_cpu(const at::Tensor& hidden, const at::Tensor& index, const at::Tensor& values) {
  check_scatter_tokens_args(hidden, index, values);
  const int64_t total = hidden.size(0) * hidden.size(1);
  const int64_t rows = index.numel();
  const int64_t* idx = index.const_data_ptr<int64_t>();
  for (int64_t j = 0; j < rows; ++j)  // all positions first: an error writes nothing
    TORCH_CHECK(idx[j] < total, "scatter_tokens: index value ", idx[j], " (entry ", j,
                ") is out of range for B*S=", total);
  const int64_t row_bytes = hidden.size(2) * static_cast<int64_t>(hidden.element_size());
  if (rows == 0 || row_bytes == 0) return;
  const char* src = static_cast<const char*>(values.const_data_ptr());
  char* dst = static_cast<char*>(hidden.data_ptr());
  at::parallel_for(0, rows, grain_rows(row_bytes), [&](int64_t lo, int64_t hi) {
    for (int64_t j = lo; j < hi; ++j)
      if (idx[j] >= 0)
        std::memcpy(dst + idx[j] * row_bytes, src + j * row_bytes, static_cast<size_t>(row_bytes));
  });
}

template <typename scalar_t>
void mpee_prune_kernel(const at::Tensor& hidden, const bool* valid, const float* mem, const float* att,
                       double keep_ratio, int64_t width, scalar_t* out_h, bool* out_valid, float* out_mem,
                       int64_t* out_src) {
  const int64_t b = hidden.size(0), s = hidden.size(1), h = hidden.size(2);
  const RowSource src = row_source(hidden);
  at::parallel_for(0, b, 1, [&](int64_t lo, int64_t hi) {
    std::vector<int64_t> cand;
    std::vector<int32_t> key(static_cast<size_t>(s));
    std::vector<uint8_t> kept(static_cast<size_t>(s));
    std::vector<float> acc(static_cast<size_t>(h));
    cand.reserve(static_cast<size_t>(s));
    for (int64_t r = lo; r < hi; ++r) {
      const bool* v = valid + r * s;
      const float* mm = mem + r * s;
      const float* aa = att + r * s;
      cand.clear();
      for (int64_t t = 1; t < s; ++t)
        if (v[t]) {
          cand.push_back(t);
          key[t] = mpee_memory_key(mm[t]);
        }
      const int64_t n = static_cast<int64_t>(cand.size());
      const int64_t m = std::min(n, mpee_keep_count(n, keep_ratio));  // eq. 7
      // The m highest memories, ties to the lower position (a total order: exact).
      std::nth_element(cand.begin(), cand.begin() + m, cand.end(), [&](int64_t x, int64_t y) {
        return key[x] != key[y] ? key[x] > key[y] : x < y;
      });
      std::fill(kept.begin(), kept.end(), 0);
      for (int64_t i = 0; i < m; ++i) kept[cand[i]] = 1;

      scalar_t* oh = out_h + r * width * h;
      bool* ov = out_valid + r * width;
      float* om = out_mem + r * width;
      int64_t* os = out_src + r * width;
      auto copy_row = [&](int64_t slot, int64_t t) {
        if (src.row_bytes) std::memcpy(oh + slot * h, src.row(r, t), static_cast<size_t>(src.row_bytes));
        ov[slot] = true;
        om[slot] = mm[t];
        os[slot] = t;
      };
      copy_row(0, 0);  // [CLS], always kept
      int64_t slot = 1;
      for (int64_t t = 1; t < s; ++t)
        if (kept[t]) copy_row(slot++, t);
      // Fusion token (eq. 8): sum of attention[i] * hidden[i] over the other valid tokens.
      std::fill(acc.begin(), acc.end(), 0.0f);
      float fused_mem = 0.0f;
      for (int64_t i = m; i < n; ++i) {
        const int64_t t = cand[i];
        const scalar_t* row = reinterpret_cast<const scalar_t*>(src.row(r, t));
        const float w = aa[t];
        for (int64_t c = 0; c < h; ++c) acc[c] += w * static_cast<float>(row[c]);
        fused_mem += mm[t];
      }
      const bool has_fusion = n > m;
      for (int64_t c = 0; c < h; ++c) oh[slot * h + c] = static_cast<scalar_t>(has_fusion ? acc[c] : 0.0f);
      ov[slot] = has_fusion;
      om[slot] = has_fusion ? fused_mem : 0.0f;
      os[slot] = -1;
      for (++slot; slot < width; ++slot) {  // padding
        if (h) std::memset(oh + slot * h, 0, static_cast<size_t>(h) * sizeof(scalar_t));
        ov[slot] = false;
        om[slot] = 0.0f;
        os[slot] = -1;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mpee_prune_cpu(const at::Tensor& hidden,
                                                                          const at::Tensor& valid,
                                                                          const at::Tensor& memory,
                                                                          const at::Tensor& attention,
                                                                          double keep_ratio) {
  check_mpee_prune_args(hidden, valid, memory, attention, keep_ratio);
  const int64_t b = hidden.size(0), s = hidden.size(1), h = hidden.size(2);
  const int64_t width = mpee_width(s, keep_ratio);
  at::Tensor out_h = at::empty({b, width, h}, hidden.options());
  at::Tensor out_valid = at::empty({b, width}, valid.options());
  at::Tensor out_mem = at::empty({b, width}, memory.options());
  at::Tensor out_src = at::empty({b, width}, memory.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "mpee_prune_cpu", [&] {
    mpee_prune_kernel<scalar_t>(hidden, valid.const_data_ptr<bool>(), memory.const_data_ptr<float>(),
                                attention.const_data_ptr<float>(), keep_ratio, width,
                                out_h.data_ptr<scalar_t>(), out_valid.data_ptr<bool>(), out_mem.data_ptr<float>(),
                                out_src.data_ptr<int64_t>());
  });
  return {out_h, out_valid, out_mem, out_src};
}

}  // namespace
}  // namespace eekernels

TORCH_LIBRARY_IMPL(eekernels, CPU, m) {
  m.impl("pack_tokens", &eekernels::pack_tokens_cpu);
  m.impl("pack_tokens_padded", &eekernels::pack_tokens_padded_cpu);
  m.impl("scatter_tokens", &eekernels::scatter_tokens_cpu);
  m.impl("mpee_prune", &eekernels::mpee_prune_cpu);
}
