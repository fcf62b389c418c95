// C++ test of the fused CPU ops nino_fast::film_mean, edge_mlp and edge_film_mean through the
// dispatcher (libtorch, no Python): against a plain ATen reference in float64 (the maths of
// nino_fast/ops/reference.py) on destination-sorted CSR graphs with empty rows, one edge, a row of
// 5000 in-edges, no edges at all and a larger graph; feature widths C = 5, 37, 128 and hidden /
// output widths D = 128, 19 (not a multiple of 16: masked tails); with and without etype +
// type_table, and edge_mlp with and without its node gathers and act_out. Every result must also be
// bitwise the same on 1 and 2 threads, and a FiLM op's rows the same when they are computed alone.
// Exits nonzero on any failure.
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  std::printf("%s: %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

// Runs fn, counting an exception as a failure of `what` instead of ending the test.
void guarded(const std::string& what, const std::function<void()>& fn) {
  try {
    fn();
  } catch (const std::exception& e) {
    expect(false, what + ": threw " + e.what());
  }
}

using T = at::Tensor;
using OptT = std::optional<at::Tensor>;

// ---- the ops, through the dispatcher ----
T film_mean(const T& feat, const T& rowptr, const T& src, const T& node_dst, const T& node_src,
            const T& weight, const T& bias, const OptT& etype, const OptT& type_table) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("nino_fast::film_mean", "")
                       .typed<T(const T&, const T&, const T&, const T&, const T&, const T&,
                                const T&, const OptT&, const OptT&, const OptT&)>();
  return op.call(feat, rowptr, src, node_dst, node_src, weight, bias, etype, type_table,
                 std::nullopt);
}

T edge_mlp(const T& feat, const T& src, const T& dst, const T& weight_a, const T& bias_a,
           const T& weight_b, const T& bias_b, const OptT& etype, const OptT& type_table,
           const OptT& node_src, const OptT& node_dst, const OptT& node_src2, const OptT& node_dst2,
           bool act_out, const OptT& weight_c = std::nullopt, const OptT& bias_c = std::nullopt,
           const OptT& weight_d = std::nullopt, const OptT& bias_d = std::nullopt) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("nino_fast::edge_mlp", "")
          .typed<T(const T&, const T&, const T&, const T&, const T&, const T&, const T&,
                   const OptT&, const OptT&, const OptT&, const OptT&, const OptT&, const OptT&,
                   bool, const OptT&, const OptT&, const OptT&, const OptT&)>();
  return op.call(feat, src, dst, weight_a, bias_a, weight_b, bias_b, etype, type_table, node_src,
                 node_dst, node_src2, node_dst2, act_out, weight_c, bias_c, weight_d, bias_d);
}

T edge_film_mean(const T& feat, const T& rowptr, const T& src, const T& weight_a, const T& bias_a,
                 const OptT& etype, const OptT& type_table, const T& node_src, const T& node_dst,
                 const T& msg_dst, const T& msg_src, const T& weight_scale, const T& bias_scale,
                 const T& weight_shift, const T& bias_shift) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("nino_fast::edge_film_mean", "")
                       .typed<T(const T&, const T&, const T&, const T&, const T&, const OptT&,
                                const OptT&, const T&, const T&, const T&, const T&, const T&,
                                const T&, const T&, const T&, const OptT&)>();
  return op.call(feat, rowptr, src, weight_a, bias_a, etype, type_table, node_src, node_dst,
                 msg_dst, msg_src, weight_scale, bias_scale, weight_shift, bias_shift,
                 std::nullopt);
}

// ---- the specification in float64, as plainly as possible ----
T f64(const T& t) {
  return t.to(at::kDouble);
}

// (E,) destination row of every CSR edge.
T csr_dst(const T& rowptr) {
  const int64_t n = rowptr.numel() - 1;
  const T deg = rowptr.slice(0, 1) - rowptr.slice(0, 0, n);
  return at::repeat_interleave(at::arange(n, at::kLong), deg);
}

// (N, D) mean of msg over each CSR row, 0 for a row without edges.
T segment_mean_ref(const T& msg, const T& rowptr) {
  const int64_t n = rowptr.numel() - 1;
  T out = at::zeros({n, msg.size(1)}, msg.options());
  out.index_add_(0, csr_dst(rowptr), msg);
  const T deg = (rowptr.slice(0, 1) - rowptr.slice(0, 0, n)).clamp_min(1).to(at::kDouble);
  return out / deg.unsqueeze(1);
}

// W x + b (+ table[etype])
T affine_ref(const T& x, const T& w, const T& b, const OptT& etype, const OptT& table) {
  T out = at::linear(x, f64(w), f64(b));
  if (table) out = out + f64(*table).index_select(0, *etype);
  return out;
}

T film_mean_ref(const T& feat, const T& rowptr, const T& src, const T& nd, const T& ns, const T& w,
                const T& b, const OptT& etype, const OptT& table) {
  const int64_t d = nd.size(1);
  const T enc = affine_ref(f64(feat), w, b, etype, table);
  const T dst = csr_dst(rowptr), s = src.to(at::kLong);
  const T msg = enc.slice(1, 0, d) * (f64(nd).index_select(0, dst) + f64(ns).index_select(0, s)) +
                enc.slice(1, d);
  return segment_mean_ref(msg, rowptr);
}

T edge_mlp_ref(const T& feat, const T& src, const T& dst, const T& wa, const T& ba, const T& wb,
               const T& bb, const OptT& etype, const OptT& table, const OptT& ns, const OptT& nd,
               const OptT& ns2, const OptT& nd2, bool act_out) {
  const T s = src.to(at::kLong), t = dst.to(at::kLong);
  T h = affine_ref(f64(feat), wa, ba, etype, table);
  if (ns) h = h + f64(*ns).index_select(0, s) + f64(*nd).index_select(0, t);
  T out = at::linear(at::silu(h), f64(wb), f64(bb));
  if (ns2) out = out + f64(*ns2).index_select(0, s) + f64(*nd2).index_select(0, t);
  return act_out ? at::silu(out) : out;
}

T edge_film_mean_ref(const T& feat, const T& rowptr, const T& src, const T& wa, const T& ba,
                     const OptT& etype, const OptT& table, const T& ns, const T& nd, const T& md,
                     const T& ms, const T& wsc, const T& bsc, const T& wsh, const T& bsh) {
  const T dst = csr_dst(rowptr), s = src.to(at::kLong);
  const T h = at::silu(affine_ref(f64(feat), wa, ba, etype, table) + f64(ns).index_select(0, s) +
                       f64(nd).index_select(0, dst));
  const T msg = at::linear(h, f64(wsc), f64(bsc)) *
                    (f64(md).index_select(0, dst) + f64(ms).index_select(0, s)) +
                at::linear(h, f64(wsh), f64(bsh));
  return segment_mean_ref(msg, rowptr);
}

// The magnitude of the terms summed into each edge_mlp output: the same maths on absolute values
// (|silu(x)| <= |x|). A float32 sum's error is bounded relative to it, not to the result, which can
// cancel to near zero: what a check of a narrow output (one value per edge) must allow for.
T edge_mlp_terms(const T& feat, const T& src, const T& dst, const T& wa, const T& ba, const T& wb,
                 const T& bb, const OptT& etype, const OptT& table, const OptT& ns, const OptT& nd,
                 const OptT& ns2, const OptT& nd2) {
  const T s = src.to(at::kLong), t = dst.to(at::kLong);
  const OptT tab = table ? OptT(table->abs()) : std::nullopt;
  T h = affine_ref(f64(feat).abs(), wa.abs(), ba.abs(), etype, tab);
  if (ns) h = h + f64(*ns).abs().index_select(0, s) + f64(*nd).abs().index_select(0, t);
  T out = at::linear(h, f64(wb).abs(), f64(bb).abs());
  if (ns2) out = out + f64(*ns2).abs().index_select(0, s) + f64(*nd2).abs().index_select(0, t);
  return out;
}

// ---- graphs and inputs ----
struct Graph {
  std::string name;
  int64_t n = 0;
  T rowptr, src, dst;  // rowptr Long (N+1); src, dst Int (E)
};

// Destination-sorted CSR from (unsorted) destinations; random sources.
Graph make_graph(const std::string& name, int64_t n, T dst) {
  dst = std::get<0>(dst.sort());
  Graph g;
  g.name = name;
  g.n = n;
  g.rowptr = at::zeros({n + 1}, at::kLong);
  if (n > 0) g.rowptr.slice(0, 1) = at::bincount(dst, {}, n).cumsum(0);
  g.src = at::randint(0, std::max<int64_t>(n, 1), {dst.numel()}, at::kLong).to(at::kInt);
  g.dst = dst.to(at::kInt);
  return g;
}

int64_t num_edges(const Graph& g) {
  return g.src.numel();
}

int64_t empty_rows(const Graph& g) {
  if (g.n == 0) return 0;
  return (g.rowptr.slice(0, 1) == g.rowptr.slice(0, 0, g.n)).sum().item<int64_t>();
}

struct Inputs {
  T feat, etype, table2, table, table_b, nd, ns, nd2, ns2, w2, b2, wa, ba, wb, bb, wsc, bsc, wsh,
      bsh, md, ms;
};

// float32 inputs (0.5 randn); the reference reads the same values in float64. d: hidden width,
// dout: edge_mlp's and edge_film_mean's output width.
Inputs make_inputs(const Graph& g, int64_t c, int64_t d, int64_t dout) {
  constexpr int64_t kTypes = 15;
  const int64_t e = num_edges(g), n = g.n;
  auto r = [](std::vector<int64_t> shape) {
    return (at::randn(shape, at::kDouble) * 0.5).to(at::kFloat);
  };
  Inputs in;
  in.feat = r({e, c});
  in.etype = at::randint(0, kTypes, {e}, at::kLong);
  in.table2 = r({kTypes, 2 * d});
  in.table = r({kTypes, d});
  in.nd = r({n, d});
  in.ns = r({n, d});
  in.nd2 = r({n, dout});
  in.ns2 = r({n, dout});
  in.w2 = r({2 * d, c});
  in.b2 = r({2 * d});
  in.wa = r({d, c});
  in.ba = r({d});
  in.wb = r({dout, d});
  in.bb = r({dout});
  in.wsc = r({dout, d});
  in.bsc = r({dout});
  in.wsh = r({dout, d});
  in.bsh = r({dout});
  in.md = r({n, dout});
  in.ms = r({n, dout});
  return in;
}

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), f, v);
  return buf;
}

constexpr double kTol = 1e-5;  // max abs error / max abs of the reference

void check_close(const std::string& what, const T& got, const T& want) {
  if (got.scalar_type() != at::kFloat || got.sizes() != want.sizes()) {
    expect(false, what + ": wrong dtype or shape");
    return;
  }
  double err = 0, scale = 0;
  if (want.numel() > 0) {
    scale = want.abs().max().item<double>();
    err = (f64(got) - want).abs().max().item<double>();
  }
  // err <= 0 for an all-zero reference (rows without edges must be exactly 0); NaN fails
  const bool ok = err <= kTol * scale;
  expect(ok, what + ": rel err " + fmt("%.2e", scale > 0 ? err / scale : err));
}

// Element by element: |got - want| <= kTol * terms (edge_mlp_terms).
void check_close_terms(const std::string& what, const T& got, const T& want, const T& terms) {
  if (got.scalar_type() != at::kFloat || got.sizes() != want.sizes()) {
    expect(false, what + ": wrong dtype or shape");
    return;
  }
  const T excess = (f64(got) - want).abs() - kTol * terms;  // NaN stays NaN: fails below
  const bool ok = want.numel() == 0 || excess.max().item<double>() <= 0;
  const double worst = want.numel() ? ((f64(got) - want).abs() / terms).max().item<double>() : 0;
  expect(ok, what + ": error / term magnitude " + fmt("%.2e", worst));
}

// fn() on 1 and on 2 threads: the same bits. Returns the 1-thread result.
T on_1_and_2_threads(const std::string& what, const std::function<T()>& fn) {
  at::set_num_threads(1);
  T one = fn();
  at::set_num_threads(2);
  T two = fn();
  expect(torch::equal(one, two), what + ": 1 thread == 2 threads bitwise");
  return one;
}

std::string shape_name(const Graph& g, int64_t c, int64_t d, int64_t dout) {
  return g.name + " (N=" + std::to_string(g.n) + ", E=" + std::to_string(num_edges(g)) +
         ") C=" + std::to_string(c) + " D=" + std::to_string(d) + " Dout=" + std::to_string(dout);
}

// Rows [a, b) of a FiLM op, computed alone: the kernels group each row's sums by the row alone, so
// the rows must come out bitwise as in the whole graph.
struct RowSlice {
  int64_t a, b, ea, eb;
  T rowptr;
};

RowSlice row_slice(const Graph& g, int64_t a, int64_t b) {
  RowSlice s{a, b, g.rowptr[a].item<int64_t>(), g.rowptr[b].item<int64_t>(), T()};
  s.rowptr = g.rowptr.slice(0, a, b + 1) - s.ea;
  return s;
}

void test_film_mean(const Graph& g, const Inputs& in, int64_t c, int64_t d, bool table) {
  const std::string what = "film_mean " + shape_name(g, c, d, d) + (table ? " +table" : "");
  const OptT et = table ? OptT(in.etype) : std::nullopt;
  const OptT tb = table ? OptT(in.table2) : std::nullopt;
  guarded(what, [&] {
    const T got = on_1_and_2_threads(what, [&] {
      return film_mean(in.feat, g.rowptr, g.src, in.nd, in.ns, in.w2, in.b2, et, tb);
    });
    check_close(what, got,
                film_mean_ref(in.feat, g.rowptr, g.src, in.nd, in.ns, in.w2, in.b2, et, tb));
    if (g.n >= 3) {
      const RowSlice s = row_slice(g, g.n / 3, 2 * g.n / 3 + 1);
      const OptT se = table ? OptT(in.etype.slice(0, s.ea, s.eb)) : std::nullopt;
      const T part = film_mean(in.feat.slice(0, s.ea, s.eb), s.rowptr, g.src.slice(0, s.ea, s.eb),
                               in.nd.slice(0, s.a, s.b), in.ns, in.w2, in.b2, se, tb);
      expect(torch::equal(part, got.slice(0, s.a, s.b)),
             what + ": rows computed alone == in the whole graph bitwise");
    }
  });
}

void test_edge_film_mean(const Graph& g, const Inputs& in, int64_t c, int64_t d, int64_t dout,
                         bool table) {
  const std::string what = "edge_film_mean " + shape_name(g, c, d, dout) + (table ? " +table" : "");
  const OptT et = table ? OptT(in.etype) : std::nullopt;
  const OptT tb = table ? OptT(in.table) : std::nullopt;
  guarded(what, [&] {
    const T got = on_1_and_2_threads(what, [&] {
      return edge_film_mean(in.feat, g.rowptr, g.src, in.wa, in.ba, et, tb, in.ns, in.nd, in.md,
                            in.ms, in.wsc, in.bsc, in.wsh, in.bsh);
    });
    check_close(what, got,
                edge_film_mean_ref(in.feat, g.rowptr, g.src, in.wa, in.ba, et, tb, in.ns, in.nd,
                                   in.md, in.ms, in.wsc, in.bsc, in.wsh, in.bsh));
    if (g.n >= 3) {
      const RowSlice s = row_slice(g, g.n / 3, 2 * g.n / 3 + 1);
      const OptT se = table ? OptT(in.etype.slice(0, s.ea, s.eb)) : std::nullopt;
      const T part =
          edge_film_mean(in.feat.slice(0, s.ea, s.eb), s.rowptr, g.src.slice(0, s.ea, s.eb), in.wa,
                         in.ba, se, tb, in.ns, in.nd.slice(0, s.a, s.b), in.md.slice(0, s.a, s.b),
                         in.ms, in.wsc, in.bsc, in.wsh, in.bsh);
      expect(torch::equal(part, got.slice(0, s.a, s.b)),
             what + ": rows computed alone == in the whole graph bitwise");
    }
  });
}

// edge_mlp's optional parts: etype + type_table, node_src + node_dst, node_src2 + node_dst2,
// act_out; `shuffled` runs it on the edges in a random order (it takes any edge list).
struct MlpVariant {
  bool table, nodes, nodes2, act_out, shuffled;
};

void test_edge_mlp(const Graph& g, const Inputs& in, int64_t c, int64_t d, int64_t dout,
                   const MlpVariant& v) {
  std::string what = "edge_mlp " + shape_name(g, c, d, dout);
  if (v.table) what += " +table";
  if (v.nodes) what += " +node_src/dst";
  if (v.nodes2) what += " +node_src2/dst2";
  if (v.act_out) what += " +act_out";
  if (v.shuffled) what += " (edges shuffled)";
  T feat = in.feat, src = g.src, dst = g.dst, etype = in.etype;
  if (v.shuffled) {
    const T perm = at::randperm(num_edges(g), at::kLong);
    feat = feat.index_select(0, perm), src = src.index_select(0, perm);
    dst = dst.index_select(0, perm), etype = etype.index_select(0, perm);
  }
  const OptT et = v.table ? OptT(etype) : std::nullopt;
  const OptT tb = v.table ? OptT(in.table) : std::nullopt;
  const OptT ns = v.nodes ? OptT(in.ns) : std::nullopt, nd = v.nodes ? OptT(in.nd) : std::nullopt;
  const OptT ns2 = v.nodes2 ? OptT(in.ns2) : std::nullopt;
  const OptT nd2 = v.nodes2 ? OptT(in.nd2) : std::nullopt;
  guarded(what, [&] {
    const T got = on_1_and_2_threads(what, [&] {
      return edge_mlp(feat, src, dst, in.wa, in.ba, in.wb, in.bb, et, tb, ns, nd, ns2, nd2,
                      v.act_out);
    });
    const T want = edge_mlp_ref(feat, src, dst, in.wa, in.ba, in.wb, in.bb, et, tb, ns, nd, ns2,
                                nd2, v.act_out);
    if (dout >= 16) return check_close(what, got, want);
    // a narrow output (a few values per edge) can cancel to near zero: judged against its terms
    check_close_terms(
        what, got, want,
        edge_mlp_terms(feat, src, dst, in.wa, in.ba, in.wb, in.bb, et, tb, ns, nd, ns2, nd2));
  });
}

// edge_mlp's readout layers (weight_c, then weight_d of width dd: a dot product when at most 4 wide
// and plain) in one call == the two-layer call with act_out followed by a second call on its
// output, bitwise: every layer's tile runs the same FMA sequence either way.
void test_edge_mlp_readout(const Graph& g, const Inputs& in, int64_t c, int64_t d, int64_t dout,
                           int64_t dd, bool act_out) {
  const std::string what = "edge_mlp readout " + shape_name(g, c, d, dout) + " -> " +
                           std::to_string(dd) + (act_out ? " +act_out" : "");
  auto r = [](std::vector<int64_t> shape) {
    return (at::randn(shape, at::kDouble) * 0.3).to(at::kFloat);
  };
  const T wc = r({d, dout}), bc = r({d}), wd = r({dd, d}), bd = r({dd});
  guarded(what, [&] {
    const T got = on_1_and_2_threads(what, [&] {
      return edge_mlp(in.feat, g.src, g.dst, in.wa, in.ba, in.wb, in.bb, in.etype, in.table, in.ns,
                      in.nd, in.ns2, in.nd2, act_out, wc, bc, wd, bd);
    });
    const T h = edge_mlp(in.feat, g.src, g.dst, in.wa, in.ba, in.wb, in.bb, in.etype, in.table,
                         in.ns, in.nd, in.ns2, in.nd2, true);
    const T want = edge_mlp(h, g.src, g.dst, wc, bc, wd, bd, std::nullopt, std::nullopt,
                            std::nullopt, std::nullopt, std::nullopt, std::nullopt, act_out);
    expect(torch::equal(got, want), what + ": == two calls bitwise");
  });
}

void test_graph(const Graph& g, const std::vector<std::pair<int64_t, int64_t>>& widths) {
  for (const auto& [c, d] : widths) {
    const int64_t other = d == 128 ? 19 : 128;  // a second output width
    for (const int64_t dout : {d, other}) {
      const Inputs in = make_inputs(g, c, d, dout);
      if (dout == d) {
        test_film_mean(g, in, c, d, false);
        test_film_mean(g, in, c, d, true);
      }
      test_edge_film_mean(g, in, c, d, dout, dout == d);
      test_edge_film_mean(g, in, c, d, dout, dout != d);
      const std::vector<MlpVariant> variants =
          dout == d ? std::vector<MlpVariant>{{false, false, false, false, false},
                                              {true, true, false, false, false},
                                              {false, true, false, true, true}}
                    : std::vector<MlpVariant>{{false, false, true, true, false},
                                              {true, true, true, true, true},
                                              {true, false, true, false, false}};
      for (const auto& v : variants) test_edge_mlp(g, in, c, d, dout, v);
      test_edge_mlp_readout(g, in, c, d, dout, 1, false);
      test_edge_mlp_readout(g, in, c, d, dout, dout, true);
    }
    // narrow outputs (the model's head: one per feature slot): plain ones run as dot products,
    // with node_src2/dst2 or act_out as a GEMM
    for (const int64_t dout : {int64_t(1), int64_t(3)}) {
      const Inputs in = make_inputs(g, c, d, dout);
      for (const MlpVariant& v :
           {MlpVariant{false, false, false, false, false},
            MlpVariant{true, true, false, false, true}, MlpVariant{false, true, true, true, false}})
        test_edge_mlp(g, in, c, d, dout, v);
    }
  }
}

}  // namespace

int main() {
  const auto start = std::chrono::steady_clock::now();
  torch::manual_seed(0);
  const auto i64 = at::kLong;

  // rows 0, N-1 and every row = 3 (mod 5) without in-edges
  T dst = at::randint(1, 199, {900}, i64);
  dst = at::where(dst.remainder(5) == 3, dst - 1, dst);
  const Graph random_graph = make_graph("random graph with empty rows", 200, dst);
  expect(empty_rows(random_graph) >= 40,
         "random graph has empty rows (" + std::to_string(empty_rows(random_graph)) + ")");
  // a row of 5000 in-edges starting mid-tile, between ordinary rows
  const Graph heavy =
      make_graph("row 17 with 5000 in-edges", 40,
                 at::cat({at::randint(0, 40, {300}, i64), at::full({5000}, 17, i64)}));
  const Graph one = make_graph("one edge", 1, at::zeros({1}, i64));
  const Graph one_mid = make_graph("one edge between empty rows", 3, at::ones({1}, i64));
  const Graph no_edges = make_graph("no edges", 4, at::zeros({0}, i64));
  const Graph empty = make_graph("empty graph", 0, at::zeros({0}, i64));
  const Graph large = make_graph("larger graph", 3000, at::randint(0, 3000, {30000}, i64));

  const std::vector<std::pair<int64_t, int64_t>> all_widths = {{5, 128}, {37, 128}, {128, 128},
                                                               {5, 19},  {37, 19},  {128, 19}};
  for (const Graph* g : {&random_graph, &heavy, &one, &one_mid, &no_edges, &empty})
    test_graph(*g, all_widths);
  test_graph(large, {{37, 19}, {128, 128}});

  // rows without edges are exactly zero (a pooled output buffer is not zeroed by the allocator)
  {
    const Inputs in = make_inputs(random_graph, 37, 19, 19);
    const T out = film_mean(in.feat, random_graph.rowptr, random_graph.src, in.nd, in.ns, in.w2,
                            in.b2, in.etype, in.table2);
    const T is_empty = random_graph.rowptr.slice(0, 1) == random_graph.rowptr.slice(0, 0, -1);
    expect(out.index_select(0, at::nonzero(is_empty).squeeze(1)).abs().sum().item<float>() == 0.f,
           "empty rows are exactly 0");
  }

  // bad input is an error, never an out-of-bounds read: src into a node_src without rows, a float
  // etype
  {
    std::string err;
    try {
      film_mean(at::randn({5, 3}), at::tensor({0, 2, 5}, i64),
                at::tensor({0, 1, 1, 0, 1}, at::kInt), at::randn({2, 4}), at::randn({0, 4}),
                at::randn({8, 3}), at::randn({8}), {}, {});
    } catch (const std::exception& e) {
      err = e.what();
    }
    expect(err.find("src values must index node_src's 0 rows") != std::string::npos,
           "film_mean: src into an empty node_src is an error");
    err.clear();
    const Inputs in = make_inputs(random_graph, 37, 19, 19);
    try {
      film_mean(in.feat, random_graph.rowptr, random_graph.src, in.nd, in.ns, in.w2, in.b2,
                at::zeros({random_graph.src.numel()}), at::randn({3, 38}));
    } catch (const std::exception& e) {
      err = e.what();
    }
    expect(err.find("etype must be an integer tensor") != std::string::npos,
           "film_mean: a float etype is an error");
  }

  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("%s (%.1f s)\n", failures ? "FAILED" : "OK", secs);
  return failures ? EXIT_FAILURE : EXIT_SUCCESS;
}
