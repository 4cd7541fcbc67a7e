// Python bindings of the CUDA kernels in cos_nce_cuda.cu (backend "cuda"); same
// signatures as the CPU kernel's, so lrc_kernels/ops/native.py drives both.

#include <torch/extension.h>

#include <vector>

namespace lrc_cuda {
std::vector<at::Tensor> partials(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& negatives,
                                 const at::Tensor& index, int64_t mode, bool check_index);
std::vector<at::Tensor> weighted_backward(const at::Tensor& student, const at::Tensor& teacher,
                                          const at::Tensor& negatives, const at::Tensor& index, int64_t mode,
                                          const at::Tensor& coef_a, const at::Tensor& coef_g, const at::Tensor& sigma,
                                          bool need_s, bool need_t, bool need_n);
at::Tensor weighted_colsum(const at::Tensor& x, const at::Tensor& w);
at::Tensor row_dot_vec(const at::Tensor& x, const at::Tensor& v);
at::Tensor row_combine(const at::Tensor& x, const at::Tensor& a, const at::Tensor& y, const at::Tensor& c,
                       const at::Tensor& v, const at::Tensor& e, at::ScalarType out_dtype);
}  // namespace lrc_cuda

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lrc_kernels CUDA primitives (see lrc_kernels/ops/native.py)";
  m.def("partials", &lrc_cuda::partials);
  m.def("weighted_backward", &lrc_cuda::weighted_backward);
  m.def("weighted_colsum", &lrc_cuda::weighted_colsum);
  m.def("row_dot_vec", &lrc_cuda::row_dot_vec);
  m.def("row_combine", &lrc_cuda::row_combine);
}
