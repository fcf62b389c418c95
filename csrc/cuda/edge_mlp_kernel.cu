// CUDA edge_mlp: two GEMMs with gathers and SiLU per edge, no reduction (spec: reference.edge_mlp).
//
//   h_e   = silu(W_a x_e + b_a (+ T[t_e]) (+ node_src[src_e] + node_dst[dst_e]))       (D_h
//   columns) out_e = W_b h_e + b_b (+ node_src2[src_e] + node_dst2[dst_e]), then silu if act_out
//   (D_out columns)
//
// Per tile of 64 edges (persistent blocks, weights resident in shared memory): GEMM1 on tensor
// cores -> epilogue 1 (bias, type row, gathers, SiLU in fp32) writes h as T over the feature tile
// -> GEMM2 -> epilogue 2 (bias, gathers, optional SiLU) stores fp32 rows. D_out may be tiny (the
// head: 1 or 9).
#include <torch/library.h>

#include "cuda/fused_common.cuh"

namespace nino_fast::cuda {
namespace {

struct EdgeMlpParams {
  const void* feat;
  const int* src;
  const int* dst;
  const void *w_a, *b_a, *w_b, *b_b;
  int w_a_dt, b_a_dt, w_b_dt, b_b_dt;
  const int64_t* etype;
  const float* table;  // (types, D_h) fp32 or nullptr
  int64_t types;
  const void *ns, *nd, *ns2, *nd2;  // type G, or nullptr
  int64_t node_rows;
  float* out;
  int64_t e, tiles;
  int c, cp, dh, hp, dout, op;
  bool act_out, vec1, vec2, vec_out;
};

template <typename T>
struct EdgeMlpLayout {
  int lda, ldw, ldx, ldc;
  size_t wa, wb, x, c, ba, bb, src, dst, et, bytes;
  __host__ __device__ EdgeMlpLayout(int cp, int hp, int op) {
    lda = cp + kSkew<T>;
    ldw = hp + kSkew<T>;
    ldx = (cp > hp ? cp : hp) + kSkew<T>;
    ldc = (hp > op ? hp : op) + 4;
    size_t o = 0;
    wa = o, o = align128(o + sizeof(T) * hp * lda);
    wb = o, o = align128(o + sizeof(T) * op * ldw);
    x = o, o = align128(o + sizeof(T) * kTileE * ldx);
    c = o, o = align128(o + sizeof(float) * kTileE * ldc);
    ba = o, o = align128(o + sizeof(float) * hp);
    bb = o, o = align128(o + sizeof(float) * op);
    src = o, o = align128(o + sizeof(int) * kTileE);
    dst = o, o = align128(o + sizeof(int) * kTileE);
    et = o, o = align128(o + sizeof(int) * kTileE);
    bytes = o;
  }
};

template <typename T, typename G>
__global__ void __launch_bounds__(kThreads) edge_mlp_kernel(const EdgeMlpParams p) {
#if NINO_FAST_TC_OK
  extern __shared__ __align__(128) unsigned char smem[];
  const EdgeMlpLayout<T> L(p.cp, p.hp, p.op);
  T* s_wa = reinterpret_cast<T*>(smem + L.wa);
  T* s_wb = reinterpret_cast<T*>(smem + L.wb);
  T* s_x = reinterpret_cast<T*>(smem + L.x);
  float* s_c = reinterpret_cast<float*>(smem + L.c);
  float* s_ba = reinterpret_cast<float*>(smem + L.ba);
  float* s_bb = reinterpret_cast<float*>(smem + L.bb);
  int* s_src = reinterpret_cast<int*>(smem + L.src);
  int* s_dst = reinterpret_cast<int*>(smem + L.dst);
  int* s_et = reinterpret_cast<int*>(smem + L.et);

  stage_weight<T>(s_wa, L.lda, p.w_a, p.w_a_dt, p.dh, p.c, p.hp, p.cp);
  stage_weight<T>(s_wb, L.ldw, p.w_b, p.w_b_dt, p.dout, p.dh, p.op, p.hp);
  stage_vector(s_ba, p.b_a, p.b_a_dt, p.dh, p.hp);
  stage_vector(s_bb, p.b_b, p.b_b_dt, p.dout, p.op);
  const T* feat = static_cast<const T*>(p.feat);
  const G* ns = static_cast<const G*>(p.ns);
  const G* nd = static_cast<const G*>(p.nd);
  const G* ns2 = static_cast<const G*>(p.ns2);
  const G* nd2 = static_cast<const G*>(p.nd2);
  const bool gather = p.ns != nullptr || p.ns2 != nullptr;
  const int warp = threadIdx.x >> 5, c4 = (threadIdx.x & 31) * 4;
  const int a = warp * kEdgesPerWarp;

  for (int64_t t = blockIdx.x; t < p.tiles; t += gridDim.x) {
    const int64_t e0 = t * kTileE;
    const int len = tile_len(e0, p.e);
    __syncthreads();  // the previous tile's GEMM2 / epilogue 2 are done with s_x, s_c, s_src, s_dst
    if (int(threadIdx.x) < len) {
      const int64_t e = e0 + threadIdx.x;
      if (gather) {
        stage_index(s_src, p.src, e, p.node_rows,
                    "nino_fast::edge_mlp: src value out of range of the node tables");
        stage_index(s_dst, p.dst, e, p.node_rows,
                    "nino_fast::edge_mlp: dst value out of range of the node tables");
      }
      if (p.table != nullptr)
        stage_index(s_et, p.etype, e, p.types,
                    "nino_fast::edge_mlp: etype value out of range of type_table");
    }
    first_gemm<T>(s_x, L.ldx, feat, e0, len, p.c, p.cp, s_wa, L.lda, p.hp, s_c, L.ldc);

    // epilogue 1: h -> s_x as T (zeros in the padding and past the last edge)
    float4 h[kEdgesPerWarp];
#pragma unroll
    for (int k = 0; k < kEdgesPerWarp;
         ++k) {  // all gathers of the warp's 8 edges in flight together
      const int i = a + k;
      h[k] = f4_zero();
      if (i >= len || c4 >= p.dh) continue;
      const float* type_row = p.table != nullptr ? p.table + int64_t(s_et[i]) * p.dh : nullptr;
      const G* ns_row = ns != nullptr ? ns + int64_t(s_src[i]) * p.dh : nullptr;
      const G* nd_row = ns != nullptr ? nd + int64_t(s_dst[i]) * p.dh : nullptr;
      h[k] = f4_silu(edge_pre(s_c + i * L.ldc, s_ba, ns_row, nd_row, type_row, c4, p.dh,
                              p.vec1));  // padding columns: silu(0) = 0
    }
    if (c4 < p.hp) {
#pragma unroll
      for (int k = 0; k < kEdgesPerWarp; ++k) smem4_store(s_x + (a + k) * L.ldx + c4, h[k]);
    }
    __syncthreads();
    warp_gemm<T>(s_x, L.ldx, s_wb, L.ldw, p.hp, p.op, s_c, L.ldc);
    __syncthreads();

    // epilogue 2: out rows (fp32)
#pragma unroll
    for (int k = 0; k < kEdgesPerWarp; ++k) {
      const int i = a + k;
      if (i >= len || c4 >= p.dout) continue;
      float4 o = f4_add(read4(s_c + i * L.ldc + c4), read4(s_bb + c4));
      if (ns2 != nullptr)
        o = f4_add(o, f4_add(load4(ns2 + int64_t(s_src[i]) * p.dout, c4, p.dout, p.vec2),
                             load4(nd2 + int64_t(s_dst[i]) * p.dout, c4, p.dout, p.vec2)));
      if (p.act_out) o = f4_silu(o);
      float* y = p.out + (e0 + i) * p.dout + c4;
      if (p.vec_out) {
        *reinterpret_cast<float4*>(y) = o;
      } else {
        y[0] = o.x;
        if (c4 + 1 < p.dout) y[1] = o.y;
        if (c4 + 2 < p.dout) y[2] = o.z;
        if (c4 + 3 < p.dout) y[3] = o.w;
      }
    }
  }
#else
  __trap();
#endif
}

at::Tensor edge_mlp_cuda(const EdgeMlpArgs& a) {
  constexpr const char* op = "nino_fast::edge_mlp";
  const FeatInputs in(op, a.feat);
  const auto& feat = in.feat;
  const auto dev = in.dev;
  const int64_t e = in.e, c = in.c;
  auto src = index32(op, "src", a.src, e, dev);
  auto dst = index32(op, "dst", a.dst, e, dev);
  // the readout layers run on the CPU kernel and the reference (the op's CUDA kernel applies them
  // after this one: nino_fast/ops/library.py)
  NINO_CHECK(!a.weight_c.has_value() && !a.weight_d.has_value(), op,
             ": the CUDA kernel takes no readout layers (weight_c, weight_d)");
  const int64_t dh = weight_a_rows(op, a.weight_a, c, dev);
  const int64_t dout = weight_rows(op, "weight_b", a.weight_b, dev);
  FloatArg wa, ba, wb, bb;
  auto wa_t = param(op, "weight_a", a.weight_a, {dh, c}, dev, wa);
  auto ba_t = param(op, "bias_a", a.bias_a, {dh}, dev, ba);
  auto wb_t = param(op, "weight_b", a.weight_b, {dout, dh}, dev, wb);
  auto bb_t = param(op, "bias_b", a.bias_b, {dout}, dev, bb);
  check_widths(op, "D_h (weight_a rows)", dh);
  check_widths(op, "D_out (weight_b rows)", dout);
  check_widths(op, "C (feat columns)", c);
  NINO_CHECK(a.node_src.has_value() == a.node_dst.has_value() &&
                 a.node_src2.has_value() == a.node_dst2.has_value(),
             op, ": node_src/node_dst (and node_src2/node_dst2) go together");
  auto types = type_table(op, a.etype, a.type_table, e, dh, dev);
  // all gathered node tables index the same nodes: one row count
  int64_t rows = -1;
  for (const auto* t : {&a.node_src, &a.node_dst, &a.node_src2, &a.node_dst2})
    if (t->has_value() && rows < 0) rows = (*t)->size(0);
  auto opt = [](const std::optional<at::Tensor>& t) { return t.has_value() ? &*t : nullptr; };
  auto nodes = node_tables(op, feat.scalar_type(),
                           {{"node_src", opt(a.node_src), dh, rows},
                            {"node_dst", opt(a.node_dst), dh, rows},
                            {"node_src2", opt(a.node_src2), dout, rows},
                            {"node_dst2", opt(a.node_dst2), dout, rows}},
                           dev);
  auto out = at::empty({e, dout}, feat.options().dtype(at::kFloat));
  if (e == 0 || dout == 0) return out;

  const int64_t tiles = (e + kTileE - 1) / kTileE;
  const float* table = types.on() ? types.table.data_ptr<float>() : nullptr;
  const cudaStream_t stream = current_stream();
  dispatch_types(feat.scalar_type(), nodes.low, [&](auto t_tag, auto g_tag) {
    using T = decltype(t_tag);
    using G = decltype(g_tag);
    EdgeMlpParams p{};
    p.feat = feat.data_ptr();
    p.src = src.data_ptr<int>();
    p.dst = dst.data_ptr<int>();
    p.w_a = wa.ptr, p.w_a_dt = wa.dt, p.b_a = ba.ptr, p.b_a_dt = ba.dt;
    p.w_b = wb.ptr, p.w_b_dt = wb.dt, p.b_b = bb.ptr, p.b_b_dt = bb.dt;
    p.etype = types.on() ? types.etype.data_ptr<int64_t>() : nullptr;
    p.table = table;
    p.types = types.types;
    p.ns = ptr_as<G>(nodes.t[0]);
    p.nd = ptr_as<G>(nodes.t[1]);
    p.ns2 = ptr_as<G>(nodes.t[2]);
    p.nd2 = ptr_as<G>(nodes.t[3]);
    p.node_rows = std::max<int64_t>(rows, 0);
    p.out = out.data_ptr<float>();
    p.e = e, p.tiles = tiles;
    p.c = int(c), p.cp = round_up(std::max<int>(int(c), 1), 16);
    p.dh = int(dh), p.hp = round_up(std::max<int>(int(dh), 1), 16);
    p.dout = int(dout), p.op = round_up(int(dout), 16);
    p.act_out = a.act_out;
    p.vec1 = nodes.vec[0] && nodes.vec[1] &&
             (table == nullptr || reinterpret_cast<uintptr_t>(table) % 16 == 0);
    p.vec2 = nodes.vec[2] && nodes.vec[3];
    p.vec_out = dout % 4 == 0;
    const EdgeMlpLayout<T> layout(p.cp, p.hp, p.op);
    auto kernel = edge_mlp_kernel<T, G>;
    const int grid = persistent_grid(op, kernel, layout.bytes, tiles);
    kernel<<<grid, kThreads, layout.bytes, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(nino_fast, CUDA, m) {
  m.impl("edge_mlp", &edge_mlp_entry<edge_mlp_cuda>);
}

}  // namespace nino_fast::cuda
