// Input checks shared by the kernels: every message names the op, the argument, what was expected and
// what was received.
#pragma once

#include <torch/types.h>

#include <sstream>
#include <string>

namespace nino_fast {

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

inline void check_dtype(const char* op, const char* arg, const at::Tensor& t, at::ScalarType want) {
  TORCH_CHECK(t.scalar_type() == want, op, ": ", arg, " must be ", c10::toString(want), ", got ",
              c10::toString(t.scalar_type()));
}

inline void check_dim(const char* op, const char* arg, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, op, ": ", arg, " must be ", dim, "-D, got shape ", shape_str(t));
}

inline void check_shape(const char* op, const char* arg, const at::Tensor& t, at::IntArrayRef want) {
  TORCH_CHECK(t.sizes() == want, op, ": ", arg, " must have shape ", want, ", got ", shape_str(t));
}

inline void check_device(const char* op, const char* arg, const at::Tensor& t, const at::Device& dev) {
  TORCH_CHECK(t.device() == dev, op, ": ", arg, " must be on ", dev, ", got ", t.device());
}

// rowptr: int64 (N+1,) on `device`, rowptr[0] == 0, rowptr[N] == E (values are not scanned: O(1) check).
inline void check_rowptr(const char* op, const at::Tensor& rowptr, int64_t num_edges,
                         const at::Device& device = at::kCPU) {
  check_device(op, "rowptr", rowptr, device);
  check_dtype(op, "rowptr", rowptr, at::kLong);
  check_dim(op, "rowptr", rowptr, 1);
  TORCH_CHECK(rowptr.numel() >= 1, op, ": rowptr must have N+1 >= 1 entries, got 0");
  auto first = rowptr[0].item<int64_t>(), last = rowptr[-1].item<int64_t>();
  TORCH_CHECK(first == 0 && last == num_edges, op, ": rowptr must start at 0 and end at E=", num_edges,
              ", got ", first, " and ", last);
}

}  // namespace nino_fast
