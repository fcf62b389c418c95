// The two small kernels around the fused mean kernels (see segment_tiles.cuh): the tile ->
// first-row map before, and the finalize after (cross-tile partial sums, the shift-half GEMV, the
// division by degree).
#include "cuda/segment_tiles.cuh"

namespace nino_fast::cuda {
namespace {

constexpr int kRowsPerGroup =
    32;                     // finalize: rows per block iteration (8 warps x 4 rows in the GEMV)
constexpr int kChunks = 4;  // finalize: a multi-tile row's partials are summed in 4 fixed chunks

__global__ void tile_first_row_kernel(const int64_t* __restrict__ rowptr, int64_t n,
                                      int64_t e_total, int* __restrict__ tile_row) {
  const int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r == 0) {
    CUDA_KERNEL_ASSERT_MSG(rowptr[0] == 0 && rowptr[n] == e_total,
                           "nino_fast: rowptr must start at 0 and end at E (the number of edges)");
  }
  if (r >= n) return;
  const int64_t b = rowptr[r], e = rowptr[r + 1];
  CUDA_KERNEL_ASSERT_MSG(0 <= b && b <= e && e <= e_total,
                         "nino_fast: rowptr must be nondecreasing in [0, E]");
  for (int64_t t = (b + kTileE - 1) / kTileE; t * kTileE < e; ++t) tile_row[t] = int(r);
}

__global__ void __launch_bounds__(kThreads)
    film_finalize_kernel(const int64_t* __restrict__ rowptr, int64_t n,
                         const float* __restrict__ acc, const float* __restrict__ ws, int ldo,
                         int d, int kl, int col_l, const void* w_sh, int w_dt, const void* b_sh,
                         int b_dt, float* __restrict__ out) {
  extern __shared__ __align__(16) float fsmem[];
  const int dp = round_up(d, 4);
  float* s_w = fsmem;                          // [kl][dp]  W_sh transposed
  float* s_b = s_w + kl * dp;                  // [dp]
  float* s_buf = s_b + dp;                     // [kRowsPerGroup][ldo]  combined row sums
  float* s_scr = s_buf + kRowsPerGroup * ldo;  // [kChunks][ldo]
  const int tid = threadIdx.x;
  for (int i = tid; i < kl * dp; i += kThreads) {
    const int k = i / dp, j = i % dp;
    s_w[i] = j < d ? load_any(w_sh, int64_t(j) * kl + k, w_dt) : 0.f;
  }
  stage_vector(s_b, b_sh, b_dt, d, dp);
  __syncthreads();

  for (int64_t row0 = int64_t(blockIdx.x) * kRowsPerGroup; row0 < n;
       row0 += int64_t(gridDim.x) * kRowsPerGroup) {
    // 1. each row's combined sum into s_buf (block-uniform branches: __syncthreads inside is safe)
    for (int rl = 0; rl < kRowsPerGroup; ++rl) {
      const int64_t r = row0 + rl;
      float* dst = s_buf + rl * ldo;
      const int64_t b = r < n ? rowptr[r] : 0, e = r < n ? rowptr[r + 1] : 0;
      const int64_t t0 = b / kTileE, t1 = e > b ? (e - 1) / kTileE : t0;
      if (e <= b) {
        for (int c = tid; c < ldo; c += kThreads) dst[c] = 0.f;
      } else if (t0 == t1) {
        for (int c = tid; c < ldo; c += kThreads) dst[c] = acc[r * ldo + c];
      } else {
        const int c = (tid % 64) * 4, q = tid / 64;
        const int64_t cnt = t1 - t0 + 1, lo = t0 + q * cnt / kChunks,
                      hi = t0 + (q + 1) * cnt / kChunks;
        if (c < ldo) {
          float4 s = f4_zero();
#pragma unroll 4
          for (int64_t t = lo; t < hi; ++t)
            s = f4_add(s, read4(ws + (t * 2 + (t == t0 ? 1 : 0)) * ldo + c));
          store4(s_scr + q * ldo + c, s);
        }
        __syncthreads();
        if (q == 0 && c < ldo) {
          float4 s = read4(s_scr + c);
#pragma unroll
          for (int j = 1; j < kChunks; ++j) s = f4_add(s, read4(s_scr + j * ldo + c));
          store4(dst + c, s);
        }
        __syncthreads();
      }
    }
    __syncthreads();
    // 2. shift-half GEMV and the mean: warp w owns rows 4w .. 4w+3, lane l columns 4l .. 4l+3
    const int w = tid >> 5, c = (tid & 31) * 4;
    if (c < dp) {
      float a[4][4] = {};
      const float* x = s_buf + (4 * w) * ldo + col_l;
      for (int k = 0; k < kl; ++k) {
        const float4 wk = read4(s_w + k * dp + c);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float xi = x[i * ldo + k];
          a[i][0] += xi * wk.x;
          a[i][1] += xi * wk.y;
          a[i][2] += xi * wk.z;
          a[i][3] += xi * wk.w;
        }
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t r = row0 + 4 * w + i;
        if (r >= n) break;
        const int64_t deg = rowptr[r + 1] - rowptr[r];
        const float* sum = s_buf + (4 * w + i) * ldo;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int j = c + q;
          if (j < d) out[r * d + j] = deg > 0 ? (sum[j] + a[i][q]) / float(deg) + s_b[j] : 0.f;
        }
      }
    }
    __syncthreads();  // s_buf is refilled by the next group
  }
}

}  // namespace

at::Tensor tile_first_rows(const char* op, const at::Tensor& rowptr, int64_t e_total) {
  const int64_t n = rowptr.numel() - 1;
  const int64_t tiles = (e_total + kTileE - 1) / kTileE;
  auto tile_row = at::empty({tiles}, rowptr.options().dtype(at::kInt));
  if (tiles == 0) return tile_row;
  NINO_CHECK(n > 0, op, ": rowptr has no rows but E=", e_total, " edges were given");
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  tile_first_row_kernel<<<unsigned(blocks), kThreads, 0, current_stream()>>>(
      rowptr.data_ptr<int64_t>(), n, e_total, tile_row.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return tile_row;
}

void film_finalize(const char* op, const at::Tensor& rowptr, const at::Tensor& acc,
                   const at::Tensor& ws, int64_t ldo, int d, int kl, int col_l, FloatArg w_sh,
                   FloatArg b_sh, at::Tensor& out) {
  const int64_t n = rowptr.numel() - 1;
  if (n == 0 || d == 0) return;
  TORCH_INTERNAL_ASSERT(ldo % 4 == 0 && ldo <= 2 * kMaxWidth && d <= kMaxWidth && kl <= kMaxWidth);
  const int dp = round_up(d, 4);
  const size_t smem =
      sizeof(float) * (size_t(kl) * dp + dp + (kRowsPerGroup + kChunks) * size_t(ldo));
  const int64_t groups = (n + kRowsPerGroup - 1) / kRowsPerGroup;
  const int grid = persistent_grid(op, film_finalize_kernel, smem, groups);
  film_finalize_kernel<<<grid, kThreads, smem, current_stream()>>>(
      rowptr.data_ptr<int64_t>(), n, acc.data_ptr<float>(),
      ws.numel() ? ws.data_ptr<float>() : nullptr, int(ldo), d, kl, col_l, w_sh.ptr, w_sh.dt,
      b_sh.ptr, b_sh.dt, out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace nino_fast::cuda
