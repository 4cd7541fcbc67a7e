// Python bindings of the CUDA kernels in cos_nce_cuda.cu (backend "cuda"), with the same
// signatures as the CPU kernel's, so lrc_kernels/ops/native.py drives both. Argument
// checks live here, in host-compiled code: the kernels' file only launches. The neg_index
// range is checked in Python (lrc_kernels/ops/native.py), where an error surfaces cleanly.

#include "../common/negative_mode.h"
#include <torch/extension.h>

#include <vector>

namespace lrc_cuda {
std::vector<at::Tensor> partials(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& negatives,
                                 const at::Tensor& index, int64_t mode);
std::vector<at::Tensor> weighted_backward(const at::Tensor& student, const at::Tensor& teacher,
                                          const at::Tensor& negatives, const at::Tensor& index, int64_t mode,
                                          const at::Tensor& coef_a, const at::Tensor& coef_g, const at::Tensor& sigma,
                                          bool need_s, bool need_t, bool need_n);
at::Tensor weighted_colsum(const at::Tensor& x, const at::Tensor& w);
at::Tensor row_dot_vec(const at::Tensor& x, const at::Tensor& v);
at::Tensor row_combine(const at::Tensor& x, const at::Tensor& a, const at::Tensor& y, const at::Tensor& c,
                       const at::Tensor& v, const at::Tensor& e, at::ScalarType out_dtype);
}  // namespace lrc_cuda

namespace {

using Mode = NegativeMode;  // csrc/common/negative_mode.h

at::ScalarType acc_type(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.stride(1) == 1, name, " must be a [B, D] CUDA tensor with unit last stride");
}

void check_coefficients(const at::Tensor& like, std::initializer_list<const at::Tensor*> coefs) {
  for (const auto* c : coefs)
    TORCH_CHECK(c->is_cuda() && c->is_contiguous() && c->scalar_type() == acc_type(like),
                "coefficients must be contiguous CUDA tensors in the accumulation dtype");
}

void check_inputs(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& negatives,
                  const at::Tensor& index, int64_t mode) {
  check_rows(student, "student");
  check_rows(teacher, "teacher");
  TORCH_CHECK(teacher.sizes() == student.sizes() && teacher.scalar_type() == student.scalar_type(),
              "student and teacher must share a shape and a dtype");
  TORCH_CHECK(mode >= kNone && mode <= kTeacherBank, "unknown negative mode ", mode);
  if (mode == kExplicit) {
    TORCH_CHECK(negatives.is_cuda() && negatives.dim() == 3 && negatives.size(0) == student.size(0) &&
                    negatives.size(2) == student.size(1) && negatives.stride(2) == 1 &&
                    negatives.scalar_type() == student.scalar_type(),
                "negatives must be a [B, K, D] CUDA tensor with unit last stride and the student's dtype");
  }
  if (mode == kBank || mode == kTeacherBank) {
    const at::Tensor& bank = mode == kBank ? negatives : teacher;
    TORCH_CHECK(bank.is_cuda() && bank.dim() == 2 && bank.size(1) == student.size(1) && bank.stride(1) == 1 &&
                    bank.scalar_type() == student.scalar_type(),
                "the bank must be an [N, D] CUDA tensor with unit last stride and the student's dtype");
    TORCH_CHECK(index.is_cuda() && index.scalar_type() == at::kLong && index.is_contiguous() && index.dim() == 2 &&
                    index.size(0) == student.size(0),
                "neg_index must be a contiguous [B, K] int64 CUDA tensor");
  }
}

std::vector<at::Tensor> partials(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& negatives,
                                 const at::Tensor& index, int64_t mode) {
  check_inputs(student, teacher, negatives, index, mode);
  return lrc_cuda::partials(student, teacher, negatives, index, mode);
}

std::vector<at::Tensor> weighted_backward(const at::Tensor& student, const at::Tensor& teacher,
                                          const at::Tensor& negatives, const at::Tensor& index, int64_t mode,
                                          const at::Tensor& coef_a, const at::Tensor& coef_g, const at::Tensor& sigma,
                                          bool need_s, bool need_t, bool need_n) {
  check_inputs(student, teacher, negatives, index, mode);
  check_coefficients(student, {&coef_a, &coef_g, &sigma});
  return lrc_cuda::weighted_backward(student, teacher, negatives, index, mode, coef_a, coef_g, sigma, need_s, need_t,
                                     need_n);
}

at::Tensor weighted_colsum(const at::Tensor& x, const at::Tensor& w) {
  check_rows(x, "x");
  check_coefficients(x, {&w});
  TORCH_CHECK(w.numel() == x.size(0), "w must have one weight per row");
  return lrc_cuda::weighted_colsum(x, w);
}

at::Tensor row_dot_vec(const at::Tensor& x, const at::Tensor& v) {
  check_rows(x, "x");
  check_coefficients(x, {&v});
  TORCH_CHECK(v.numel() == x.size(1), "v must have D entries");
  return lrc_cuda::row_dot_vec(x, v);
}

at::Tensor row_combine(const at::Tensor& x, const at::Tensor& a, const at::Tensor& y, const at::Tensor& c,
                       const at::Tensor& v, const at::Tensor& e, at::ScalarType out_dtype) {
  check_rows(x, "x");
  check_rows(y, "y");
  TORCH_CHECK(y.sizes() == x.sizes() && y.scalar_type() == x.scalar_type(), "x and y must share a shape and a dtype");
  check_coefficients(x, {&a, &c, &v, &e});
  TORCH_CHECK(v.numel() == x.size(1), "v must have D entries");
  return lrc_cuda::row_combine(x, a, y, c, v, e, out_dtype);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lrc_kernels CUDA primitives (see lrc_kernels/ops/native.py)";
  m.def("partials", &partials);
  m.def("weighted_backward", &weighted_backward);
  m.def("weighted_colsum", &weighted_colsum);
  m.def("row_dot_vec", &row_dot_vec);
  m.def("row_combine", &row_combine);
}
