// scaled_history: a NiNo step's raw edge features in one pass over edge slots (spec:
// nino_fast/scaling.py, scaled_history_reference). Slot i holds parameter p = slots[i] (-1: none);
// its history row is r = rows[p] (or p), its scales those of tensor t = upper_bound(ends, r) (or of
// row r), and out[i] = (states[r] - shift_t) / (scale_t + eps) in float32: the operations of
// scaling.scale_rows_, so the values are bitwise the same. Elementwise, so any thread count gives
// the same bits.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <optional>

#include "utils/check.h"

namespace nino_fast {
namespace {

constexpr float kEps = 1e-6f;  // scaling.EPS, as float32 arithmetic rounds it
constexpr int64_t kGrain = 1 << 14;

struct Lookup {
  const int64_t* rows;  // parameter -> history row; null: the identity
  int64_t n_params;     // valid parameter ids: [0, n_params)
  const int64_t* ends;  // cumulative row counts of the parameter tensors; null: scales per row
  int64_t n_ends;
  int64_t n_rows;    // history rows
  int64_t n_scales;  // scale entries
};

template <typename S, typename I>
void scale_slots(const S* states, int64_t ld, int64_t c, const I* slots, int64_t n, const Lookup& k,
                 const float* scales, float* out) {
  at::parallel_for(0, n, kGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      float* y = out + i * c;
      const int64_t p = slots[i];
      if (p < 0) {
        std::fill(y, y + c, 0.f);
        continue;
      }
      NINO_CHECK(p < k.n_params, "nino_fast::scaled_history: slot value ", p,
                 " out of range of the parameters (", k.n_params, ")");
      const int64_t r = k.rows != nullptr ? k.rows[p] : p;
      NINO_CHECK(r >= 0 && r < k.n_rows, "nino_fast::scaled_history: row ", r,
                 " out of range of states (", k.n_rows, " rows)");
      const int64_t t =
          k.ends != nullptr ? std::upper_bound(k.ends, k.ends + k.n_ends, r) - k.ends : r;
      NINO_CHECK(t < k.n_scales, "nino_fast::scaled_history: row ", r, " has no scales (",
                 k.n_scales, " entries)");
      const float shift = scales[2 * t], div = scales[2 * t + 1] + kEps;
      const S* x = states + r * ld;
      for (int64_t j = 0; j < c; ++j) y[j] = (static_cast<float>(x[j]) - shift) / div;
    }
  });
}

at::Tensor scaled_history_cpu(const at::Tensor& states_in, const at::Tensor& slots_in,
                              const std::optional<at::Tensor>& rows_in, const at::Tensor& scales_in,
                              const std::optional<at::Tensor>& ends_in) {
  constexpr const char* op = "nino_fast::scaled_history";
  check_dim(op, "states", states_in, 2);
  NINO_CHECK(at::isFloatingType(states_in.scalar_type()), op,
             ": states must be floating point, got ", c10::toString(states_in.scalar_type()));
  check_dim(op, "slots", slots_in, 1);
  NINO_CHECK(slots_in.scalar_type() == at::kInt || slots_in.scalar_type() == at::kLong, op,
             ": slots must be int32 or int64, got ", c10::toString(slots_in.scalar_type()));
  check_dim(op, "scales", scales_in, 2);
  check_dtype(op, "scales", scales_in, at::kFloat);
  NINO_CHECK(scales_in.size(1) == 2, op, ": scales must be (T, 2) (shift, scale), got ",
             scales_in.size(1), " columns");
  check_device(op, "states", states_in, at::kCPU);
  check_device(op, "slots", slots_in, at::kCPU);
  check_device(op, "scales", scales_in, at::kCPU);
  const auto states = states_in.stride(1) == 1 ? states_in : states_in.contiguous();
  const auto slots = slots_in.contiguous();
  const auto scales = scales_in.contiguous();
  at::Tensor rows, ends;
  Lookup k{nullptr, states.size(0), nullptr, 0, states.size(0), scales.size(0)};
  if (rows_in.has_value()) {
    check_dim(op, "rows", *rows_in, 1);
    check_device(op, "rows", *rows_in, at::kCPU);
    rows = rows_in->to(at::kLong).contiguous();
    k.rows = rows.data_ptr<int64_t>();
    k.n_params = rows.numel();
  }
  if (ends_in.has_value()) {
    check_dim(op, "ends", *ends_in, 1);
    check_device(op, "ends", *ends_in, at::kCPU);
    check_dtype(op, "ends", *ends_in, at::kLong);
    ends = ends_in->contiguous();
    k.ends = ends.data_ptr<int64_t>();
    k.n_ends = ends.numel();
  }
  const int64_t n = slots.numel(), c = states.size(1);
  auto out = at::empty({n, c}, states.options().dtype(at::kFloat));
  if (n == 0 || c == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, states.scalar_type(), "scaled_history",
                                  [&] {
    const auto* x = states.data_ptr<scalar_t>();
    float* y = out.data_ptr<float>();
    const float* s = scales.data_ptr<float>();
    if (slots.scalar_type() == at::kInt)
      scale_slots(x, states.stride(0), c, slots.data_ptr<int32_t>(), n, k, s, y);
    else
      scale_slots(x, states.stride(0), c, slots.data_ptr<int64_t>(), n, k, s, y);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(nino_fast, CPU, m) {
  m.impl("scaled_history", &scaled_history_cpu);
}

}  // namespace nino_fast
