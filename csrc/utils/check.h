// Input checks shared by the kernels: every message names the op, the argument, what was expected
// and what was received.
#pragma once

#include <torch/types.h>

#include <string>
#include <type_traits>

namespace nino_fast {

// Error messages are built here as one std::string, never through iostreams: on a runtime whose
// process-wide libstdc++ differs from the compiler's (seen on the H100 image: Python 3.12 +
// torch 2.11), inserting an integer or a c10::Device into a stream from this library segfaulted
// while raising the error. TORCH_CHECK with a single std::string message does not touch a stream.
// Use NINO_CHECK (same arguments as TORCH_CHECK) everywhere in csrc/.
inline std::string num_str(int64_t v) {
  return std::to_string(v);
}

namespace detail {
inline std::string to_msg(const char* s) {
  return s;
}
inline std::string to_msg(const std::string& s) {
  return s;
}
inline std::string to_msg(char c) {
  return std::string(1, c);
}
inline std::string to_msg(bool b) {
  return b ? "true" : "false";
}
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline std::string to_msg(T v) {
  return std::to_string(v);
}
inline std::string to_msg(const c10::Device& d) {
  return d.str();
}
inline std::string to_msg(c10::ScalarType t) {
  return c10::toString(t);
}

template <typename... Args>
inline std::string cat(const Args&... args) {
  std::string s;
  ((s += to_msg(args)), ...);
  return s;
}
}  // namespace detail

#define NINO_CHECK(cond, ...) TORCH_CHECK(cond, ::nino_fast::detail::cat(__VA_ARGS__))

inline std::string shape_str(at::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + "]";
}

inline std::string shape_str(const at::Tensor& t) {
  return shape_str(t.sizes());
}

inline void check_dtype(const char* op, const char* arg, const at::Tensor& t, at::ScalarType want) {
  NINO_CHECK(t.scalar_type() == want, op, ": ", arg, " must be ", c10::toString(want), ", got ",
             c10::toString(t.scalar_type()));
}

inline void check_dim(const char* op, const char* arg, const at::Tensor& t, int64_t dim) {
  NINO_CHECK(t.dim() == dim, op, ": ", arg, " must be ", num_str(dim), "-D, got shape ",
             shape_str(t));
}

inline void check_shape(const char* op, const char* arg, const at::Tensor& t,
                        at::IntArrayRef want) {
  NINO_CHECK(t.sizes() == want, op, ": ", arg, " must have shape ", shape_str(want), ", got ",
             shape_str(t));
}

inline void check_device(const char* op, const char* arg, const at::Tensor& t,
                         const at::Device& dev) {
  NINO_CHECK(t.device() == dev, op, ": ", arg, " must be on ", dev, ", got ", t.device());
}

// rowptr: int64 (N+1,) on `device`, rowptr[0] == 0, rowptr[N] == E (values are not scanned: O(1)
// check).
inline void check_rowptr(const char* op, const at::Tensor& rowptr, int64_t num_edges,
                         const at::Device& device = at::kCPU) {
  check_device(op, "rowptr", rowptr, device);
  check_dtype(op, "rowptr", rowptr, at::kLong);
  check_dim(op, "rowptr", rowptr, 1);
  NINO_CHECK(rowptr.numel() >= 1, op, ": rowptr must have N+1 >= 1 entries, got 0");
  auto first = rowptr[0].item<int64_t>(), last = rowptr[-1].item<int64_t>();
  NINO_CHECK(first == 0 && last == num_edges, op,
             ": rowptr must start at 0 and end at E=", num_str(num_edges), ", got ", num_str(first),
             " and ", num_str(last));
  NINO_CHECK(rowptr.numel() < 2 || !at::any(rowptr.diff() < 0).item<bool>(), op,
             ": rowptr must be non-decreasing (a CSR of edges sorted by destination)");
}

// segment_mean_csr's inputs, checked the same on every device: src (E, D) floating point, rowptr a
// CSR of E edges on src's device; both returned contiguous.
struct SegmentMeanInputs {
  at::Tensor src, rowptr;
};
inline SegmentMeanInputs segment_mean_inputs(const char* op, const at::Tensor& src,
                                             const at::Tensor& rowptr) {
  check_dim(op, "src", src, 2);
  NINO_CHECK(at::isFloatingType(src.scalar_type()), op, ": src must be floating point, got ",
             c10::toString(src.scalar_type()));
  check_device(op, "rowptr", rowptr, src.device());
  SegmentMeanInputs in{src.contiguous(), rowptr.contiguous()};
  check_rowptr(op, in.rowptr, in.src.size(0), in.src.device());
  return in;
}

// An edge index vector (src, dst): (len,) int32, or int64 with values that fit int32 (PyG's
// edge_index dtype), as int32 contiguous: the kernels read 4-byte indices.
inline at::Tensor as_index32(const char* op, const char* arg, const at::Tensor& t, int64_t len) {
  check_dim(op, arg, t, 1);
  NINO_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, op, ": ", arg,
             " must be int32 or int64, got ", t.scalar_type());
  NINO_CHECK(t.numel() == len, op, ": ", arg, " must have E=", num_str(len), " entries, got ",
             num_str(t.numel()));
  if (t.scalar_type() == at::kInt) return t.contiguous();
  NINO_CHECK(
      len == 0 || (t.min().item<int64_t>() >= INT32_MIN && t.max().item<int64_t>() <= INT32_MAX),
      op, ": ", arg, " values must fit int32");
  return t.to(at::kInt).contiguous();
}

// feat_index (optional, (E,) int32 / int64): a permutation of 0..E-1, CSR edge p reading feat row
// feat_index[p]. A permutation, not any gather: the feature gradient is put back in feat's order by
// the inverse permutation, which only a one-to-one index has.
inline void check_feat_index(const char* op, const at::Tensor& idx, int64_t num_edges,
                             const at::Device& device) {
  check_device(op, "feat_index", idx, device);
  check_dim(op, "feat_index", idx, 1);
  NINO_CHECK(idx.scalar_type() == at::kLong || idx.scalar_type() == at::kInt, op,
             ": feat_index must be int64 or int32, got ", idx.scalar_type());
  NINO_CHECK(idx.numel() == num_edges, op,
             ": feat_index must have one entry per edge (E=", num_str(num_edges), "), got ",
             num_str(idx.numel()));
  if (num_edges == 0) return;
  auto seen = at::zeros({num_edges}, idx.options().dtype(at::kInt));
  const bool in_range = idx.min().item<int64_t>() >= 0 && idx.max().item<int64_t>() < num_edges;
  NINO_CHECK(
      in_range && seen.index_fill_(0, idx.to(at::kLong), 1).sum().item<int64_t>() == num_edges, op,
      ": feat_index must be a permutation of 0..E-1 (E=", num_str(num_edges), ")");
}

}  // namespace nino_fast
