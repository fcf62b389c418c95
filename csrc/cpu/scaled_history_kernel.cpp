// The two ends of a NiNo step over its parameter history, each one pass over edge slots. Slot i
// holds parameter p = slots[i] (-1: none); its history row is r = rows[p] (or p) and its scales
// those of tensor t = upper_bound(ends, r) (or, without ends, of row r):
// - scaled_history: the raw edge features, out[i] = (states[r] - shift_t) / (scale_t + eps), a zero
//   row for an empty slot (spec: nino_fast/scaling.py, scaled_history_reference);
// - finish_history_: the predictions written back, result[p] = (last + delta[i] * upd) * scale_t +
//   shift_t, last the scaled last state of row r (spec: nino_fast/finish.py,
//   finish_history_reference).
// Both run the float32 operations of the tensor code they replace, one rounding each (no FMA
// contraction), so the values are bitwise the same; elementwise, so any thread count gives the same
// bits.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <optional>
#include <utility>

#include "utils/check.h"

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace nino_fast {
namespace {

constexpr float kEps = 1e-6f;  // scaling.EPS, as float32 arithmetic rounds it
constexpr int64_t kGrain = 1 << 14;

// The inputs both ops share, checked: the history (P, C) floating point (unit column stride), the
// slots (S,) int32/int64, the optional parameter -> row map, the (T, 2) float32 (shift, scale)
// table and the optional cumulative row counts of the parameter tensors.
struct History {
  const char* op;
  at::Tensor states, slots, rows, scales, ends;
  int64_t n_params = 0;

  History(const char* op_, const at::Tensor& states_in, const at::Tensor& slots_in,
          const std::optional<at::Tensor>& rows_in, const at::Tensor& scales_in,
          const std::optional<at::Tensor>& ends_in)
      : op(op_) {
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
    states = states_in.stride(1) == 1 ? states_in : states_in.contiguous();
    slots = slots_in.contiguous();
    scales = scales_in.contiguous();
    n_params = states.size(0);
    if (rows_in.has_value()) {
      check_dim(op, "rows", *rows_in, 1);
      check_device(op, "rows", *rows_in, at::kCPU);
      rows = rows_in->to(at::kLong).contiguous();
      n_params = rows.numel();
    }
    if (ends_in.has_value()) {
      check_dim(op, "ends", *ends_in, 1);
      check_device(op, "ends", *ends_in, at::kCPU);
      check_dtype(op, "ends", *ends_in, at::kLong);
      ends = ends_in->contiguous();
    }
  }

  // The raw pointers the loops read.
  struct View {
    const char* op;
    const int64_t* rows;  // null: the identity
    int64_t n_params, n_rows, n_scales, n_ends;
    const int64_t* ends;  // null: scales per row
    const float* scales;

    // (history row, scale entry) of parameter p >= 0, range-checked.
    std::pair<int64_t, int64_t> locate(int64_t p) const {
      NINO_CHECK(p < n_params, op, ": slot value ", p, " out of range of the parameters (",
                 n_params, ")");
      const int64_t r = rows != nullptr ? rows[p] : p;
      NINO_CHECK(r >= 0 && r < n_rows, op, ": row ", r, " out of range of states (", n_rows,
                 " rows)");
      const int64_t t = ends != nullptr ? std::upper_bound(ends, ends + n_ends, r) - ends : r;
      NINO_CHECK(t < n_scales, op, ": row ", r, " has no scales (", n_scales, " entries)");
      return {r, t};
    }
  };

  View view() const {
    return {op,
            rows.defined() ? rows.data_ptr<int64_t>() : nullptr,
            n_params,
            states.size(0),
            scales.size(0),
            ends.defined() ? ends.numel() : 0,
            ends.defined() ? ends.data_ptr<int64_t>() : nullptr,
            scales.data_ptr<float>()};
  }

  // fn(states data (scalar_t*), slots data (int32_t* or int64_t*)).
  template <typename Fn>
  void dispatch(const Fn& fn) const {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, states.scalar_type(), "history", [&] {
      const auto* x = states.data_ptr<scalar_t>();
      if (slots.scalar_type() == at::kInt)
        fn(x, slots.data_ptr<int32_t>());
      else
        fn(x, slots.data_ptr<int64_t>());
    });
  }
};

at::Tensor scaled_history_cpu(const at::Tensor& states_in, const at::Tensor& slots_in,
                              const std::optional<at::Tensor>& rows_in, const at::Tensor& scales_in,
                              const std::optional<at::Tensor>& ends_in) {
  const History h("nino_fast::scaled_history", states_in, slots_in, rows_in, scales_in, ends_in);
  const int64_t n = h.slots.numel(), c = h.states.size(1), ld = h.states.stride(0);
  auto out = at::empty({n, c}, h.states.options().dtype(at::kFloat));
  if (n == 0 || c == 0) return out;
  const auto k = h.view();
  float* y0 = out.data_ptr<float>();
  h.dispatch([&](const auto* states, const auto* slots) {
    at::parallel_for(0, n, kGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        float* y = y0 + i * c;
        const int64_t p = slots[i];
        if (p < 0) {
          std::fill(y, y + c, 0.f);
          continue;
        }
        const auto [r, t] = k.locate(p);
        const float shift = k.scales[2 * t], div = k.scales[2 * t + 1] + kEps;
        const auto* x = states + r * ld;
        for (int64_t j = 0; j < c; ++j) y[j] = (static_cast<float>(x[j]) - shift) / div;
      }
    });
  });
  return out;
}

int64_t finish_history_cpu(at::Tensor& result, const at::Tensor& delta_in,
                           const at::Tensor& states_in, const at::Tensor& slots_in,
                           const std::optional<at::Tensor>& rows_in, const at::Tensor& scales_in,
                           const std::optional<at::Tensor>& ends_in,
                           const std::optional<at::Tensor>& out_index_in, bool residual,
                           double upd_scale) {
  const History h("nino_fast::finish_history_", states_in, slots_in, rows_in, scales_in, ends_in);
  const char* op = h.op;
  check_dim(op, "delta", delta_in, 1);
  check_dtype(op, "delta", delta_in, at::kFloat);
  check_device(op, "delta", delta_in, at::kCPU);
  NINO_CHECK(delta_in.numel() == h.slots.numel(), op, ": delta must have one value per slot (",
             h.slots.numel(), "), got ", delta_in.numel());
  check_dim(op, "result", result, 1);
  check_device(op, "result", result, at::kCPU);
  NINO_CHECK(at::isFloatingType(result.scalar_type()) && result.is_contiguous(), op,
             ": result must be a contiguous floating-point vector");
  NINO_CHECK(!residual || h.states.size(1) > 0, op, ": a residual finish needs a last state");
  at::Tensor out_index;
  if (out_index_in.has_value()) {
    check_dim(op, "out_index", *out_index_in, 1);
    check_device(op, "out_index", *out_index_in, at::kCPU);
    out_index = out_index_in->to(at::kLong).contiguous();
  }
  const int64_t n = h.slots.numel(), last_col = h.states.size(1) - 1, ld = h.states.stride(0);
  if (n == 0) return 0;
  const auto k = h.view();
  const auto delta = delta_in.contiguous();
  const float* d = delta.data_ptr<float>();
  const float upd =
      static_cast<float>(upd_scale);  // a Python float meets float32 values as float32
  const int64_t* at_of = out_index.defined() ? out_index.data_ptr<int64_t>() : nullptr;
  const int64_t n_at = out_index.defined() ? out_index.numel() : k.n_params;
  const int64_t n_result = result.numel();
  std::atomic<int64_t> bad{0};
  h.dispatch([&](const auto* states, const auto* slots) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, result.scalar_type(), "finish_out",
                                    [&] {
      scalar_t* res = result.data_ptr<scalar_t>();
      at::parallel_for(0, n, kGrain, [&](int64_t lo, int64_t hi) {
        int64_t local = 0;
        for (int64_t i = lo; i < hi; ++i) {
          const int64_t p = slots[i];
          if (p < 0) continue;
          const auto [r, t] = k.locate(p);
          const float shift = k.scales[2 * t], scale = k.scales[2 * t + 1];
          float out = d[i];
          if (residual) {
            const float last =
                (static_cast<float>(states[r * ld + last_col]) - shift) / (scale + kEps);
            const float step = d[i] * upd;
            out = last + step;
          }
          local += !std::isfinite(out);
          const float scaled = out * scale;
          const float value = scaled + shift;
          NINO_CHECK(p < n_at, op, ": parameter ", p, " has no out_index entry");
          const int64_t at = at_of != nullptr ? at_of[p] : p;
          NINO_CHECK(at >= 0 && at < n_result, op, ": parameter ", p, " writes result[", at,
                     "], out of range (", n_result, ")");
          res[at] = static_cast<scalar_t>(value);
        }
        bad += local;
      });
    });
  });
  return bad.load();
}

}  // namespace

TORCH_LIBRARY_IMPL(nino_fast, CPU, m) {
  m.impl("scaled_history", &scaled_history_cpu);
  m.impl("finish_history_", &finish_history_cpu);
}

}  // namespace nino_fast
