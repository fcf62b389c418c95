// Deterministic segment sums over destination-sorted CSR, for the fused kernels with a mean
// (film_mean, edge_film_mean). No float atomics anywhere; every sum has one fixed order.
//
// Partition. The E edges are cut into fixed tiles of kTileE = 64 consecutive edges (tile t = edges
// [64 t, 64 t + 64)), whatever the rows: every tile is the same work, and a row of 100k edges is
// simply ~1600 tiles. Inside a tile, warp w owns edges [8 w, 8 w + 8) and lane l owns columns [4 l,
// 4 l + 4).
//
// Reduction, three fixed levels:
//   1. warp: sums its 8 edges row by row, in edge order. A row piece that is a whole row is final
//   and is
//      written to `acc` (N, ldo). A piece that continues past the warp's first/last edge goes to
//      shared memory part[w][0] (continues to the left) or part[w][1] (continues to the right
//      only).
//   2. tile: one warp walks the 8 warps in order and chains the pieces of each row crossing a warp
//   border.
//      A chain that stays in the tile is a whole row -> `acc`. A chain that touches the tile's
//      first edge (continues from tile t-1) -> ws[t][0]; one that only touches the last edge ->
//      ws[t][1].
//   3. rows spanning tiles t0 < t1 (from rowptr alone): ws[t0][1] + ws[t0+1][0] + ... + ws[t1][0],
//   summed by
//      the finalize kernel in 4 fixed contiguous chunks combined in order.
// Every row is written by exactly one party, so `acc` and `ws` need no zero fill.
//
// The row of each edge comes from tile_row[t] (the row holding tile t's first edge, from one small
// kernel) and a binary search of rowptr between tile_row[t] and tile_row[t+1]: a few steps, usually
// one.
#pragma once

#include "cuda/fused_common.cuh"

namespace nino_fast::cuda {

// Where one reduction pass of a tile goes: `width` columns starting at column `col` of the (N, ldo)
// complete-row buffer `acc` and of the (tiles, 2, ldo) partial-row buffer `ws`.
struct SegOut {
  float* acc;
  float* ws;
  int64_t ldo;
  int col, width;
};

// s_row[i + 1] = destination row of edge e0 + i for i in [-1, len]; -1 where the edge does not
// exist. Uses threads 0 .. len + 1.
__device__ __forceinline__ void stage_rows(int* s_row, const int64_t* __restrict__ rowptr,
                                           const int* __restrict__ tile_row, int64_t t,
                                           int64_t tiles, int64_t n, int64_t e0, int len,
                                           int64_t e_total) {
  const int i = int(threadIdx.x) - 1;
  if (i > len) return;
  const int64_t e = e0 + i;
  int r = -1;
  if (e >= 0 && e < e_total) {
    if (i == len) {
      r = tile_row[t + 1];  // the next tile's first edge
    } else {
      // largest row r in [lo, hi] with rowptr[r] <= e (rowptr[lo] <= e holds by construction)
      int64_t lo = i < 0 ? tile_row[t - 1] : tile_row[t];
      int64_t hi = t + 1 < tiles ? tile_row[t + 1] : n - 1;
      while (lo < hi) {
        const int64_t mid = (lo + hi + 1) >> 1;
        if (__ldg(rowptr + mid) <= e)
          lo = mid;
        else
          hi = mid - 1;
      }
      r = int(lo);
    }
  }
  s_row[i + 1] = r;
}

// Level 1. v[k]: this lane's 4 columns of edge 8 w + k. row = s_row + 1 (row[-1] and row[len]
// valid). part: [kWarps][2][kMaxWidth].
__device__ __forceinline__ void segment_reduce_warp(const float4 (&v)[kEdgesPerWarp],
                                                    const int* row, int len, float* part,
                                                    const SegOut& o) {
  const int w = threadIdx.x >> 5, c4 = (threadIdx.x & 31) * 4;
  const int a = w * kEdgesPerWarp, b = min(a + kEdgesPerWarp, len);
  if (a >= b) return;
  const bool col_ok = c4 < o.width;
  auto flush = [&](int r, float4 sum, int s, int e) {
    if (!col_ok) return;
    const bool left = s == a && row[a - 1] == r;
    const bool right = e == b && row[b] == r;
    if (left)
      store4(part + (w * 2 + 0) * kMaxWidth + c4, sum);
    else if (right)
      store4(part + (w * 2 + 1) * kMaxWidth + c4, sum);
    else
      store4(o.acc + int64_t(r) * o.ldo + o.col + c4, sum);
  };
  float4 run = v[0];
  int cur = row[a], start = a;
#pragma unroll
  for (int k = 1; k < kEdgesPerWarp; ++k) {
    const int i = a + k;
    if (i < b) {
      const int r = row[i];
      if (r != cur) {
        flush(cur, run, start, i);
        run = v[k];
        cur = r;
        start = i;
      } else {
        run = f4_add(run, v[k]);
      }
    }
  }
  flush(cur, run, start, b);
}

// Level 2, run by one warp after a __syncthreads() that follows every warp's segment_reduce_warp.
__device__ __forceinline__ void segment_combine(const int* row, int len, const float* part,
                                                const SegOut& o, int64_t t) {
  const int c4 = (threadIdx.x & 31) * 4;
  if (c4 >= o.width) return;
  bool active = false, from_prev = false;
  int crow = 0;
  float4 csum = f4_zero();
  auto emit = [&](bool to_next) {
    float* dst;
    if (from_prev)
      dst = o.ws + (t * 2 + 0) * o.ldo;
    else if (to_next)
      dst = o.ws + (t * 2 + 1) * o.ldo;
    else
      dst = o.acc + int64_t(crow) * o.ldo;
    store4(dst + o.col + c4, csum);
  };
  for (int w = 0; w < kWarps; ++w) {
    const int a = w * kEdgesPerWarp;
    if (a >= len) break;
    const int b = min(a + kEdgesPerWarp, len);
    const int rf = row[a], rl = row[b - 1];
    const bool left = row[a - 1] == rf, right = row[b] == rl;
    if (left) {
      const float4 p = read4(part + (w * 2 + 0) * kMaxWidth + c4);
      if (w == 0) {  // the row comes from the previous tile
        from_prev = true;
        crow = rf;
        csum = p;
      } else {  // continues the chain opened by warp w - 1
        csum = f4_add(csum, p);
      }
      if (rf == rl && right) {  // one row through the whole warp, and beyond
        active = true;
        continue;
      }
      emit(false);
      active = false;
    }
    if (right) {
      active = true;
      from_prev = false;
      crow = rl;
      csum = read4(part + (w * 2 + 1) * kMaxWidth + c4);
    }
  }
  if (active) emit(true);  // the last chain runs into the next tile
}

// Host launchers (segment_tiles.cu).

// (tiles,) int32: the row holding each tile's first edge. Device-asserts rowptr[0] == 0, rowptr[N]
// == E and rowptr nondecreasing (no host synchronisation).
at::Tensor tile_first_rows(const char* op, const at::Tensor& rowptr, int64_t e_total);

// out[n, j] = (acc[n, j] + sum_k W_sh[j, k] lsum[n, k]) / deg_n + b_sh[j] for deg_n > 0, else 0,
// where acc = columns [0, d) and lsum = columns [col_l, col_l + kl) of the row's combined sum
// (level 3 above). W_sh: (d, kl) contiguous, b_sh: (d,), any float dtype; out: (N, d) fp32. fp32
// FFMA, fixed order.
void film_finalize(const char* op, const at::Tensor& rowptr, const at::Tensor& acc,
                   const at::Tensor& ws, int64_t ldo, int d, int kl, int col_l, FloatArg w_sh,
                   FloatArg b_sh, at::Tensor& out);

}  // namespace nino_fast::cuda
