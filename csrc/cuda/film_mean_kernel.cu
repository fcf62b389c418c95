// CUDA film_mean: FiLM message + mean over destination-sorted CSR (spec: reference.film_mean).
//
//   out_n = mean_{e in row n} [ (W_sc x_e + b_sc + T_sc[t_e]) * (node_dst[n] + node_src[src_e])
//                               + W_sh x_e + b_sh + T_sh[t_e] ]
//
// Per tile of 64 edges: the scale GEMM (64 x D x C) on tensor cores into shared memory, then each
// warp forms its 8 edges' messages (gathers from L2) and reduces them by row (segment_tiles.cuh).
// The shift half is linear in x, so it is never formed per edge: the kernel also reduces the raw
// features by row (sum_e x_e, C columns) and the finalize kernel adds W_sh (sum_e x_e) + deg b_sh
// once per row. The per-type shift T_sh[t_e] is gathered per edge into the message (a table row,
// L1-resident).
#include <torch/library.h>

#include "cuda/segment_tiles.cuh"

namespace nino_fast::cuda {
namespace {

struct FilmParams {
  const void* feat;
  const int64_t* rowptr;
  const int* src;
  const int* tile_row;
  const void* node_dst;  // (N, D), type G
  const void* node_src;  // (rows, D), type G
  const void* w;         // scale half (D, C) of weight, any float dtype
  const void* b;
  int w_dt, b_dt;
  const int64_t* etype;
  const float* table;  // (types, 2D) fp32 or nullptr
  int64_t types;
  float* acc;
  float* ws;
  int64_t ldo;
  int64_t n, e, tiles, src_rows;
  int c, cp, d, dp, col_f;
  bool vec;
};

template <typename T>
struct FilmLayout {
  int lda, ldc;
  size_t w, a, c, bias, part, row, src, et, bytes;
  __host__ __device__ FilmLayout(int cp, int dp) {
    lda = cp + kSkew<T>;
    ldc = dp + 4;
    size_t o = 0;
    w = o, o = align128(o + sizeof(T) * dp * lda);
    a = o, o = align128(o + sizeof(T) * kTileE * lda);
    c = o, o = align128(o + sizeof(float) * kTileE * ldc);
    bias = o, o = align128(o + sizeof(float) * dp);
    part = o, o = align128(o + sizeof(float) * 2 * kWarps * 2 * kMaxWidth);
    row = o, o = align128(o + sizeof(int) * (kTileE + 2));
    src = o, o = align128(o + sizeof(int) * kTileE);
    et = o, o = align128(o + sizeof(int) * kTileE);
    bytes = o;
  }
};

template <typename T, typename G>
__global__ void __launch_bounds__(kThreads) film_mean_kernel(const FilmParams p) {
#if NINO_FAST_TC_OK
  extern __shared__ __align__(128) unsigned char smem[];
  const FilmLayout<T> L(p.cp, p.dp);
  T* s_w = reinterpret_cast<T*>(smem + L.w);
  T* s_a = reinterpret_cast<T*>(smem + L.a);
  float* s_c = reinterpret_cast<float*>(smem + L.c);
  float* s_bias = reinterpret_cast<float*>(smem + L.bias);
  float* s_part = reinterpret_cast<float*>(smem + L.part);  // two passes: message, feature sum
  int* s_row = reinterpret_cast<int*>(smem + L.row);
  int* s_src = reinterpret_cast<int*>(smem + L.src);
  int* s_et = reinterpret_cast<int*>(smem + L.et);
  const int* row = s_row + 1;

  stage_weight<T>(s_w, L.lda, p.w, p.w_dt, p.d, p.c, p.dp, p.cp);
  stage_vector(s_bias, p.b, p.b_dt, p.d, p.dp);
  const T* feat = static_cast<const T*>(p.feat);
  const G* nd = static_cast<const G*>(p.node_dst);
  const G* ns = static_cast<const G*>(p.node_src);
  const int warp = threadIdx.x >> 5, c4 = (threadIdx.x & 31) * 4;
  const SegOut out_m{p.acc, p.ws, p.ldo, 0, p.d};
  const SegOut out_f{p.acc, p.ws, p.ldo, p.col_f, p.c};

  for (int64_t t = blockIdx.x; t < p.tiles; t += gridDim.x) {
    const int64_t e0 = t * kTileE;
    const int len = tile_len(e0, p.e);
    __syncthreads();  // the previous tile's combine is done with s_row / s_part
    stage_rows(s_row, p.rowptr, p.tile_row, t, p.tiles, p.n, e0, len, p.e);
    if (int(threadIdx.x) < len) {
      const int64_t e = e0 + threadIdx.x;
      stage_index(s_src, p.src, e, p.src_rows,
                  "nino_fast::film_mean: src value out of range of node_src");
      if (p.table != nullptr)
        stage_index(s_et, p.etype, e, p.types,
                    "nino_fast::film_mean: etype value out of range of type_table");
    }
    first_gemm<T>(s_a, L.lda, feat, e0, len, p.c, p.cp, s_w, L.lda, p.dp, s_c, L.ldc);

    // messages (columns of D) and raw features (columns of C) of this warp's 8 edges; loads first
    float4 vm[kEdgesPerWarp], vf[kEdgesPerWarp];
    const int a = warp * kEdgesPerWarp;
#pragma unroll
    for (int k = 0; k < kEdgesPerWarp; ++k) {
      const int i = a + k;
      vm[k] = f4_zero();
      vf[k] = f4_zero();
      if (i >= len) continue;
      if (c4 < p.d) {
        const float4 x = f4_add(load4(nd + int64_t(row[i]) * p.d, c4, p.d, p.vec),
                                load4(ns + int64_t(s_src[i]) * p.d, c4, p.d, p.vec));
        float4 scale = f4_add(read4(s_c + i * L.ldc + c4), read4(s_bias + c4));
        float4 shift = f4_zero();
        if (p.table != nullptr) {
          const float* tr = p.table + int64_t(s_et[i]) * 2 * p.d;
          scale = f4_add(scale, load4(tr, c4, p.d, p.vec));
          shift = load4(tr + p.d, c4, p.d, p.vec);
        }
        vm[k] = f4_add(f4_mul(scale, x), shift);
      }
      if (c4 < p.c) vf[k] = smem4(s_a + i * L.lda + c4);
    }
    segment_reduce_warp(vm, row, len, s_part, out_m);
    segment_reduce_warp(vf, row, len, s_part + kWarps * 2 * kMaxWidth, out_f);
    __syncthreads();
    if (warp == 0)
      segment_combine(row, len, s_part, out_m, t);
    else if (warp == 1)
      segment_combine(row, len, s_part + kWarps * 2 * kMaxWidth, out_f, t);
  }
#else
  __trap();
#endif
}

at::Tensor film_mean_cuda(const FilmMeanArgs& a) {
  constexpr const char* op = "nino_fast::film_mean";
  // the op's dispatcher (nino_fast/ops/library.py) gathers feat by feat_index before a CUDA kernel
  NINO_CHECK(!a.feat_index.has_value(), op, ": the CUDA kernel takes no feat_index");
  const CsrInputs in(op, a.feat, a.rowptr, a.src);
  const auto &feat = in.feat, &rowptr = in.rowptr, &src = in.src;
  const auto dev = in.dev;
  const int64_t e = in.e, c = in.c, n = in.n;
  weight_rows(op, "weight", a.weight, dev);
  NINO_CHECK(a.weight.size(0) % 2 == 0 && a.weight.size(1) == c, op,
             ": weight must be (2*D, C) with C=", c, " (feat columns), got shape ",
             shape_str(a.weight));
  const int64_t d = a.weight.size(0) / 2;
  FloatArg w, b;
  auto w_t = param(op, "weight", a.weight, {2 * d, c}, dev, w);
  auto b_t = param(op, "bias", a.bias, {2 * d}, dev, b);
  check_widths(op, "D (node_dst columns)", d);
  check_widths(op, "C (feat columns)", c);
  NINO_CHECK(n < INT32_MAX, op, ": the CUDA kernel supports N < 2^31 nodes, got ", n);
  auto types = type_table(op, a.etype, a.type_table, e, 2 * d, dev);
  auto nodes =
      node_tables(op, feat.scalar_type(),
                  {{"node_dst", &a.node_dst, d, n}, {"node_src", &a.node_src, d, -1}}, dev);
  auto out = at::empty({n, d}, feat.options().dtype(at::kFloat));
  if (n == 0 || d == 0) return out;
  if (e == 0) return out.zero_();

  const int64_t tiles = (e + kTileE - 1) / kTileE;
  auto tile_row = tile_first_rows(op, rowptr, e);
  const int col_f = round_up(int(d), 4);
  const int64_t ldo = col_f + round_up(int(c), 4);
  auto acc = at::empty({n, ldo}, out.options());
  auto ws = at::empty({tiles, 2, ldo}, out.options());
  const float* table = types.on() ? types.table.data_ptr<float>() : nullptr;
  const bool vec = nodes.vec[0] && nodes.vec[1] &&
                   (table == nullptr || reinterpret_cast<uintptr_t>(table) % 16 == 0);
  const cudaStream_t stream = current_stream();
  dispatch_types(feat.scalar_type(), nodes.low, [&](auto t_tag, auto g_tag) {
    using T = decltype(t_tag);
    using G = decltype(g_tag);
    FilmParams p{};
    p.feat = feat.data_ptr();
    p.rowptr = rowptr.data_ptr<int64_t>();
    p.src = src.data_ptr<int>();
    p.tile_row = tile_row.data_ptr<int>();
    p.node_dst = ptr_as<G>(nodes.t[0]);
    p.node_src = ptr_as<G>(nodes.t[1]);
    p.w = w.ptr, p.w_dt = w.dt, p.b = b.ptr, p.b_dt = b.dt;
    p.etype = types.on() ? types.etype.data_ptr<int64_t>() : nullptr;
    p.table = table;
    p.types = types.types;
    p.acc = acc.data_ptr<float>();
    p.ws = ws.data_ptr<float>();
    p.ldo = ldo;
    p.n = n, p.e = e, p.tiles = tiles, p.src_rows = nodes.t[1].size(0);
    p.c = int(c), p.cp = round_up(std::max<int>(int(c), 1), 16), p.d = int(d),
    p.dp = round_up(int(d), 16);
    p.col_f = col_f;
    p.vec = vec;
    const FilmLayout<T> layout(p.cp, p.dp);
    auto kernel = film_mean_kernel<T, G>;
    const int grid = persistent_grid(op, kernel, layout.bytes, tiles);
    kernel<<<grid, kThreads, layout.bytes, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // the shift half: rows [D, 2D) of weight and bias
  const auto elt = w_t.element_size();
  FloatArg w_sh{static_cast<const char*>(w.ptr) + d * c * elt, w.dt};
  FloatArg b_sh{static_cast<const char*>(b.ptr) + d * b_t.element_size(), b.dt};
  film_finalize(op, rowptr, acc, ws, ldo, int(d), int(c), col_f, w_sh, b_sh, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(nino_fast, CUDA, m) {
  m.impl("film_mean", &film_mean_entry<film_mean_cuda>);
}

}  // namespace nino_fast::cuda
