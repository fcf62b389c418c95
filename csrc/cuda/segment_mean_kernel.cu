// CUDA segment mean over CSR rows. One warp owns one (row, 32-column) tile; each lane owns one
// column and adds the row's edges one after another in CSR order. No atomics and no cross-thread
// reduction, so every output element is summed in exactly the order the CPU kernel uses: results
// are deterministic, independent of the launch shape, and bitwise equal to the CPU kernel's for the
// same dtype.
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include "utils/check.h"

namespace nino_fast {
namespace {

constexpr int kWarp = 32;
// 8 warps = 256 threads per block: enough warps in flight to hide the load latency.
constexpr int kRowsPerBlock = 8;

template <typename scalar_t>
__global__ void segment_mean_csr_kernel(const scalar_t* __restrict__ src,
                                        const int64_t* __restrict__ rowptr,
                                        scalar_t* __restrict__ out, int64_t num_rows, int64_t dim) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * kWarp + threadIdx.x;
  if (row >= num_rows || col >= dim) return;
  const int64_t begin = rowptr[row], end = rowptr[row + 1];
  // Lanes of a warp read 32 consecutive columns of the same edge: one coalesced transaction per
  // edge.
  acc_t acc = acc_t(0);
  for (int64_t e = begin; e < end; ++e) acc += static_cast<acc_t>(src[e * dim + col]);
  // Same arithmetic as the CPU kernel (sum, then multiply by the reciprocal count) so the two match
  // bitwise.
  const acc_t mean = end > begin ? acc * (acc_t(1) / static_cast<acc_t>(end - begin)) : acc_t(0);
  out[row * dim + col] = static_cast<scalar_t>(mean);
}

at::Tensor segment_mean_csr_cuda(const at::Tensor& src_in, const at::Tensor& rowptr_in) {
  constexpr const char* op = "nino_fast::segment_mean_csr";
  const c10::cuda::CUDAGuard guard(src_in.device());
  const auto [src, rowptr] = segment_mean_inputs(op, src_in, rowptr_in);
  const int64_t n = rowptr.numel() - 1, d = src.size(1);
  // Every element is written by the kernel (empty rows write 0), so no zero-fill pass is needed.
  auto out = at::empty({n, d}, src.options());
  if (n == 0 || d == 0) return out;
  const int64_t col_tiles = (d + kWarp - 1) / kWarp;
  NINO_CHECK(col_tiles <= 65535, op,
             ": src has too many columns for one launch (D <= ", num_str(65535 * kWarp),
             "), got D=", num_str(d));
  const dim3 block(kWarp, kRowsPerBlock);
  const dim3 grid(static_cast<unsigned>((n + kRowsPerBlock - 1) / kRowsPerBlock),
                  static_cast<unsigned>(col_tiles));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(),
                                  "segment_mean_csr_cuda", [&] {
    segment_mean_csr_kernel<scalar_t><<<grid, block, 0, stream>>>(
        src.data_ptr<scalar_t>(), rowptr.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), n, d);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(nino_fast, CUDA, m) {
  m.impl("segment_mean_csr", &segment_mean_csr_cuda);
}

}  // namespace nino_fast
