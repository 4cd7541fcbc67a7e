"""Backend "cpp": the fused CPU kernels of ``csrc/cpu/cos_nce_cpu.cpp``.

Build: just-in-time with ``torch.utils.cpp_extension.load`` (ninja) on first use, with
``-O3 -march=native -fopenmp``. It is cached under ``TORCH_EXTENSIONS_DIR`` (by default
``~/.cache/torch_extensions``), keyed by the source and by this CPU's instruction-set
flags. Importing ``lrc_kernels`` never compiles. ``backend="auto"`` falls back to the
torch backend, with one warning, if the build fails; ``backend="cpp"`` raises.

The math (notation of ``cos_nce_triton.py``): the C++ ``partials`` pass gives |s|^2, s.x_j
and |x_j|^2. From those, torch computes the cosines c [B, K+1], the loss, and in the
backward the weights w = dL/dc. The C++ ``weighted_backward`` pass then forms

    grad s   = sigma s + sum_j A_j x_j,       A_j = go w_j / (ns nx_j),  sigma = -go (sum_j w_j c_j) m_s / ns^2
    grad x_j = A_j s + G_j x_j,               G_j = -go w_j c_j m_j / nx_j^2

In-batch COS-NCE is the shared O(B D) algorithm of ``in_batch.py`` over C++ primitives.
In-batch InfoNCE is one GEMM of the raw rows divided by the norm product, in torch (the
GEMM is what the CPU BLAS does best).

The C++ primitives are registered as ``torch.ops.lrc_kernels.cpu_*`` custom ops with fake
(meta) kernels, and the autograd Functions around them are plain traceable Python, so
``torch.compile(fullgraph=True)`` captures the whole loss without a graph break.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import List, Optional

import torch
from torch import Tensor

from .._validation import EXPLICIT, IN_BATCH, ContrastiveProblem
from ..reference import compute_dtype, loss_from_cosines
from ._autograd import single_backward
from .in_batch import InBatchCosNCE

SOURCE = Path(__file__).resolve().parents[2] / "csrc" / "cpu" / "cos_nce_cpu.cpp"
_log = logging.getLogger(__name__)

# Negative modes understood by the C++ kernels.
_NO_NEGATIVES, _EXPLICIT, _BANK, _TEACHER_BANK = 0, 1, 2, 3


def compiler_present() -> bool:
    return SOURCE.exists() and shutil.which(os.environ.get("CXX", "c++")) is not None


def _build_tag() -> str:
    """Source + CPU instruction-set flags: a -march=native build never runs on another CPU."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    try:
        with open("/proc/cpuinfo") as f:
            digest.update(next((line for line in f if line.startswith("flags")), "").encode())
    except OSError:
        pass
    return digest.hexdigest()[:12]


@functools.lru_cache(maxsize=None)
def extension():
    """Build (once, cached on disk) and load the C++ extension."""
    from torch.utils.cpp_extension import load

    if not SOURCE.exists():
        raise RuntimeError(f"the C++ source {SOURCE} is missing; install lrc_kernels from its source tree")
    _log.info("lrc_kernels: building the C++ CPU kernels (first use only; about a minute)")
    return load(
        name=f"lrc_kernels_cpu_{_build_tag()}",
        sources=[str(SOURCE)],
        extra_cflags=["-O3", "-march=native", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


def ensure_ready() -> None:
    """Called by the backend registry before first use: surfaces build errors early."""
    extension()


def _placeholder(dtype=torch.float32):
    return torch.empty(0, dtype=dtype)


# --------------------------------------------------------------------------- torch.library ops


@torch.library.custom_op("lrc_kernels::cpu_partials", mutates_args=(), device_types="cpu")
def cpu_partials(student: Tensor, teacher: Tensor, negatives: Optional[Tensor], neg_index: Optional[Tensor],
                 mode: int) -> tuple[Tensor, Tensor, Tensor]:
    """(|s|^2 [B], s.x_j [B, K+1], |x_j|^2 [B, K+1]) with x_0 = t and x_k the negatives."""
    negatives = _placeholder() if negatives is None else negatives
    neg_index = _placeholder(torch.int64) if neg_index is None else neg_index
    ss, dots, xx = extension().partials(student, teacher, negatives, neg_index, mode)
    return ss, dots, xx


@cpu_partials.register_fake
def _(student, teacher, negatives, neg_index, mode):
    num_neg = 0 if mode == _NO_NEGATIVES else (negatives.shape[1] if mode == _EXPLICIT else neg_index.shape[1])
    acc = compute_dtype(student, teacher, negatives)
    batch = student.shape[0]
    return (student.new_empty(batch, dtype=acc), student.new_empty(batch, num_neg + 1, dtype=acc),
            student.new_empty(batch, num_neg + 1, dtype=acc))


@torch.library.custom_op("lrc_kernels::cpu_weighted_backward", mutates_args=(), device_types="cpu")
def cpu_weighted_backward(student: Tensor, teacher: Tensor, negatives: Optional[Tensor], neg_index: Optional[Tensor],
                          mode: int, coef_a: Tensor, coef_g: Tensor, sigma: Tensor, need_s: bool, need_t: bool,
                          need_n: bool) -> List[Tensor]:
    """The grads asked for, in the order (student, teacher, negatives)."""
    negatives = _placeholder() if negatives is None else negatives
    neg_index = _placeholder(torch.int64) if neg_index is None else neg_index
    grads = extension().weighted_backward(student, teacher, negatives, neg_index, mode, coef_a, coef_g, sigma,
                                          need_s, need_t, need_n)
    return [g for g, need in zip(grads, (need_s, need_t, need_n)) if need]


@cpu_weighted_backward.register_fake
def _(student, teacher, negatives, neg_index, mode, coef_a, coef_g, sigma, need_s, need_t, need_n):
    like = [(need_s, student), (need_t, teacher), (need_n, negatives)]
    return [x.new_empty(x.shape) for need, x in like if need]


@torch.library.custom_op("lrc_kernels::cpu_weighted_colsum", mutates_args=(), device_types="cpu")
def cpu_weighted_colsum(x: Tensor, w: Tensor) -> Tensor:
    """sum_b w[b] x[b] -> [D] in w's dtype."""
    return extension().weighted_colsum(x, w)


@cpu_weighted_colsum.register_fake
def _(x, w):
    return w.new_empty(x.shape[1])


@torch.library.custom_op("lrc_kernels::cpu_row_dot_vec", mutates_args=(), device_types="cpu")
def cpu_row_dot_vec(x: Tensor, v: Tensor) -> Tensor:
    """x[b] . v -> [B] in v's dtype."""
    return extension().row_dot_vec(x, v)


@cpu_row_dot_vec.register_fake
def _(x, v):
    return v.new_empty(x.shape[0])


@torch.library.custom_op("lrc_kernels::cpu_row_combine", mutates_args=(), device_types="cpu")
def cpu_row_combine(x: Tensor, a: Tensor, y: Tensor, c: Tensor, v: Tensor, e: Tensor,
                    out_dtype: torch.dtype) -> Tensor:
    """a[b] x[b] + c[b] y[b] + e[b] v -> [B, D] in out_dtype."""
    return extension().row_combine(x, a, y, c, v, e, out_dtype)


@cpu_row_combine.register_fake
def _(x, a, y, c, v, e, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype)


def cosine_weights(loss: str, cos: torch.Tensor, temperature: float) -> torch.Tensor:
    """w = dL/dc for cosines c [B, K+1] (column 0 is the positive)."""
    if loss == "cos_nce":
        w = torch.full_like(cos, 0.5 / (cos.shape[1] - 1))
        w[:, 0] = -1.5
        return w
    w = torch.softmax(cos / temperature, dim=1) / temperature
    w[:, 0] -= 1.0 / temperature
    return w


class _GatherNegativesLoss(torch.autograd.Function):
    """Per-row loss with explicit [B, K, D] negatives or rows gathered from a bank by index."""

    @staticmethod
    def forward(ctx, student, teacher, negatives, neg_index, mode, loss, eps, temperature):
        ss, dots, xx = torch.ops.lrc_kernels.cpu_partials(student, teacher, negatives, neg_index, mode)
        norm_s, norm_x = ss.sqrt(), xx.sqrt()
        cos = dots / (norm_s.clamp_min(eps)[:, None] * norm_x.clamp_min(eps))
        ctx.save_for_backward(student, teacher, negatives, neg_index, norm_s, norm_x, cos)
        ctx.config = (mode, loss, eps, temperature)
        rows = loss_from_cosines(loss, cos[:, 0], cos[:, 1:], temperature)
        return rows if rows.dtype == torch.float64 else rows.float()

    @staticmethod
    @single_backward
    def backward(ctx, grad_rows):
        student, teacher, negatives, neg_index, norm_s, norm_x, cos = ctx.saved_tensors
        mode, loss, eps, temperature = ctx.config
        need_s, need_t, need_n = ctx.needs_input_grad[:3]
        go = grad_rows.to(cos.dtype)[:, None]
        w = cosine_weights(loss, cos, temperature)
        ns, nx = norm_s.clamp_min(eps)[:, None], norm_x.clamp_min(eps)
        coef_a = go * w / (ns * nx)
        coef_g = -go * w * cos * (norm_x >= eps) / nx**2
        sigma = -go[:, 0] * (w * cos).sum(1) * (norm_s >= eps) / ns[:, 0] ** 2
        need_n = need_n and mode in (_EXPLICIT, _BANK)
        grads = iter(torch.ops.lrc_kernels.cpu_weighted_backward(
            student, teacher, negatives, neg_index, mode, coef_a.contiguous(), coef_g.contiguous(),
            sigma.contiguous(), need_s, need_t, need_n,
        ))
        return (next(grads) if need_s else None, next(grads) if need_t else None, next(grads) if need_n else None,
                None, None, None, None, None)


class _CppRowPrimitives:
    """The streaming primitives of the shared in-batch COS-NCE, in C++."""

    def __init__(self, acc_dtype: torch.dtype):
        self.acc_dtype = acc_dtype

    def row_stats(self, x, y):
        ss, dot, yy = torch.ops.lrc_kernels.cpu_partials(x, y, None, None, _NO_NEGATIVES)
        return ss.sqrt(), yy[:, 0].sqrt(), dot[:, 0]

    def weighted_colsum(self, x, w):
        return torch.ops.lrc_kernels.cpu_weighted_colsum(x, w.to(self.acc_dtype).contiguous())

    def row_dot_vec(self, x, v):
        return torch.ops.lrc_kernels.cpu_row_dot_vec(x, v.contiguous())

    def row_combine(self, x, a, y, c, v, e, out_dtype):
        return torch.ops.lrc_kernels.cpu_row_combine(x, a.contiguous(), y, c.contiguous(), v.contiguous(),
                                                     e.contiguous(), out_dtype)


def _in_batch_info_nce(problem: ContrastiveProblem) -> torch.Tensor:
    dtype = compute_dtype(problem.student, problem.teacher)
    s, t = problem.student.to(dtype), problem.teacher.to(dtype)
    ns = torch.linalg.vector_norm(s, dim=1).clamp_min(problem.eps)
    nt = torch.linalg.vector_norm(t, dim=1).clamp_min(problem.eps)
    logits = (s @ t.T) / (ns[:, None] * nt[None, :] * problem.temperature)
    return torch.logsumexp(logits, dim=1) - logits.diagonal()


def row_losses(problem: ContrastiveProblem) -> torch.Tensor:
    """Per-row losses [B] (fp32, or fp64 for fp64 inputs) computed by the C++ kernels."""
    if problem.device.type != "cpu":
        raise RuntimeError(f"backend='cpp' runs on CPU tensors, got {problem.device}")
    with torch.autocast("cpu", enabled=False):
        if problem.mode == IN_BATCH:
            if problem.loss == "info_nce":
                return _in_batch_info_nce(problem)
            acc = compute_dtype(problem.student, problem.teacher)
            return InBatchCosNCE.apply(problem.student, problem.teacher, problem.eps, _CppRowPrimitives(acc))
        if problem.mode == EXPLICIT:
            mode, negatives, index = _EXPLICIT, problem.negatives, None
        else:
            mode = _TEACHER_BANK if problem.bank_is_teacher else _BANK
            negatives, index = problem.negatives, problem.neg_index.contiguous()
        return _GatherNegativesLoss.apply(
            problem.student, problem.teacher, negatives, index, mode, problem.loss, problem.eps, problem.temperature
        )
