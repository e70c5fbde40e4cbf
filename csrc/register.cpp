// The one registration file of eekernels._C: op schemas (TORCH_LIBRARY, namespace
// "eekernels") and the Python module. Kernels register their implementations per
// dispatch key next to their code: csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA).
// Each schema is written again in its op module of eekernels/ops (the Triton ops reuse it;
// tests/test_extension.py checks the two agree), next to its fake (meta) implementation.
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>

#include "cpu/exit_head.h"

TORCH_LIBRARY(eekernels, m) {
  // Fused exit head; see eekernels/ops/exit_head.py for the contract.
  // criterion: 0 entropy, 1 max_prob, 2 patience, 3 policy. `counter` output is [N] int32
  // for patience and an empty [0] tensor otherwise. The policy network's parameters
  // ([P, H], [P], [P], [1]) are given with criterion 3 only, so they default to None.
  // pooling: 0 cls (hidden [N, H] as given), 1 mean (hidden [N, S, H], the mean of the
  // tokens where token_mask, bool [N, S], is true, or of every token without one).
  m.def(
      "exit_head(Tensor hidden, Tensor weight, Tensor bias, Tensor? pooler_weight, "
      "Tensor? pooler_bias, Tensor? memory, float memory_lambda, bool tanh_logits, "
      "int criterion, float threshold, Tensor? prev_pred, Tensor? counter, "
      "Tensor? policy_weight=None, Tensor? policy_bias=None, Tensor? policy_out_weight=None, "
      "Tensor? policy_out_bias=None, Tensor? token_mask=None, int pooling=0) -> "
      "(Tensor logits, Tensor score, Tensor exit, Tensor pred, Tensor counter)");
  // Row compaction; see eekernels/ops/compaction.py for the contract. compact_rows reads
  // the survivor count M back to the host (outputs are [M, ...]); scatter_exits writes the
  // exited rows' logits and layer in place at their batch positions, without host sync.
  m.def("compact_rows(Tensor keep, Tensor[] tensors) -> (Tensor index, Tensor[] rows)");
  m.def(
      "scatter_exits(Tensor(a!) out_logits, Tensor(b!) out_layer, Tensor batch_index, "
      "Tensor exit, Tensor logits, int layer) -> ()");
  // Token gather/scatter (HashEE, MPEE); see eekernels/ops/tokens.py for the contract.
  // The pack ops read the token counts back to the host once (data-dependent output sizes);
  // scatter_tokens writes rows in place (index [nnz] or [B, M], -1 skipped) and mpee_prune
  // has a width known from S and keep_ratio: neither synchronises.
  m.def(
      "pack_tokens(Tensor hidden, Tensor active) -> "
      "(Tensor values, Tensor index, Tensor cu_seqlens, SymInt max_seqlen)");
  m.def("pack_tokens_padded(Tensor hidden, Tensor active) -> (Tensor values, Tensor index, Tensor lengths)");
  m.def("scatter_tokens(Tensor(a!) hidden, Tensor index, Tensor values) -> ()");
  m.def(
      "mpee_prune(Tensor hidden, Tensor valid, Tensor memory, Tensor attention, float keep_ratio) -> "
      "(Tensor hidden, Tensor valid, Tensor memory, Tensor source)");
}

static bool with_cuda() {
#ifdef EEKERNELS_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// How many threads one at::parallel_for of this library runs its chunks on. ATen's
// parallel_for is a header template: in a library compiled without OpenMP it runs on the
// calling thread whatever torch.get_num_threads() says, so this is the build's check.
static int64_t parallel_for_threads() {
  std::atomic<uint64_t> seen{0};
  at::parallel_for(0, 64, 1, [&](int64_t, int64_t) { seen |= uint64_t{1} << (at::get_thread_num() % 64); });
  return __builtin_popcountll(seen.load());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "eekernels compiled ops (registered under torch.ops.eekernels)";
  m.def("with_cuda", &with_cuda, "True if the CUDA kernels were compiled in");
  m.def("parallel_for_threads", &parallel_for_threads,
        "Threads one at::parallel_for of the CPU kernels runs on (torch.get_num_threads() when built with OpenMP)");
  // torch.ops.eekernels.exit_head's CPU kernel without the dispatcher: same arguments and
  // checks, for eager calls from eekernels.ops.exit_head (traced calls use the op).
  m.def("exit_head_cpu", &eekernels::exit_head_cpu, "CPU exit head (see eekernels.ops.exit_head)");
}
