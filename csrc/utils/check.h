// Input checks shared by the kernels: every message names the op, the argument, what was expected and
// what was received.
#pragma once

#include <torch/types.h>

#include <string>

namespace nino_fast {

// Numbers are formatted with std::to_string, not iostreams: on a runtime whose process-wide libstdc++
// differs from the compiler's (seen on the H100 image: Python 3.12 + torch 2.11), inserting an integer
// into a stream from this library crashed while raising the error; strings stream safely.
inline std::string num_str(int64_t v) { return std::to_string(v); }

inline std::string shape_str(at::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + "]";
}

inline std::string shape_str(const at::Tensor& t) { return shape_str(t.sizes()); }

inline void check_dtype(const char* op, const char* arg, const at::Tensor& t, at::ScalarType want) {
  TORCH_CHECK(t.scalar_type() == want, op, ": ", arg, " must be ", c10::toString(want), ", got ",
              c10::toString(t.scalar_type()));
}

inline void check_dim(const char* op, const char* arg, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, op, ": ", arg, " must be ", num_str(dim), "-D, got shape ", shape_str(t));
}

inline void check_shape(const char* op, const char* arg, const at::Tensor& t, at::IntArrayRef want) {
  TORCH_CHECK(t.sizes() == want, op, ": ", arg, " must have shape ", shape_str(want), ", got ",
              shape_str(t));
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
  TORCH_CHECK(first == 0 && last == num_edges, op, ": rowptr must start at 0 and end at E=",
              num_str(num_edges), ", got ", num_str(first), " and ", num_str(last));
}

}  // namespace nino_fast
