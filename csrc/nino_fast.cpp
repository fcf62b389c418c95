// The nino_fast operator library: every op's schema, in one place. Kernels register per backend
// (csrc/cpu/*_kernel.cpp: CPU, csrc/cuda/*_kernel.cu: CUDA); the pure-PyTorch specification of each
// op is nino_fast/ops/reference.py, whose signatures equal these schemas (tests/test_opcheck.py).
// nino_fast/ops/library.py adds, under the same names, the fake (shape) functions, the autograd
// formulas and the backend switch (reference / compiled kernel / Triton) in front of these kernels.
// Below a schema, a fused op's arguments travel as one struct per op family (csrc/utils/op_args.h):
// the CPU and CUDA kernels register through its entry adapters and take the struct.
//
// Adding an op: its schema here (a fused op: its argument list in csrc/utils/op_args.h too) and its
// specification in reference.py; a TORCH_LIBRARY_IMPL(nino_fast, CPU, m) in
// csrc/cpu/<op>_kernel.cpp (and CUDA in csrc/cuda/<op>_kernel.cu); its fake and backward in
// nino_fast/ops/library.py; a test against the reference. setup.py and CMakeLists.txt pick new
// files up by glob.
#include <torch/library.h>

#include <string>

#include "cpu/gemm_tile.h"
#include "cpu/out_pool.h"

#ifdef NINO_FAST_PYTHON_MODULE
#include <Python.h>
// `import nino_fast._C` loads this library, which registers the ops with the dispatcher.
static struct PyModuleDef nino_fast_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) {
  return PyModule_Create(&nino_fast_module);
}
#endif

namespace {
// Whether this build compiled csrc/cuda/*.cu. NINO_FAST_WITH_CUDA is defined by setup.py and CMake
// for every translation unit of a CUDA build; nino_fast._extension.has_cuda_ext() reads it.
bool cuda_compiled() {
#ifdef NINO_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}
// The vector instruction set the CPU kernels were compiled for: "avx512", "avx2" or "scalar"
// (csrc/cpu/gemm_tile.h); nino_fast._extension refuses an "avx512" build on a CPU without AVX-512.
std::string cpu_isa() {
  return nino_fast::cpu::compiled_isa();
}
// Frees the CPU kernels' cached output buffers (csrc/cpu/out_pool.h); a NiNo step calls it when it
// ends.
void cpu_pool_release() {
  nino_fast::cpu::OutPool::get().release();
}
// [bytes held in cached buffers, the cap]
std::vector<int64_t> cpu_pool_stats() {
  auto& pool = nino_fast::cpu::OutPool::get();
  return {int64_t(pool.cached()), int64_t(pool.cap())};
}
}  // namespace

TORCH_LIBRARY(nino_fast, m) {
  // Build information (no tensor argument, so a catch-all kernel): were the CUDA kernels built?
  m.def("_cuda_compiled() -> bool", &cuda_compiled);
  m.def("_cpu_isa() -> str", &cpu_isa);
  m.def("_cpu_pool_release() -> ()", &cpu_pool_release);
  m.def("_cpu_pool_stats() -> int[]", &cpu_pool_stats);
  // out[n] = mean(src[rowptr[n]:rowptr[n+1]]), 0 for an empty row.
  m.def("segment_mean_csr(Tensor src, Tensor rowptr) -> Tensor");
  // A NiNo step's raw edge features: the scaled history rows of edge slots (-1: a zero row), see
  // nino_fast/scaling.py, scaled_history_reference. Not differentiable (nor is finish_history_).
  m.def(
      "scaled_history(Tensor states, Tensor slots, Tensor? rows, Tensor scales, Tensor? ends) -> "
      "Tensor");
  // The step's predictions written back: result[p] = (last + delta * upd_scale) * scale + shift for
  // each slot's parameter p (out_index[p] when given); returns the count of NaN/Inf before
  // unscaling. See nino_fast/finish.py, finish_history_reference. Not differentiable.
  m.def(
      "finish_history_(Tensor(a!) result, Tensor delta, Tensor states, Tensor slots, Tensor? rows, "
      "Tensor scales, Tensor? ends, Tensor? out_index, bool residual, float upd_scale) -> int");
  // FiLM message + mean aggregation over destination-sorted CSR (see reference.film_mean).
  m.def(
      "film_mean(Tensor feat, Tensor rowptr, Tensor src, Tensor node_dst, Tensor node_src, "
      "Tensor weight, Tensor bias, Tensor? etype=None, Tensor? type_table=None, "
      "Tensor? feat_index=None) -> Tensor");
  // Edge MLP of two to four GEMMs with gathers and SiLU (see reference.edge_mlp).
  m.def(
      "edge_mlp(Tensor feat, Tensor src, Tensor dst, Tensor weight_a, Tensor bias_a, "
      "Tensor weight_b, Tensor bias_b, Tensor? etype=None, Tensor? type_table=None, "
      "Tensor? node_src=None, Tensor? node_dst=None, Tensor? node_src2=None, "
      "Tensor? node_dst2=None, bool act_out=False, Tensor? weight_c=None, Tensor? bias_c=None, "
      "Tensor? weight_d=None, Tensor? bias_d=None) -> Tensor");
  // Gradients of edge_mlp's inputs for output gradient grad_out, in this
  // order (nino_fast/ops/backward.py, FUSED_OUTPUTS):
  // [feat, weight_a, bias_a, weight_b, bias_b, type_table, node_src, node_dst, node_src2,
  // node_dst2]; an empty tensor for each absent optional input, and for feat unless need_feat.
  m.def(
      "edge_mlp_backward(Tensor grad_out, Tensor feat, Tensor src, Tensor dst, Tensor weight_a, "
      "Tensor bias_a, Tensor weight_b, Tensor bias_b, Tensor? etype, Tensor? type_table, "
      "Tensor? node_src, Tensor? node_dst, Tensor? node_src2, Tensor? node_dst2, bool act_out, "
      "Tensor? weight_c, Tensor? bias_c, Tensor? weight_d, Tensor? bias_d, bool need_feat) -> "
      "Tensor[]");
  // Edge update fused with the next layer's FiLM message + mean (see reference.edge_film_mean).
  m.def(
      "edge_film_mean(Tensor feat, Tensor rowptr, Tensor src, Tensor weight_a, Tensor bias_a, "
      "Tensor? etype, Tensor? type_table, Tensor node_src, Tensor node_dst, Tensor msg_dst, "
      "Tensor msg_src, Tensor weight_scale, Tensor bias_scale, Tensor weight_shift, "
      "Tensor bias_shift, Tensor? feat_index=None) -> Tensor");
  // Gradients of edge_film_mean's inputs for output gradient grad_out, in this
  // order (nino_fast/ops/backward.py, FUSED_OUTPUTS):
  // [feat, weight_a, bias_a, type_table, node_src, node_dst, msg_dst, msg_src, weight_scale,
  // bias_scale, weight_shift, bias_shift]; an empty tensor for an absent table, and for feat unless
  // need_feat.
  m.def(
      "edge_film_mean_backward(Tensor grad_out, Tensor feat, Tensor rowptr, Tensor src, "
      "Tensor weight_a, Tensor bias_a, Tensor? etype, Tensor? type_table, Tensor node_src, "
      "Tensor node_dst, Tensor msg_dst, Tensor msg_src, Tensor weight_scale, Tensor bias_scale, "
      "Tensor weight_shift, Tensor bias_shift, Tensor? feat_index, bool need_feat) -> Tensor[]");
  // Gradients of film_mean's inputs for output gradient grad_out, in this
  // order (nino_fast/ops/backward.py, FUSED_OUTPUTS):
  // [feat, node_dst, node_src, weight, bias, type_table]; an empty tensor for an absent table, and
  // for feat unless need_feat.
  m.def(
      "film_mean_backward(Tensor grad_out, Tensor feat, Tensor rowptr, Tensor src, Tensor "
      "node_dst, "
      "Tensor node_src, Tensor weight, Tensor bias, Tensor? etype, Tensor? type_table, "
      "Tensor? feat_index, bool need_feat) -> Tensor[]");
}
