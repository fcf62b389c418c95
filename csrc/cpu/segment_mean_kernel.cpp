// CPU segment mean over CSR rows: one row per iteration, sequential accumulation in the row's own
// order, so results are deterministic and independent of the thread count.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <vector>

#include "utils/check.h"

namespace nino_fast {
namespace {

at::Tensor segment_mean_csr_cpu(const at::Tensor& src_in, const at::Tensor& rowptr_in) {
  const auto [src, rowptr] = segment_mean_inputs("nino_fast::segment_mean_csr", src_in, rowptr_in);
  const int64_t n = rowptr.numel() - 1, d = src.size(1);
  auto out = at::zeros({n, d}, src.options());
  if (n == 0 || d == 0) return out;
  const int64_t* rp = rowptr.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "segment_mean_csr",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = src.data_ptr<scalar_t>();
    scalar_t* y = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, 64, [&](int64_t lo, int64_t hi) {
      std::vector<acc_t> acc(d);
      for (int64_t r = lo; r < hi; ++r) {
        const int64_t b = rp[r], e = rp[r + 1];
        if (e <= b) continue;
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t i = b; i < e; ++i)
          for (int64_t j = 0; j < d; ++j) acc[j] += static_cast<acc_t>(x[i * d + j]);
        const acc_t inv = acc_t(1) / static_cast<acc_t>(e - b);
        for (int64_t j = 0; j < d; ++j) y[r * d + j] = static_cast<scalar_t>(acc[j] * inv);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(nino_fast, CPU, m) {
  m.impl("segment_mean_csr", &segment_mean_csr_cpu);
}

}  // namespace nino_fast
