// CUDA kernels of the COS-NCE / InfoNCE op (backend "cuda").
//
// The same four streaming primitives as the CPU kernel (csrc/cpu/cos_nce_cpu.cpp), with
// the math documented once in lrc_kernels/ops/native.py:
//
//   partials:          ss[b] = |s_b|^2, dot[b, j] = s_b . x_bj, xx[b, j] = |x_bj|^2
//   weighted_backward: grad s_b = sigma_b s_b + sum_j A_bj x_bj,  grad x_bj = A_bj s_b + G_bj x_bj
//   weighted_colsum:   out = sum_b w_b x_b
//   row_combine:       out_b = a_b x_b + c_b y_b + e_b v
//
// Hopper habits: 16-byte loads (Pack<T, VEC>) whenever every row is 16-byte aligned;
// warp-shuffle reductions, one warp per (row, negative, D-chunk) dot product; split-D
// (and split-K in the backward) grids so that B = 16 still puts several blocks on
// every SM. Inputs share one dtype (the Python wrapper promotes mixed dtypes); the
// accumulation is fp32 (fp64 for fp64 inputs). Gathered rows are read in place
// through the index (64-bit offsets): no [B, K, D] temporary. Argument checks live in the
// host-compiled binding (cos_nce_cuda.cpp), so every error is raised from there. Gradients of rows that
// can be read more than once (bank rows, or teacher rows used as the bank) are added
// with atomics into an accumulation-dtype buffer.

#include "../common/negative_mode.h"
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace lrc_cuda {

using Mode = NegativeMode;  // csrc/common/negative_mode.h

constexpr int kWarp = 32;
constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / kWarp;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename acc_t, typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, acc_t (&out)[VEC]) {
  const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = static_cast<acc_t>(pk.v[i]);
}

template <typename acc_t, typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const acc_t (&in)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int i = 0; i < VEC; ++i) pk.v[i] = static_cast<T>(in[i]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

template <typename acc_t, int VEC>
__device__ __forceinline__ void atomic_add_vec(acc_t* p, const acc_t (&in)[VEC]) {
#pragma unroll
  for (int i = 0; i < VEC; ++i) atomicAdd(p + i, in[i]);
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Where row x_bj lives: j = 0 is the teacher row, j >= 1 the (j-1)-th negative.
template <typename T>
struct Operands {
  const T* s;
  int64_t s_stride;
  const T* t;
  int64_t t_stride;
  const T* n;             // explicit negatives [B, K, D], or the bank (the teacher in teacher-bank mode)
  int64_t n_stride_b;     // explicit: batch stride; bank: row stride
  int64_t n_stride_k;     // explicit only
  const int64_t* index;   // [B, K], indexed modes
  int64_t K;
  int mode;

  __device__ __forceinline__ const T* student(int64_t b) const { return s + b * s_stride; }
  __device__ __forceinline__ int64_t bank_row(int64_t b, int64_t j) const { return index[b * K + j - 1]; }
  __device__ __forceinline__ const T* x(int64_t b, int64_t j) const {
    if (j == 0) return t + b * t_stride;
    if (mode == kExplicit) return n + b * n_stride_b + (j - 1) * n_stride_k;
    return n + bank_row(b, j) * n_stride_b;
  }
};

// ------------------------------------------------------------------------------ kernels

// The (group, split, row) a block works on; blocks are numbered group-fastest, then split.
struct BlockTask {
  int group;
  int split;
  int64_t row;
};

__device__ __forceinline__ BlockTask block_task(int groups, int splits) {
  int64_t blk = blockIdx.x;
  const int group = blk % groups;
  blk /= groups;
  return {group, static_cast<int>(blk % splits), blk / splits};
}

// One warp per task (b, split, task), task 0 = |s|^2, task j + 1 = (s . x_j, |x_j|^2).
// part is [B, splits, J + 1, 2].
template <typename T, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads) partials_kernel(Operands<T> op, int64_t D, int64_t chunk, int splits,
                                                            int groups, acc_t* __restrict__ part) {
  const int64_t J = op.K + 1;
  const auto [g, split, b] = block_task(groups, splits);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t task = static_cast<int64_t>(g) * kWarpsPerBlock + warp;
  if (task > J) return;
  const int64_t d0 = split * chunk, d1 = min(D, d0 + chunk);
  const T* s = op.student(b);
  const T* x = task == 0 ? s : op.x(b, task - 1);
  acc_t dot = 0, sq = 0;
#pragma unroll 4
  for (int64_t d = d0 + lane * VEC; d < d1; d += kWarp * VEC) {
    acc_t sv[VEC], xv[VEC];
    load_vec<acc_t, T, VEC>(s + d, sv);
    load_vec<acc_t, T, VEC>(x + d, xv);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      dot += sv[i] * xv[i];
      sq += xv[i] * xv[i];
    }
  }
  dot = warp_sum(dot);
  sq = warp_sum(sq);
  if (lane == 0) {
    acc_t* out = part + ((b * splits + split) * (J + 1) + task) * 2;
    out[0] = dot;
    out[1] = sq;
  }
}

// Gradient targets. A row gradient is stored directly (T) when each row is written by
// one (b, j), else added atomically into an acc_t buffer; nullptr where not asked for.
template <typename T, typename acc_t>
struct GradTargets {
  T* s_direct;
  acc_t* s_atomic;
  T* t_direct;
  acc_t* t_atomic;   // teacher-bank mode: teacher rows are positives and negatives
  T* n_direct;       // explicit negatives [B, K, D]
  acc_t* n_atomic;   // bank [N, D]
};

// Block (b, split, group): D-chunk `split` of row b, negatives j in [j0, j1).
template <typename T, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads) weighted_backward_kernel(
    Operands<T> op, int64_t D, int64_t chunk, int splits, int groups, int64_t per_group,
    const acc_t* __restrict__ A, const acc_t* __restrict__ G, const acc_t* __restrict__ sigma,
    GradTargets<T, acc_t> out) {
  const int64_t J = op.K + 1;
  const auto [g, split, b] = block_task(groups, splits);
  const int64_t j0 = g * per_group, j1 = min(J, j0 + per_group);
  const int64_t d0 = split * chunk, d1 = min(D, d0 + chunk);
  const bool need_s = out.s_direct || out.s_atomic;
  const acc_t* Ab = A + b * J;
  const acc_t* Gb = G + b * J;
  for (int64_t d = d0 + threadIdx.x * VEC; d < d1; d += kThreads * VEC) {
    acc_t s[VEC], gs[VEC];
    load_vec<acc_t, T, VEC>(op.student(b) + d, s);
    const acc_t self = g == 0 ? sigma[b] : acc_t(0);
#pragma unroll
    for (int i = 0; i < VEC; ++i) gs[i] = self * s[i];
#pragma unroll 2
    for (int64_t j = j0; j < j1; ++j) {
      acc_t x[VEC], gx[VEC];
      load_vec<acc_t, T, VEC>(op.x(b, j) + d, x);
      const acc_t a = Ab[j], c = Gb[j];
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        gs[i] += a * x[i];
        gx[i] = a * s[i] + c * x[i];
      }
      if (j == 0) {
        if (out.t_direct) store_vec<acc_t, T, VEC>(out.t_direct + b * D + d, gx);
        else if (out.t_atomic) atomic_add_vec<acc_t, VEC>(out.t_atomic + b * D + d, gx);
      } else if (op.mode == kExplicit) {
        if (out.n_direct) store_vec<acc_t, T, VEC>(out.n_direct + (b * op.K + j - 1) * D + d, gx);
      } else if (op.mode == kBank) {
        if (out.n_atomic) atomic_add_vec<acc_t, VEC>(out.n_atomic + op.bank_row(b, j) * D + d, gx);
      } else if (out.t_atomic) {  // teacher bank
        atomic_add_vec<acc_t, VEC>(out.t_atomic + op.bank_row(b, j) * D + d, gx);
      }
    }
    if (!need_s) continue;
    if (out.s_direct) store_vec<acc_t, T, VEC>(out.s_direct + b * D + d, gs);
    else atomic_add_vec<acc_t, VEC>(out.s_atomic + b * D + d, gs);
  }
}

// part[split, d] = sum_{b in split} w_b x[b, d]; part is [splits, D].
template <typename T, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads) weighted_colsum_kernel(const T* __restrict__ x, int64_t stride, int64_t B,
                                                                   int64_t D, int64_t rows_per_split,
                                                                   const acc_t* __restrict__ w, acc_t* __restrict__ part) {
  const int64_t d = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * VEC;
  if (d >= D) return;
  const int64_t b0 = blockIdx.y * rows_per_split, b1 = min(B, b0 + rows_per_split);
  acc_t sum[VEC] = {};
#pragma unroll 4
  for (int64_t b = b0; b < b1; ++b) {
    acc_t xv[VEC];
    load_vec<acc_t, T, VEC>(x + b * stride + d, xv);
    const acc_t wb = w[b];
#pragma unroll
    for (int i = 0; i < VEC; ++i) sum[i] += wb * xv[i];
  }
  store_vec<acc_t, acc_t, VEC>(part + blockIdx.y * D + d, sum);
}

// part[b, split] = x_b . v over D-chunk `split`; part is [B, splits].
template <typename T, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads) row_dot_vec_kernel(const T* __restrict__ x, int64_t stride, int64_t D,
                                                               int64_t chunk, int splits, const acc_t* __restrict__ v,
                                                               acc_t* __restrict__ part) {
  __shared__ acc_t warp_sums[kWarpsPerBlock];
  const int64_t b = blockIdx.x / splits;
  const int split = blockIdx.x % splits;
  const int64_t d0 = split * chunk, d1 = min(D, d0 + chunk);
  acc_t dot = 0;
#pragma unroll 4
  for (int64_t d = d0 + threadIdx.x * VEC; d < d1; d += kThreads * VEC) {
    acc_t xv[VEC];
    load_vec<acc_t, T, VEC>(x + b * stride + d, xv);
#pragma unroll
    for (int i = 0; i < VEC; ++i) dot += xv[i] * v[d + i];
  }
  dot = warp_sum(dot);
  if (threadIdx.x % kWarp == 0) warp_sums[threadIdx.x / kWarp] = dot;
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t total = 0;
#pragma unroll
    for (int w = 0; w < kWarpsPerBlock; ++w) total += warp_sums[w];
    part[b * splits + split] = total;
  }
}

// out[b] = a_b x_b + c_b y_b + e_b v  (out contiguous [B, D]).
template <typename T, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads) row_combine_kernel(const T* __restrict__ x, int64_t x_stride,
                                                               const T* __restrict__ y, int64_t y_stride, int64_t B,
                                                               int64_t D,
                                                               const acc_t* __restrict__ a, const acc_t* __restrict__ c,
                                                               const acc_t* __restrict__ v, const acc_t* __restrict__ e,
                                                               T* __restrict__ out) {
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const acc_t ab = a[b], cb = c[b], eb = e[b];
    for (int64_t d = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * VEC; d < D;
         d += static_cast<int64_t>(gridDim.x) * kThreads * VEC) {
      acc_t xv[VEC], yv[VEC], r[VEC];
      load_vec<acc_t, T, VEC>(x + b * x_stride + d, xv);
      load_vec<acc_t, T, VEC>(y + b * y_stride + d, yv);
#pragma unroll
      for (int i = 0; i < VEC; ++i) r[i] = ab * xv[i] + cb * yv[i] + eb * v[d + i];
      store_vec<acc_t, T, VEC>(out + b * D + d, r);
    }
  }
}

// ------------------------------------------------------------------------------ host side

namespace {

int sm_count() {
  int device = 0, count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool aligned16(const at::Tensor& t) {
  return !t.defined() || t.numel() == 0 || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// 16-byte vectors when every row start and D allow them, else scalars.
int vector_width(const at::Tensor& ref, int64_t D, std::initializer_list<at::Tensor> tensors) {
  const int vec = 16 / static_cast<int>(ref.element_size());
  if (D % vec) return 1;
  for (const auto& t : tensors) {
    if (!t.defined() || t.numel() == 0) continue;
    if (!aligned16(t)) return 1;
    for (int64_t d = 0; d + 1 < t.dim(); ++d)
      if (t.stride(d) % vec) return 1;
  }
  return vec;
}

#define LRC_DISPATCH_VEC(VEC_VALUE, ...)              \
  [&] {                                               \
    switch (VEC_VALUE) {                              \
      case 8: { constexpr int VEC = 8; return __VA_ARGS__(); } \
      case 4: { constexpr int VEC = 4; return __VA_ARGS__(); } \
      case 2: { constexpr int VEC = 2; return __VA_ARGS__(); } \
      default: { constexpr int VEC = 1; return __VA_ARGS__(); } \
    }                                                 \
  }()

template <typename T>
Operands<T> make_operands(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& negatives,
                          const at::Tensor& index, int mode) {
  Operands<T> op{};
  op.s = student.data_ptr<T>();
  op.s_stride = student.stride(0);
  op.t = teacher.data_ptr<T>();
  op.t_stride = teacher.stride(0);
  op.mode = mode;
  if (mode == kExplicit) {
    op.n = negatives.data_ptr<T>();
    op.n_stride_b = negatives.stride(0);
    op.n_stride_k = negatives.stride(1);
    op.K = negatives.size(1);
  } else if (mode == kBank || mode == kTeacherBank) {
    const at::Tensor& bank = mode == kBank ? negatives : teacher;
    op.n = bank.data_ptr<T>();
    op.n_stride_b = bank.stride(0);
    op.index = index.data_ptr<int64_t>();
    op.K = index.size(1);
  }
  return op;
}

template <typename P>
P* data_or_null(at::Tensor& t) {
  return t.defined() ? t.data_ptr<P>() : nullptr;
}

at::ScalarType acc_type(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

std::vector<at::Tensor> partials(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& negatives,
                                 const at::Tensor& index, int64_t mode) {
  const c10::cuda::CUDAGuard guard(student.device());
  const int64_t B = student.size(0), D = student.size(1);
  const int64_t K = mode == kExplicit ? negatives.size(1) : (mode == kNone ? 0 : index.size(1));
  const int64_t J = K + 1;
  const int vec = vector_width(student, D, {student, teacher, mode == kTeacherBank ? at::Tensor() : negatives});
  const int groups = static_cast<int>(ceil_div(J + 1, kWarpsPerBlock));
  // Split D until there are ~4 blocks per SM, keeping >= 4 vector loads per lane.
  const int64_t max_splits = std::max<int64_t>(1, D / (kWarp * vec * 4));
  int64_t splits = std::clamp<int64_t>(ceil_div(4 * sm_count(), B * groups), 1, max_splits);
  const int64_t chunk = ceil_div(ceil_div(D, splits), vec) * vec;
  splits = std::max<int64_t>(1, ceil_div(D, chunk));
  const auto acc = acc_type(student.scalar_type());
  auto part = at::empty({B, splits, J + 1, 2}, student.options().dtype(acc));
  const int64_t blocks = B * splits * groups;
  if (blocks > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "lrc_partials", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      const auto op = make_operands<scalar_t>(student, teacher, negatives, index, mode);
      LRC_DISPATCH_VEC(vec, [&] {
        partials_kernel<scalar_t, acc_t, VEC><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            op, D, chunk, splits, groups, part.data_ptr<acc_t>());
      });
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  auto total = part.sum(1);  // [B, J + 1, 2]
  auto ss = total.select(1, 0).select(1, 0).contiguous();
  auto rest = total.narrow(1, 1, J);
  return {ss, rest.select(2, 0).contiguous(), rest.select(2, 1).contiguous()};
}

std::vector<at::Tensor> weighted_backward(const at::Tensor& student, const at::Tensor& teacher,
                                          const at::Tensor& negatives, const at::Tensor& index, int64_t mode,
                                          const at::Tensor& coef_a, const at::Tensor& coef_g, const at::Tensor& sigma,
                                          bool need_s, bool need_t, bool need_n) {
  const c10::cuda::CUDAGuard guard(student.device());
  const int64_t B = student.size(0), D = student.size(1);
  const int64_t K = mode == kExplicit ? negatives.size(1) : (mode == kNone ? 0 : index.size(1));
  const int64_t J = K + 1;
  const auto acc = acc_type(student.scalar_type());
  need_n = need_n && (mode == kExplicit || mode == kBank);
  const int vec = vector_width(student, D, {student, teacher, mode == kTeacherBank ? at::Tensor() : negatives});
  // Split D, then the negatives, until there are ~4 blocks per SM.
  const int64_t target = 4 * sm_count();
  const int64_t max_splits = std::max<int64_t>(1, D / (kThreads * vec));
  int64_t splits = std::clamp<int64_t>(ceil_div(target, B), 1, max_splits);
  const int64_t chunk = ceil_div(ceil_div(D, splits), vec) * vec;
  splits = std::max<int64_t>(1, ceil_div(D, chunk));
  int64_t groups = std::clamp<int64_t>(ceil_div(target, B * splits), 1, std::max<int64_t>(1, J / 4));
  const int64_t per_group = ceil_div(J, groups);
  groups = ceil_div(J, per_group);

  const auto opts = student.options();
  const auto acc_opts = opts.dtype(acc);
  const bool same = student.scalar_type() == acc;  // fp32 / fp64: the atomic buffer is the gradient itself
  at::Tensor grad_s, grad_t, grad_n, s_buf, t_buf, n_buf;
  if (need_s) {
    if (groups == 1) grad_s = at::empty({B, D}, opts);
    else s_buf = at::zeros({B, D}, acc_opts);
  }
  const bool teacher_atomic = mode == kTeacherBank;
  if (need_t) {
    if (teacher_atomic) t_buf = at::zeros({B, D}, acc_opts);
    else grad_t = at::empty({B, D}, opts);
  }
  if (need_n) {
    if (mode == kExplicit) grad_n = at::empty({B, K, D}, opts);
    else n_buf = at::zeros({negatives.size(0), D}, acc_opts);
  }
  const int64_t blocks = B * splits * groups;
  if (blocks > 0 && (need_s || need_t || need_n)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "lrc_weighted_backward", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      const auto op = make_operands<scalar_t>(student, teacher, negatives, index, mode);
      GradTargets<scalar_t, acc_t> out{data_or_null<scalar_t>(grad_s), data_or_null<acc_t>(s_buf),
                                       data_or_null<scalar_t>(grad_t), data_or_null<acc_t>(t_buf),
                                       data_or_null<scalar_t>(grad_n), data_or_null<acc_t>(n_buf)};
      LRC_DISPATCH_VEC(vec, [&] {
        weighted_backward_kernel<scalar_t, acc_t, VEC><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            op, D, chunk, static_cast<int>(splits), static_cast<int>(groups), per_group, coef_a.data_ptr<acc_t>(),
            coef_g.data_ptr<acc_t>(), sigma.data_ptr<acc_t>(), out);
      });
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (s_buf.defined()) grad_s = same ? s_buf : s_buf.to(student.scalar_type());
  if (t_buf.defined()) grad_t = same ? t_buf : t_buf.to(student.scalar_type());
  if (n_buf.defined()) grad_n = same ? n_buf : n_buf.to(student.scalar_type());
  return {grad_s, grad_t, grad_n};
}

at::Tensor weighted_colsum(const at::Tensor& x, const at::Tensor& w) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), D = x.size(1);
  const auto acc = acc_type(x.scalar_type());
  const int vec = vector_width(x, D, {x});
  const int64_t col_blocks = ceil_div(ceil_div(D, vec), kThreads);
  const int64_t splits = std::clamp<int64_t>(ceil_div(4 * sm_count(), col_blocks), 1, std::clamp<int64_t>(B / 8, 1, 65535));
  const int64_t rows_per_split = ceil_div(std::max<int64_t>(B, 1), splits);
  auto part = at::zeros({splits, D}, x.options().dtype(acc));
  if (B > 0 && D > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lrc_weighted_colsum", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      LRC_DISPATCH_VEC(vec, [&] {
        weighted_colsum_kernel<scalar_t, acc_t, VEC>
            <<<dim3(col_blocks, splits), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
                x.data_ptr<scalar_t>(), x.stride(0), B, D, rows_per_split, w.data_ptr<acc_t>(), part.data_ptr<acc_t>());
      });
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return part.sum(0);
}

at::Tensor row_dot_vec(const at::Tensor& x, const at::Tensor& v) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), D = x.size(1);
  const auto acc = acc_type(x.scalar_type());
  const int vec = vector_width(x, D, {x});
  const int64_t max_splits = std::max<int64_t>(1, D / (kThreads * vec * 2));
  int64_t splits = std::clamp<int64_t>(ceil_div(4 * sm_count(), std::max<int64_t>(B, 1)), 1, max_splits);
  const int64_t chunk = ceil_div(ceil_div(D, splits), vec) * vec;
  splits = std::max<int64_t>(1, ceil_div(D, chunk));
  auto part = at::zeros({B, splits}, x.options().dtype(acc));
  if (B > 0 && D > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lrc_row_dot_vec", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      LRC_DISPATCH_VEC(vec, [&] {
        row_dot_vec_kernel<scalar_t, acc_t, VEC><<<B * splits, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            x.data_ptr<scalar_t>(), x.stride(0), D, chunk, static_cast<int>(splits), v.data_ptr<acc_t>(),
            part.data_ptr<acc_t>());
      });
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return part.sum(1);
}

at::Tensor row_combine(const at::Tensor& x, const at::Tensor& a, const at::Tensor& y, const at::Tensor& c,
                       const at::Tensor& v, const at::Tensor& e, at::ScalarType out_dtype) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), D = x.size(1);
  auto out = at::empty({B, D}, x.options());
  const int vec = vector_width(x, D, {x, y, out});
  const int64_t col_blocks = std::min<int64_t>(ceil_div(ceil_div(D, vec), kThreads), 65535);
  if (B > 0 && D > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lrc_row_combine", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      LRC_DISPATCH_VEC(vec, [&] {
        row_combine_kernel<scalar_t, acc_t, VEC><<<dim3(col_blocks, std::min<int64_t>(B, 65535)), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            x.data_ptr<scalar_t>(), x.stride(0), y.data_ptr<scalar_t>(), y.stride(0), B, D, a.data_ptr<acc_t>(),
            c.data_ptr<acc_t>(), v.data_ptr<acc_t>(), e.data_ptr<acc_t>(), out.data_ptr<scalar_t>());
      });
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out_dtype == x.scalar_type() ? out : out.to(out_dtype);
}

}  // namespace lrc_cuda
