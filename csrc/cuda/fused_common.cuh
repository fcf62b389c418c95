// Shared pieces of the fused CUDA kernels (film_mean, edge_film_mean, edge_mlp): element types, the
// tensor-core warp GEMM, gathers of per-node rows, and host-side input checks.
//
// Types. The feature matrix's dtype T picks the tensor-core path: bf16/fp16 use WMMA m16n16k16 with
// fp32 accumulation; fp32 uses WMMA tf32 m16n16k8 three times per step (a = a_hi + a_lo split,
// "3xTF32"), which keeps fp32 accuracy (~1e-6 relative) at tensor-core speed. GEMM weights may be
// fp32/fp64/bf16/fp16 whatever T is: the kernels stage them into shared memory rounded to T (so
// bf16 features get bf16 weights). Biases and type tables are used in fp32. Node tables (gathered
// per edge) are read as T when every node table of the call has dtype T (half the bytes for bf16),
// else all of them are converted to fp32 once on the host. Accumulation and outputs are fp32.
#pragma once

// Only c10/cuda headers (not ATen/cuda/CUDAContext.h): those pull in cuBLAS/cuSPARSE headers, which
// a toolkit with just nvcc (plus the CUDA runtime that torch ships) may lack.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/types.h>

#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <tuple>
#include <type_traits>

#include "utils/check.h"
#include "utils/op_args.h"

// WMMA with bf16 and tf32 needs sm_80+; older targets in TORCH_CUDA_ARCH_LIST get kernels that trap
// (the host checks the device's compute capability first, with a clear error).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define NINO_FAST_TC_OK 1
#else
#define NINO_FAST_TC_OK 0
#endif

namespace nino_fast::cuda {

namespace wmma = nvcuda::wmma;

constexpr int kThreads = 256;  // 8 warps per block
constexpr int kWarps = kThreads / 32;
constexpr int kTileE = 64;  // edges per tile (GEMM M)
constexpr int kEdgesPerWarp =
    kTileE / kWarps;            // epilogue: each warp owns 8 consecutive edges of the tile
constexpr int kMaxWidth = 128;  // D, C, D_out <= 128: one epilogue pass = 32 lanes x 4 columns

__host__ __device__ constexpr int round_up(int x, int m) {
  return (x + m - 1) / m * m;
}
__host__ __device__ constexpr size_t align128(size_t x) {
  return (x + 127) / 128 * 128;
}

// ---------------------------------------------------------------------------------------------------------
// Element conversions
__device__ __forceinline__ float to_f(float x) {
  return x;
}
__device__ __forceinline__ float to_f(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
__device__ __forceinline__ float to_f(__half x) {
  return __half2float(x);
}

template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_f<__half>(float x) {
  return __float2half_rn(x);
}

// Weights and biases are read once per block, in whatever float dtype they come in (no host
// conversion).
enum DType : int { kF32 = 0, kF64 = 1, kBF16 = 2, kF16 = 3 };

__device__ __forceinline__ float load_any(const void* p, int64_t i, int dt) {
  switch (dt) {
    case kF64:
      return static_cast<float>(static_cast<const double*>(p)[i]);
    case kBF16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case kF16:
      return __half2float(static_cast<const __half*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ float silu(float x) {
  return x / (1.f + expf(-x));
}

__device__ __forceinline__ float4 f4_zero() {
  return make_float4(0.f, 0.f, 0.f, 0.f);
}
__device__ __forceinline__ float4 f4_add(float4 a, float4 b) {
  return make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w);
}
__device__ __forceinline__ float4 f4_mul(float4 a, float4 b) {
  return make_float4(a.x * b.x, a.y * b.y, a.z * b.z, a.w * b.w);
}
__device__ __forceinline__ void store4(float* p, float4 v) {
  *reinterpret_cast<float4*>(p) = v;
}
__device__ __forceinline__ float4 read4(const float* p) {
  return *reinterpret_cast<const float4*>(p);
}
// Edges in tile t (kTileE except for the last tile).
__device__ __forceinline__ int tile_len(int64_t e0, int64_t e_total) {
  return e_total - e0 < kTileE ? int(e_total - e0) : kTileE;
}
__device__ __forceinline__ float4 f4_silu(float4 a) {
  return make_float4(silu(a.x), silu(a.y), silu(a.z), silu(a.w));
}

// 4 consecutive columns [c, c+4) of a row of width `width` as fp32; columns >= width read as 0.
// `vec`: the row start is aligned and width % 4 == 0, so one 16-byte (fp32) or 8-byte (16-bit) load
// does it.
__device__ __forceinline__ float4 load4(const float* row, int c, int width, bool vec) {
  if (vec) return __ldg(reinterpret_cast<const float4*>(row + c));
  float4 r = f4_zero();
  if (c < width) r.x = __ldg(row + c);
  if (c + 1 < width) r.y = __ldg(row + c + 1);
  if (c + 2 < width) r.z = __ldg(row + c + 2);
  if (c + 3 < width) r.w = __ldg(row + c + 3);
  return r;
}

template <typename H>  // __nv_bfloat16 or __half
__device__ __forceinline__ float4 load4(const H* row, int c, int width, bool vec) {
  static_assert(sizeof(H) == 2, "16-bit element type expected");
  if (vec) {
    const uint2 u = __ldg(reinterpret_cast<const uint2*>(row + c));
    H h[4];
    memcpy(h, &u, sizeof(u));
    return make_float4(to_f(h[0]), to_f(h[1]), to_f(h[2]), to_f(h[3]));
  }
  float4 r = f4_zero();
  if (c < width) r.x = to_f(row[c]);
  if (c + 1 < width) r.y = to_f(row[c + 1]);
  if (c + 2 < width) r.z = to_f(row[c + 2]);
  if (c + 3 < width) r.w = to_f(row[c + 3]);
  return r;
}

// Four consecutive T elements of a shared-memory row (c % 4 == 0, row start 16-byte aligned).
template <typename T>
__device__ __forceinline__ float4 smem4(const T* p) {
  return make_float4(to_f(p[0]), to_f(p[1]), to_f(p[2]), to_f(p[3]));
}
template <typename T>
__device__ __forceinline__ void smem4_store(T* p, float4 v) {
  p[0] = from_f<T>(v.x);
  p[1] = from_f<T>(v.y);
  p[2] = from_f<T>(v.z);
  p[3] = from_f<T>(v.w);
}

// ---------------------------------------------------------------------------------------------------------
// Shared-memory staging (once per block; blocks are persistent, so the cost is amortised over many
// tiles)

// dst[r * ld + k] = W[r, k] rounded to T for r < rows, k < cols; 0 in the padding up to rows_p x
// cols_p.
template <typename T>
__device__ void stage_weight(T* dst, int ld, const void* w, int dt, int rows, int cols, int rows_p,
                             int cols_p) {
  for (int i = threadIdx.x; i < rows_p * cols_p; i += blockDim.x) {
    const int r = i / cols_p, k = i % cols_p;
    const float v = (r < rows && k < cols) ? load_any(w, int64_t(r) * cols + k, dt) : 0.f;
    dst[r * ld + k] = from_f<T>(v);
  }
}

__device__ __forceinline__ void stage_vector(float* dst, const void* v, int dt, int n, int n_p) {
  for (int i = threadIdx.x; i < n_p; i += blockDim.x) dst[i] = i < n ? load_any(v, i, dt) : 0.f;
}

// The feature tile: rows e0 .. e0+len of feat (E, C) into dst[i * ld + k] as T, zero-padded to
// kTileE x cols_p.
template <typename T>
__device__ void stage_feat(T* dst, int ld, const T* feat, int64_t e0, int len, int c, int cols_p) {
  const T* base = feat + e0 * c;
  for (int i = threadIdx.x; i < kTileE * cols_p; i += blockDim.x) {
    const int r = i / cols_p, k = i % cols_p;
    dst[r * ld + k] = (r < len && k < c) ? base[int64_t(r) * c + k] : from_f<T>(0.f);
  }
}

// This thread's edge e of the tile being staged: its index idx[e] (a node, or with int64 an edge
// type) into s_idx[threadIdx.x], checked against the rows of the table it selects; msg names the op
// in the device assert.
template <typename I>
__device__ __forceinline__ void stage_index(int* s_idx, const I* idx, int64_t e, int64_t rows,
                                            const char* msg) {
  const int64_t v = idx[e];
  CUDA_KERNEL_ASSERT_MSG(v >= 0 && v < rows, msg);
  s_idx[threadIdx.x] = int(v);
}

// The edge layer's pre-activation at 4 columns [c4, c4+4) of one edge: its GEMM row + bias + the
// gathered per-node rows (node_src[s] + node_dst[d]; both null when absent) + its type-table row
// (null when absent).
template <typename G>
__device__ __forceinline__ float4 edge_pre(const float* gemm_row, const float* bias,
                                           const G* ns_row, const G* nd_row, const float* type_row,
                                           int c4, int width, bool vec) {
  float4 pre = f4_add(read4(gemm_row + c4), read4(bias + c4));
  if (ns_row != nullptr)
    pre = f4_add(pre, f4_add(load4(ns_row, c4, width, vec), load4(nd_row, c4, width, vec)));
  if (type_row != nullptr) pre = f4_add(pre, load4(type_row, c4, width, vec));
  return pre;
}

// Padding (in elements) added to shared-memory leading dimensions against bank conflicts; keeps
// every WMMA fragment pointer 32-byte aligned and ldm a multiple of 16 bytes.
template <typename T>
constexpr int kSkew = 16 / sizeof(T);

// ---------------------------------------------------------------------------------------------------------
// Warp GEMM: C[64 x NP] = A[64 x KP] * B^T with B stored as W[NP][KP] (row n = output column n),
// all in shared memory; the result is stored to shared memory (fp32, ldc). 8 warps as 2 (M) x 4
// (N): warp (wm, wn) owns rows 32 wm .. 32 wm + 31 and 16-column blocks wn and wn + 4. KP % 16 ==
// 0, NP % 16 == 0, NP <= 128.

template <typename T>
struct Mma {  // bf16 / fp16
  static constexpr int kK = 16;
  using A = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
  using B = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major>;
  using C = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
};
template <>
struct Mma<float> {  // 3xTF32
  static constexpr int kK = 8;
  using A = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
  using B = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major>;
  using C = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;
};

// x = hi + lo with both parts representable in tf32 (the fp32 value to ~2^-22 relative).
template <typename Frag>
__device__ __forceinline__ void split_tf32(Frag& hi, Frag& lo) {
#pragma unroll
  for (int i = 0; i < hi.num_elements; ++i) {
    const float v = hi.x[i];
    const float h = wmma::__float_to_tf32(v);
    hi.x[i] = h;
    lo.x[i] = wmma::__float_to_tf32(v - h);
  }
}

template <typename T>
__device__ void warp_gemm(const T* a, int lda, const T* w, int ldw, int kp, int np, float* c,
                          int ldc) {
#if NINO_FAST_TC_OK
  using M = Mma<T>;
  const int warp = threadIdx.x >> 5;
  const int wm = warp & 1, wn = warp >> 1;
  const int nf = np / 16;
  bool has[2];
  has[0] = wn < nf;
  has[1] = wn + 4 < nf;
  if (!has[0]) return;  // warp-uniform: this warp owns no output block
  typename M::C acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  for (int k0 = 0; k0 < kp; k0 += M::kK) {
    typename M::A fa[2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
      wmma::load_matrix_sync(fa[i], a + (wm * 32 + i * 16) * lda + k0, lda);
    if constexpr (std::is_same_v<T, float>) {
      typename M::A fa_lo[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) split_tf32(fa[i], fa_lo[i]);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        if (!has[j]) continue;
        typename M::B fb, fb_lo;
        wmma::load_matrix_sync(fb, w + (wn + 4 * j) * 16 * ldw + k0, ldw);
        split_tf32(fb, fb_lo);
#pragma unroll
        for (int i = 0; i < 2; ++i) {  // small terms first
          wmma::mma_sync(acc[i][j], fa_lo[i], fb, acc[i][j]);
          wmma::mma_sync(acc[i][j], fa[i], fb_lo, acc[i][j]);
          wmma::mma_sync(acc[i][j], fa[i], fb, acc[i][j]);
        }
      }
    } else {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        if (!has[j]) continue;
        typename M::B fb;
        wmma::load_matrix_sync(fb, w + (wn + 4 * j) * 16 * ldw + k0, ldw);
#pragma unroll
        for (int i = 0; i < 2; ++i) wmma::mma_sync(acc[i][j], fa[i], fb, acc[i][j]);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      if (has[j])
        wmma::store_matrix_sync(c + (wm * 32 + i * 16) * ldc + (wn + 4 * j) * 16, acc[i][j], ldc,
                                wmma::mem_row_major);
#endif
}

// A tile's first product, shared by the kernels: its feature rows e0 .. e0+len staged into s_x as
// T, then s_c = s_x * W^T over kp columns into np (W staged in s_w); the block is synchronised
// before and after.
template <typename T>
__device__ void first_gemm(T* s_x, int ldx, const T* feat, int64_t e0, int len, int c, int kp,
                           const T* s_w, int ldw, int np, float* s_c, int ldc) {
  stage_feat<T>(s_x, ldx, feat, e0, len, c, kp);
  __syncthreads();
  warp_gemm<T>(s_x, ldx, s_w, ldw, kp, np, s_c, ldc);
  __syncthreads();
}

// Attributes of the current device, queried once per device.
struct DeviceInfo {
  int major = 0, minor = 0, sms = 1, smem_optin = 0;
};

inline DeviceInfo device_info() {
  static std::mutex mutex;
  static std::map<int, DeviceInfo> cache;
  const int dev = c10::cuda::current_device();
  const std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(dev);
  if (it == cache.end()) {
    DeviceInfo info;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.major, cudaDevAttrComputeCapabilityMajor, dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.minor, cudaDevAttrComputeCapabilityMinor, dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.sms, cudaDevAttrMultiProcessorCount, dev));
    C10_CUDA_CHECK(
        cudaDeviceGetAttribute(&info.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    it = cache.emplace(dev, info).first;
  }
  return it->second;
}

inline cudaStream_t current_stream() {
  return c10::cuda::getCurrentCUDAStream().stream();
}

// Persistent grid: as many blocks as fit on the device at once (at most one per tile); results
// never depend on it. The occupancy query is cached per (kernel, shared memory, device), so later
// calls (e.g. under CUDA graph capture) make no driver calls.
template <typename Kernel>
inline int persistent_grid(const char* op, Kernel kernel, size_t smem, int64_t tiles) {
  const int device = c10::cuda::current_device();
  const DeviceInfo info = device_info();
  NINO_CHECK(smem <= size_t(info.smem_optin), op, ": these widths need ", smem,
             " bytes of shared memory per block, the device allows ", info.smem_optin,
             " (use a 16-bit feature dtype or the triton backend)");
  static std::mutex mutex;
  static std::map<std::tuple<const void*, size_t, int>, int> resident;  // blocks per device
  static std::set<std::pair<const void*, int>> opted_in;                // (kernel, device)
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), smem, device);
  int blocks = 0;
  {
    const std::lock_guard<std::mutex> lock(mutex);
    // The limit is a property of the kernel, not of one launch: raise it once to the device's
    // maximum. (Setting it to this call's size would shrink it for a kernel already launched with
    // more, and a later launch of the larger size, found in the cache below, would then fail with
    // "invalid argument".)
    if (opted_in.emplace(reinterpret_cast<const void*>(kernel), device).second) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          info.smem_optin));
    }
    auto it = resident.find(key);
    if (it == resident.end()) {
      int per_sm = 0;
      C10_CUDA_CHECK(
          cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
      it = resident.emplace(key, std::max(per_sm, 1) * info.sms).first;
    }
    blocks = it->second;
  }
  return int(std::max<int64_t>(1, std::min<int64_t>(tiles, blocks)));
}

// ---------------------------------------------------------------------------------------------------------
// Host-side checks and argument preparation

struct FloatArg {
  const void* ptr = nullptr;
  int dt = kF32;
};

inline int dtype_code(const char* op, const char* arg, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return kF32;
    case at::kDouble:
      return kF64;
    case at::kBFloat16:
      return kBF16;
    case at::kHalf:
      return kF16;
    default:
      NINO_CHECK(false, op, ": ", arg, " must be float32, float64, bfloat16 or float16, got ",
                 c10::toString(t.scalar_type()));
  }
  return kF32;
}

inline void check_cuda(const char* op, const char* arg, const at::Tensor& t,
                       const at::Device& dev) {
  NINO_CHECK(t.is_cuda(), op, ": ", arg, " must be a CUDA tensor (on ", dev, "), got ", t.device());
  check_device(op, arg, t, dev);
}

// A weight matrix of shape (rows, cols) or vector (rows,): any float dtype, made contiguous; kept
// alive by the returned tensor.
inline at::Tensor param(const char* op, const char* arg, const at::Tensor& t, at::IntArrayRef shape,
                        const at::Device& dev, FloatArg& out) {
  check_cuda(op, arg, t, dev);
  check_shape(op, arg, t, shape);
  out.dt = dtype_code(op, arg, t);
  auto c = t.contiguous();
  out.ptr = c.data_ptr();
  return c;
}

// int32 index vector of length `len` (int64 converted: utils/check.h).
inline at::Tensor index32(const char* op, const char* arg, const at::Tensor& t, int64_t len,
                          const at::Device& dev) {
  check_cuda(op, arg, t, dev);
  return as_index32(op, arg, t, len);
}

// etype (E,) integer -> int64 contiguous; type_table (types, width) -> fp32 contiguous.
struct TypeTable {
  at::Tensor etype, table;
  int64_t types = 0;
  bool on() const { return table.defined(); }
};

inline TypeTable type_table(const char* op, const std::optional<at::Tensor>& etype,
                            const std::optional<at::Tensor>& table, int64_t e, int64_t width,
                            const at::Device& dev) {
  NINO_CHECK(etype.has_value() == table.has_value(), op, ": etype and type_table go together (got ",
             etype.has_value() ? "etype" : "type_table", " alone)");
  TypeTable out;
  if (!table.has_value()) return out;
  check_cuda(op, "type_table", *table, dev);
  check_dim(op, "type_table", *table, 2);
  NINO_CHECK(table->size(1) == width, op, ": type_table must have ", width, " columns, got shape ",
             shape_str(*table));
  dtype_code(op, "type_table", *table);
  check_cuda(op, "etype", *etype, dev);
  check_dim(op, "etype", *etype, 1);
  NINO_CHECK(at::isIntegralType(etype->scalar_type(), /*includeBool=*/false), op,
             ": etype must be an integer tensor (int64), got ",
             c10::toString(etype->scalar_type()));
  NINO_CHECK(etype->numel() == e, op, ": etype must have E=", e, " entries, got ", etype->numel());
  out.etype = etype->to(at::kLong).contiguous();
  out.table = table->to(at::kFloat).contiguous();
  out.types = table->size(0);
  return out;
}

// Feature matrix: its dtype picks T (fp64 is computed as fp32).
inline at::Tensor features(const char* op, const at::Tensor& feat) {
  NINO_CHECK(feat.is_cuda(), op, ": feat must be a CUDA tensor for the CUDA kernel, got ",
             feat.device());
  check_dim(op, "feat", feat, 2);
  const auto st = feat.scalar_type();
  NINO_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf || st == at::kDouble, op,
             ": feat must be float32, bfloat16, float16 (or float64), got ", c10::toString(st));
  auto f = st == at::kDouble ? feat.to(at::kFloat) : feat;
  return f.contiguous();
}

inline void check_widths(const char* op, const char* what, int64_t v) {
  NINO_CHECK(v <= kMaxWidth, op, ": the CUDA kernel supports ", what, " <= ", kMaxWidth, ", got ",
             v, " (use the cpu/triton/reference backend for wider layers)");
}

inline void check_arch(const char* op) {
  const DeviceInfo info = device_info();
  NINO_CHECK(info.major >= 8, op,
             ": the CUDA kernels need compute capability >= 8.0 (tensor cores with bf16/tf32), "
             "got ",
             info.major, ".", info.minor);
}

// The leading arguments of every fused op, checked in one place: feat (its device and dtype pick
// the kernel; the guard makes that device current for the call, so the struct is built in place)
// and its sizes E, C.
struct FeatInputs {
  at::Tensor feat;
  at::Device dev;
  c10::cuda::CUDAGuard guard;
  int64_t e, c;

  FeatInputs(const char* op, const at::Tensor& feat_in)
      : feat(features(op, feat_in)),
        dev(feat.device()),
        guard(dev),
        e(feat.size(0)),
        c(feat.size(1)) {
    check_arch(op);
  }
};

// ... and of the CSR ops (film_mean, edge_film_mean): the destination-sorted rowptr (N + 1,) and
// src (E,) int32.
struct CsrInputs : FeatInputs {
  at::Tensor rowptr;
  int64_t n = 0;
  at::Tensor src;

  CsrInputs(const char* op, const at::Tensor& feat_in, const at::Tensor& rowptr_in,
            const at::Tensor& src_in)
      : FeatInputs(op, feat_in) {
    check_cuda(op, "rowptr", rowptr_in, dev);
    check_dim(op, "rowptr", rowptr_in, 1);
    check_dtype(op, "rowptr", rowptr_in, at::kLong);
    NINO_CHECK(rowptr_in.numel() >= 1, op, ": rowptr must have N+1 >= 1 entries, got 0");
    rowptr = rowptr_in.contiguous();
    n = rowptr.numel() - 1;
    NINO_CHECK(n > 0 || e == 0, op, ": rowptr must start at 0 and end at E=", e,
               ", got the 1-entry rowptr of an empty graph");
    src = index32(op, "src", src_in, e, dev);
  }
};

// A 2-D weight on the op's device; returns its row count (the layer's width).
inline int64_t weight_rows(const char* op, const char* arg, const at::Tensor& w,
                           const at::Device& dev) {
  check_cuda(op, arg, w, dev);
  check_dim(op, arg, w, 2);
  return w.size(0);
}

// weight_a of edge_mlp / edge_film_mean: (D_h, C), C the feat columns; returns D_h.
inline int64_t weight_a_rows(const char* op, const at::Tensor& w, int64_t c,
                             const at::Device& dev) {
  const int64_t rows = weight_rows(op, "weight_a", w, dev);
  NINO_CHECK(w.size(1) == c, op, ": weight_a must be (D_h, C) with C=", c,
             " (feat columns), got shape ", shape_str(w));
  return rows;
}

// Node tables gathered per edge: all read as the feature dtype T when they all have it (and T is
// 16-bit), else all as fp32 (converted once here). An absent table (t == nullptr) is skipped; rows
// < 0: any count.
struct NodeSpec {
  const char* name;
  const at::Tensor* t;
  int64_t width, rows;
};

struct NodeTables {
  bool low = false;  // read as T
  bool vec[4] = {true, true, true,
                 true};  // table i allows 4-wide vector loads (absent tables: true)
  at::Tensor t[4];
};

inline NodeTables node_tables(const char* op, at::ScalarType feat_type,
                              std::initializer_list<NodeSpec> specs, const at::Device& dev) {
  NodeTables out;
  TORCH_INTERNAL_ASSERT(specs.size() <= 4);
  bool all_t = feat_type == at::kBFloat16 || feat_type == at::kHalf;
  for (const auto& s : specs) {
    if (s.t == nullptr) continue;
    check_cuda(op, s.name, *s.t, dev);
    check_dim(op, s.name, *s.t, 2);
    dtype_code(op, s.name, *s.t);
    NINO_CHECK(s.t->size(1) == s.width, op, ": ", s.name, " must have ", s.width,
               " columns, got shape ", shape_str(*s.t));
    NINO_CHECK(s.rows < 0 || s.t->size(0) == s.rows, op, ": ", s.name, " must have ", s.rows,
               " rows, got shape ", shape_str(*s.t));
    all_t = all_t && s.t->scalar_type() == feat_type;
  }
  out.low = all_t;
  int i = 0;
  for (const auto& s : specs) {
    if (s.t != nullptr) {
      out.t[i] = (out.low ? *s.t : s.t->to(at::kFloat)).contiguous();
      const auto align = uintptr_t(out.low ? 8 : 16);
      out.vec[i] =
          s.width % 4 == 0 && reinterpret_cast<uintptr_t>(out.t[i].data_ptr()) % align == 0;
    }
    ++i;
  }
  return out;
}

// Calls fn(T{}, G{}) with the kernel's compute type T (from feat) and node-table type G (T or
// float).
template <typename Fn>
inline void dispatch_types(at::ScalarType feat_type, bool low_nodes, const Fn& fn) {
  switch (feat_type) {
    case at::kBFloat16:
      if (low_nodes)
        fn(__nv_bfloat16{}, __nv_bfloat16{});
      else
        fn(__nv_bfloat16{}, float{});
      break;
    case at::kHalf:
      if (low_nodes)
        fn(__half{}, __half{});
      else
        fn(__half{}, float{});
      break;
    default:
      fn(float{}, float{});
  }
}

template <typename G>
inline const G* ptr_as(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<const G*>(t.data_ptr()) : nullptr;
}

}  // namespace nino_fast::cuda
