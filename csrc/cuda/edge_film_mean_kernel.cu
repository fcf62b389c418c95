// CUDA edge_film_mean: layer l's edge update fused with layer l+1's FiLM message + mean
// (spec: reference.edge_film_mean). The updated edge state h never leaves the block.
//
//   h_e   = silu(W_a x_e + b_a + T[t_e] + node_src[src_e] + node_dst[n])           (D_h columns)
//   out_n = mean_e [ (W_sc h_e + b_sc) * (msg_dst[n] + msg_src[src_e]) + W_sh h_e + b_sh ]
//
// Per tile of 64 edges: GEMM1 (64 x D_h x C) -> epilogue 1 forms h in fp32, stores it (as T) over
// the feature tile as GEMM2's A operand, and reduces h by row (the shift half is linear: W_sh
// (sum_e h_e) is applied once per row by the finalize kernel); GEMM2 (64 x D x D_h) -> epilogue 2
// forms the scale message and reduces it by row (segment_tiles.cuh). Weights W_a, W_sc stay in
// shared memory for the whole (persistent) block.
#include <torch/library.h>

#include "cuda/segment_tiles.cuh"

namespace nino_fast::cuda {
namespace {

struct EdgeFilmParams {
  const void* feat;
  const int64_t* rowptr;
  const int* src;
  const int* tile_row;
  const void* node_src;  // (rows, D_h), type G
  const void* node_dst;  // (N, D_h)
  const void* msg_dst;   // (N, D)
  const void* msg_src;   // (rows, D)
  const void *w_a, *b_a, *w_sc, *b_sc;
  int w_a_dt, b_a_dt, w_sc_dt, b_sc_dt;
  const int64_t* etype;
  const float* table;  // (types, D_h) fp32 or nullptr
  int64_t types;
  float* acc;
  float* ws;
  int64_t ldo;
  int64_t n, e, tiles, src_rows;
  int c, cp, dh, hp, d, dp, col_h;
  bool vec_h, vec_m;
};

template <typename T>
struct EdgeFilmLayout {
  int lda, ldw, ldx, ldc;
  size_t wa, wsc, x, c, ba, bsc, part, row, src, et, bytes;
  __host__ __device__ EdgeFilmLayout(int cp, int hp, int dp) {
    lda = cp + kSkew<T>;                   // W_a rows
    ldw = hp + kSkew<T>;                   // W_sc rows
    ldx = (cp > hp ? cp : hp) + kSkew<T>;  // feature tile, then h tile
    ldc = (hp > dp ? hp : dp) + 4;         // fp32 GEMM results
    size_t o = 0;
    wa = o, o = align128(o + sizeof(T) * hp * lda);
    wsc = o, o = align128(o + sizeof(T) * dp * ldw);
    x = o, o = align128(o + sizeof(T) * kTileE * ldx);
    c = o, o = align128(o + sizeof(float) * kTileE * ldc);
    ba = o, o = align128(o + sizeof(float) * hp);
    bsc = o, o = align128(o + sizeof(float) * dp);
    part = o, o = align128(o + sizeof(float) * kWarps * 2 * kMaxWidth);
    row = o, o = align128(o + sizeof(int) * (kTileE + 2));
    src = o, o = align128(o + sizeof(int) * kTileE);
    et = o, o = align128(o + sizeof(int) * kTileE);
    bytes = o;
  }
};

template <typename T, typename G>
__global__ void __launch_bounds__(kThreads) edge_film_mean_kernel(const EdgeFilmParams p) {
#if NINO_FAST_TC_OK
  extern __shared__ __align__(128) unsigned char smem[];
  const EdgeFilmLayout<T> L(p.cp, p.hp, p.dp);
  T* s_wa = reinterpret_cast<T*>(smem + L.wa);
  T* s_wsc = reinterpret_cast<T*>(smem + L.wsc);
  T* s_x = reinterpret_cast<T*>(smem + L.x);
  float* s_c = reinterpret_cast<float*>(smem + L.c);
  float* s_ba = reinterpret_cast<float*>(smem + L.ba);
  float* s_bsc = reinterpret_cast<float*>(smem + L.bsc);
  float* s_part = reinterpret_cast<float*>(smem + L.part);
  int* s_row = reinterpret_cast<int*>(smem + L.row);
  int* s_src = reinterpret_cast<int*>(smem + L.src);
  int* s_et = reinterpret_cast<int*>(smem + L.et);
  const int* row = s_row + 1;

  stage_weight<T>(s_wa, L.lda, p.w_a, p.w_a_dt, p.dh, p.c, p.hp, p.cp);
  stage_weight<T>(s_wsc, L.ldw, p.w_sc, p.w_sc_dt, p.d, p.dh, p.dp, p.hp);
  stage_vector(s_ba, p.b_a, p.b_a_dt, p.dh, p.hp);
  stage_vector(s_bsc, p.b_sc, p.b_sc_dt, p.d, p.dp);
  const T* feat = static_cast<const T*>(p.feat);
  const G* ns = static_cast<const G*>(p.node_src);
  const G* nd = static_cast<const G*>(p.node_dst);
  const G* md = static_cast<const G*>(p.msg_dst);
  const G* ms = static_cast<const G*>(p.msg_src);
  const int warp = threadIdx.x >> 5, c4 = (threadIdx.x & 31) * 4;
  const int a = warp * kEdgesPerWarp;
  const SegOut out_h{p.acc, p.ws, p.ldo, p.col_h, p.dh};
  const SegOut out_m{p.acc, p.ws, p.ldo, 0, p.d};

  for (int64_t t = blockIdx.x; t < p.tiles; t += gridDim.x) {
    const int64_t e0 = t * kTileE;
    const int len = tile_len(e0, p.e);
    __syncthreads();  // the previous tile's combine is done with s_row / s_part, GEMM2 with s_x
    stage_rows(s_row, p.rowptr, p.tile_row, t, p.tiles, p.n, e0, len, p.e);
    if (int(threadIdx.x) < len) {
      const int64_t e = e0 + threadIdx.x;
      stage_index(s_src, p.src, e, p.src_rows,
                  "nino_fast::edge_film_mean: src value out of range of node_src / msg_src");
      if (p.table != nullptr)
        stage_index(s_et, p.etype, e, p.types,
                    "nino_fast::edge_film_mean: etype value out of range of type_table");
    }
    first_gemm<T>(s_x, L.ldx, feat, e0, len, p.c, p.cp, s_wa, L.lda, p.hp, s_c, L.ldc);

    // epilogue 1: h (fp32) -> s_x as T (zeros in the padding and past the last edge) and its row
    // sums
    float4 v[kEdgesPerWarp];
#pragma unroll
    for (int k = 0; k < kEdgesPerWarp;
         ++k) {  // all gathers of the warp's 8 edges in flight together
      const int i = a + k;
      v[k] = f4_zero();
      if (i >= len || c4 >= p.dh) continue;
      const float* type_row = p.table != nullptr ? p.table + int64_t(s_et[i]) * p.dh : nullptr;
      v[k] = f4_silu(edge_pre(s_c + i * L.ldc, s_ba, ns + int64_t(s_src[i]) * p.dh,
                              nd + int64_t(row[i]) * p.dh, type_row, c4, p.dh,
                              p.vec_h));  // padding columns: silu(0) = 0
    }
    if (c4 < p.hp) {
#pragma unroll
      for (int k = 0; k < kEdgesPerWarp; ++k) smem4_store(s_x + (a + k) * L.ldx + c4, v[k]);
    }
    segment_reduce_warp(v, row, len, s_part, out_h);
    __syncthreads();
    if (warp == 0) segment_combine(row, len, s_part, out_h, t);
    warp_gemm<T>(s_x, L.ldx, s_wsc, L.ldw, p.hp, p.dp, s_c, L.ldc);
    __syncthreads();

    // epilogue 2: the scale message and its row sums
#pragma unroll
    for (int k = 0; k < kEdgesPerWarp; ++k) {
      const int i = a + k;
      v[k] = f4_zero();
      if (i >= len || c4 >= p.d) continue;
      const float4 x = f4_add(load4(md + int64_t(row[i]) * p.d, c4, p.d, p.vec_m),
                              load4(ms + int64_t(s_src[i]) * p.d, c4, p.d, p.vec_m));
      v[k] = f4_mul(f4_add(read4(s_c + i * L.ldc + c4), read4(s_bsc + c4)), x);
    }
    segment_reduce_warp(v, row, len, s_part, out_m);
    __syncthreads();
    if (warp == 0) segment_combine(row, len, s_part, out_m, t);
  }
#else
  __trap();
#endif
}

at::Tensor edge_film_mean_cuda(const EdgeFilmMeanArgs& a) {
  constexpr const char* op = "nino_fast::edge_film_mean";
  // the op's dispatcher (nino_fast/ops/library.py) gathers feat by feat_index before a CUDA kernel
  NINO_CHECK(!a.feat_index.has_value(), op, ": the CUDA kernel takes no feat_index");
  const CsrInputs in(op, a.feat, a.rowptr, a.src);
  const auto &feat = in.feat, &rowptr = in.rowptr, &src = in.src;
  const auto dev = in.dev;
  const int64_t e = in.e, c = in.c, n = in.n;
  const int64_t dh = weight_a_rows(op, a.weight_a, c, dev);
  const int64_t d = weight_rows(op, "weight_scale", a.weight_scale, dev);
  FloatArg wa, ba, wsc, bsc, wsh, bsh;
  auto wa_t = param(op, "weight_a", a.weight_a, {dh, c}, dev, wa);
  auto ba_t = param(op, "bias_a", a.bias_a, {dh}, dev, ba);
  auto wsc_t = param(op, "weight_scale", a.weight_scale, {d, dh}, dev, wsc);
  auto bsc_t = param(op, "bias_scale", a.bias_scale, {d}, dev, bsc);
  auto wsh_t = param(op, "weight_shift", a.weight_shift, {d, dh}, dev, wsh);
  auto bsh_t = param(op, "bias_shift", a.bias_shift, {d}, dev, bsh);
  check_widths(op, "D_h (weight_a rows)", dh);
  check_widths(op, "D (weight_scale rows)", d);
  check_widths(op, "C (feat columns)", c);
  NINO_CHECK(n < INT32_MAX, op, ": the CUDA kernel supports N < 2^31 nodes, got ", n);
  auto types = type_table(op, a.etype, a.type_table, e, dh, dev);
  auto nodes = node_tables(op, feat.scalar_type(),
                           {{"node_src", &a.node_src, dh, -1},
                            {"node_dst", &a.node_dst, dh, n},
                            {"msg_dst", &a.msg_dst, d, n},
                            {"msg_src", &a.msg_src, d, -1}},
                           dev);
  auto out = at::empty({n, d}, feat.options().dtype(at::kFloat));
  if (n == 0 || d == 0) return out;
  if (e == 0) return out.zero_();

  const int64_t tiles = (e + kTileE - 1) / kTileE;
  auto tile_row = tile_first_rows(op, rowptr, e);
  const int col_h = round_up(int(d), 4);
  const int64_t ldo = col_h + round_up(int(dh), 4);
  auto acc = at::empty({n, ldo}, out.options());
  auto ws = at::empty({tiles, 2, ldo}, out.options());
  const float* table = types.on() ? types.table.data_ptr<float>() : nullptr;
  const cudaStream_t stream = current_stream();
  dispatch_types(feat.scalar_type(), nodes.low, [&](auto t_tag, auto g_tag) {
    using T = decltype(t_tag);
    using G = decltype(g_tag);
    EdgeFilmParams p{};
    p.feat = feat.data_ptr();
    p.rowptr = rowptr.data_ptr<int64_t>();
    p.src = src.data_ptr<int>();
    p.tile_row = tile_row.data_ptr<int>();
    p.node_src = ptr_as<G>(nodes.t[0]);
    p.node_dst = ptr_as<G>(nodes.t[1]);
    p.msg_dst = ptr_as<G>(nodes.t[2]);
    p.msg_src = ptr_as<G>(nodes.t[3]);
    p.w_a = wa.ptr, p.w_a_dt = wa.dt, p.b_a = ba.ptr, p.b_a_dt = ba.dt;
    p.w_sc = wsc.ptr, p.w_sc_dt = wsc.dt, p.b_sc = bsc.ptr, p.b_sc_dt = bsc.dt;
    p.etype = types.on() ? types.etype.data_ptr<int64_t>() : nullptr;
    p.table = table;
    p.types = types.types;
    p.acc = acc.data_ptr<float>();
    p.ws = ws.data_ptr<float>();
    p.ldo = ldo;
    p.n = n, p.e = e, p.tiles = tiles;
    p.src_rows = std::min(nodes.t[0].size(0), nodes.t[3].size(0));
    p.c = int(c), p.cp = round_up(std::max<int>(int(c), 1), 16);
    p.dh = int(dh), p.hp = round_up(int(dh), 16), p.d = int(d), p.dp = round_up(int(d), 16);
    p.col_h = col_h;
    p.vec_h = nodes.vec[0] && nodes.vec[1] &&
              (table == nullptr || reinterpret_cast<uintptr_t>(table) % 16 == 0);
    p.vec_m = nodes.vec[2] && nodes.vec[3];
    const EdgeFilmLayout<T> layout(p.cp, p.hp, p.dp);
    auto kernel = edge_film_mean_kernel<T, G>;
    const int grid = persistent_grid(op, kernel, layout.bytes, tiles);
    kernel<<<grid, kThreads, layout.bytes, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  film_finalize(op, rowptr, acc, ws, ldo, int(d), int(dh), col_h, wsh, bsh, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(nino_fast, CUDA, m) {
  m.impl("edge_film_mean", &edge_film_mean_entry<edge_film_mean_cuda>);
}

}  // namespace nino_fast::cuda
