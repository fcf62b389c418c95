// CPU edge_mlp: out = W_b silu(W_a e + b_a + table[t] + s[src] + t[dst]) + b_b (+ s2[src] +
// t2[dst]), then the optional readout layers W_c silu(.) + b_c and W_d silu(.) + b_d, optionally
// SiLU (spec: reference.edge_mlp). Tiles of edges claimed dynamically (no reduction); every GEMM
// applies its epilogue in registers and each layer's tile stays in L1/L2 for the next one: only the
// input rows and the last layer's output touch memory.
#include <torch/library.h>

#include "cpu/edge_mlp_common.h"

namespace nino_fast::cpu {
namespace {

constexpr int64_t kDotOut = 4;  // last layers this narrow (and plain) run as dot products
// Outputs above this size are written with non-temporal stores: past a typical L3 share, their
// consumer reads them from memory anyway, and the stores skip each line's read for ownership.
constexpr int64_t kStreamOutBytes = int64_t(32) << 20;

// A layer after the first, on a tile of its input rows (leading dimension = the input's padded
// width): a packed GEMM, or -- when it is the last, plain and at most kDotOut wide (the model's
// head: one output per feature slot) -- dot products over each input row, not a GEMM whose panel
// would be 16 columns wide.
struct Layer {
  int64_t rows = 0, k = 0;  // the weight's shape
  Floats bias;              // zero-padded
  bool dot = false;
  PackedB packed;  // GEMM layers
  Floats wrows;    // dot layers: the rows zero-padded to padded(k)

  Layer() = default;
  // weight (rows, k) row-major, bias (rows,)
  Layer(const at::Tensor& weight, const at::Tensor& b_, bool last_plain)
      : rows(weight.size(0)),
        k(weight.size(1)),
        bias(padded_copy(b_)),
        dot(last_plain && rows <= kDotOut) {
    const float* w = weight.data_ptr<float>();
    if (!dot) {
      packed = PackedB(w, rows, k);
      return;
    }
    const int64_t kp = padded(k);
    wrows.assign(rows * kp, 0.f);
    for (int64_t j = 0; j < rows; ++j)
      std::copy(w + j * k, w + (j + 1) * k, wrows.begin() + j * kp);
  }

  // y rows [0, m) (leading dimension `rows`) = this dot layer on the input tile `in`
  void dots(const float* in, int64_t m, float* y) const {
    const int64_t kp = padded(k);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < rows; ++j)
        y[i * rows + j] = dot_padded(in + i * kp, wrows.data() + j * kp, kp) + bias[j];
  }
};

at::Tensor edge_mlp_cpu(const EdgeMlpArgs& a) {
  constexpr const char* op = "nino_fast::edge_mlp";
  const EdgeMlpInputs in(op, a);
  const auto& feat = in.feat;
  const auto &src = in.src, &dst = in.dst;
  const AffineStage& stage = in.stage;
  const int64_t e_total = in.e_total, c = in.c, dh = in.dh, dout = in.dout;
  const int64_t d_final = in.out_width();
  auto out = pooled_empty({e_total, d_final}, feat.options());
  if (e_total == 0 || d_final == 0) return out;

  const float* x = feat.data_ptr<float>();
  const int32_t *s = src.data_ptr<int32_t>(), *t = dst.data_ptr<int32_t>();
  const float *pns = in.ptr(in.ns), *pnd = in.ptr(in.nd);
  const float *pns2 = in.ptr(in.ns2), *pnd2 = in.ptr(in.nd2);
  float* y = out.data_ptr<float>();
  const bool act_out = a.act_out;
  // Layers b, c, d; the last one writes y (with SiLU if act_out), the others a tile of SiLU'd rows.
  std::vector<Layer> layers;
  const at::Tensor* ws[3][2] = {{&in.wb, &in.bb}, {&in.wc, &in.bc}, {&in.wd, &in.bd}};
  const int n_layers = in.wd.defined() ? 3 : in.wc.defined() ? 2 : 1;
  for (int l = 0; l < n_layers; ++l)
    layers.emplace_back(*ws[l][0], *ws[l][1], l == n_layers - 1 && !act_out && !(l == 0 && pns2));
  const int64_t nph = padded(dh);
  // non-temporal stores past kStreamOutBytes; a smaller output stays cached for its consumer
  const bool stream = e_total * d_final * int64_t(sizeof(float)) > kStreamOutBytes;
  const int64_t n_tiles = (e_total + kTile - 1) / kTile;

  run_dynamic(n_tiles, [&](auto claim) {
    const int64_t npo = padded(dout);
    Floats htile(kTile * nph), gtile(pns ? kTile * nph : 0);
    Floats gtile2(pns2 ? kTile * npo : 0);  // layer b's gathered node terms
    Floats tiles[2];                        // the inputs of layers c and d
    for (int l = 1; l < n_layers; ++l) tiles[l - 1].resize(kTile * padded(layers[l].k));
    int64_t dsti[kTile];
    // The next tile's rows are prefetched a line per epilogue call, from the layers' long GEMMs
    // (layer a's has K = C, often 5: a burst its misses would overflow): pf[l] in layer l's.
    AffineEp first(stage, true);
    NextTilePrefetch pf[3];
    // the epilogue issuing prefetches for layer l's gathers: layer l's own if it is a GEMM, else
    // the nearest earlier one (layer a's last)
    auto slot = [&](int l) -> NextTilePrefetch& {
      for (l = std::min(l, n_layers - 1); l >= 0; --l)
        if (!layers[l].dot) return pf[l];
      return first.pf;
    };
    first.out = htile.data(), first.ldo = nph;
    int64_t e0 = 0;
    // Layer l's epilogue: v + bias (+ s2[src] + t2[dst] for layer b), then SiLU and into the next
    // layer's input tile, or (the last layer) into y, with SiLU if act_out.
    auto run_layer = [&](int l, const float* in_tile, int64_t m) {
      const Layer& L = layers[l];
      const bool last = l == n_layers - 1;
      if (L.dot) return L.dots(in_tile, m, y + e0 * d_final);
      float* next = last ? nullptr : tiles[l].data();  // else y's rows
      const int64_t ldn = last ? 0 : padded(L.rows);
      const float* g2 = l == 0 && pns2 ? gtile2.data() : nullptr;
      const float* bias = L.bias.data();
      float* yt = y + e0 * d_final;
      // captured by value (see gemm_ep)
      auto ep = [pf = pf[l], bias, g2, npo, next, ldn, act_out, yt, d_final, stream](
                    int64_t i, int64_t col0, V16 v) NINO_FAST_LAMBDA_INLINE {
        pf(i, col0);
        v = vadd(v, vld16(bias + col0));
        if (g2) v = vadd(v, vld16(g2 + i * npo + col0));
        if (next) return vst16(next + i * ldn + col0, vsilu(v));
        if (act_out) v = vsilu(v);
        if (stream) return store16_stream(yt + i * d_final + col0, d_final - col0, v);
        store16(yt + i * d_final + col0, d_final - col0, v);
      };
      gemm_ep(in_tile, padded(L.k), m, L.packed, ep);
    };
    auto cursor = claim_cursor(claim, [&](int64_t u) {
      return std::pair<int64_t, int64_t>{u * kTile, std::min(e_total, (u + 1) * kTile)};
    });
    for (int64_t tile; (tile = cursor.take()) >= 0;) {
      e0 = tile * kTile;
      const int64_t m = std::min(kTile, e_total - e0);
      for (int64_t i = 0; i < m; ++i) dsti[i] = t[e0 + i];
      // the next tile's rows (each unit is one tile: the next unit's): x, and the src-indexed
      // tables (dst rows repeat: mostly cached)
      const auto [n0, n1] = cursor.after(e0 + m, e0 + m);
      first.pf.reset(n1);
      for (auto& p : pf) p.reset(n1);
      first.pf.add(x + n0 * c, nullptr, c);
      slot(0).add(pns, s + n0, dh);
      slot(1).add(pns2, s + n0, dout);
      first.e0 = e0;
      if (pns)
        gather_add(pns, s + e0, pnd, dsti, m, dh, gtile.data(), nph), first.gsum = gtile.data();
      gemm_ep(x + e0 * c, c, m, stage.w, first);
      if (pns2) gather_add(pns2, s + e0, pnd2, dsti, m, dout, gtile2.data(), npo);
      run_layer(0, htile.data(), m);
      for (int l = 1; l < n_layers; ++l) run_layer(l, tiles[l - 1].data(), m);
    }
    if (stream) stream_fence();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(nino_fast, CPU, m) {
  m.impl("edge_mlp", &edge_mlp_entry<edge_mlp_cpu>);
}

}  // namespace nino_fast::cpu
