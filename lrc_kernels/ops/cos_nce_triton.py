"""Triton kernels and autograd Functions for COS-NCE and cosine InfoNCE.

The math, its notation (c_j, w_j, ns, nx_j, m) and the gradients are in the docstring of
``lrc_kernels/functional.py``. The forward saves the norms, the cosines and sum_j w_j c_j, so
the backward is one streaming pass that re-reads the inputs once and never recomputes a
reduction.

Paths:
  * explicit / indexed negatives: a split-D partial-dot kernel (B x splits programs, so
    B = 16 still fills the GPU), a per-row finalize kernel (online logsumexp for InfoNCE),
    and one backward kernel. Indexed rows are gathered inside the kernels (64-bit
    offsets); bank gradients are scattered with fp32 atomics. No [B, K, D] temporary.
  * in-batch COS-NCE: O(B D) through sum_{j != b} cos(s_b, t_j) = s^_b . (u - t^_b),
    u = sum_j t_j / nt_j; the math is in ``in_batch.py``, shared with the C++ backend.
  * in-batch InfoNCE: one GEMM on the raw inputs (the B x B dot products; no normalised
    copies), with Triton kernels turning it into cosines, the loss and the backward
    coefficients. Inputs below fp32 are upcast to fp32 for the GEMM.

Non-contiguous inputs are handled through row strides; only a last-dim stride other
than 1 forces a copy (done in the validation layer).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl
from ._autograd import single_backward
from .in_batch import InBatchCosNCE

from .._validation import ContrastiveProblem, NegativeMode
from ..reference import compute_dtype

_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}


# --------------------------------------------------------------------------- kernels


@triton.jit
def _online_softmax_step(run_max, run_sum, run_pc, c, mask, inv_tau):
    """Fold a block of cosines into per-lane running (max, sum exp, sum exp * c) of z = c / tau."""
    z = tl.where(mask, c * inv_tau, float("-inf"))
    new_max = tl.maximum(run_max, z)
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # a lane with no entry yet stays at 0
    scale = tl.exp(run_max - shift)
    p = tl.exp(z - shift)
    return new_max, run_sum * scale + p, run_pc * scale + p * tl.where(mask, c, 0.0)


@triton.jit
def _online_softmax_finish(run_max, run_sum, run_pc, c_pos, inv_tau):
    """Merge the lanes: (logsumexp_j z_j, sum_j w_j c_j) with w_j = (p_j - [j = pos]) / tau."""
    row_max = tl.max(run_max, 0)
    lane_scale = tl.exp(run_max - row_max)
    total = tl.sum(run_sum * lane_scale, 0)
    return row_max + tl.log(total), (tl.sum(run_pc * lane_scale, 0) / total - c_pos) * inv_tau


@triton.jit
def _fwd_partials_kernel(
    S, T, N, IDX, PART_SS, PART_DOT, PART_XX,
    D, K, CHUNK,
    stride_s, stride_t, stride_nrow, stride_nk, stride_idx,
    INDEXED_NEG: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    """Partial |s|^2, s.x_j and |x_j|^2 over one D-chunk of one row (x_0 = t, x_k = negatives)."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    d_begin = split * CHUNK
    d_end = tl.minimum(d_begin + CHUNK, D)
    offs_d = tl.arange(0, BLOCK_D)
    s_row = S + row * stride_s
    t_row = T + row * stride_t

    acc_ss = tl.zeros([BLOCK_D], ACC)
    acc_st = tl.zeros([BLOCK_D], ACC)
    acc_tt = tl.zeros([BLOCK_D], ACC)
    for d in range(d_begin, d_end, BLOCK_D):
        cols = d + offs_d
        mask = cols < d_end
        s = tl.load(s_row + cols, mask=mask, other=0.0).to(ACC)
        t = tl.load(t_row + cols, mask=mask, other=0.0).to(ACC)
        acc_ss += s * s
        acc_st += s * t
        acc_tt += t * t
    slot = row * num_splits + split
    part = slot * (K + 1)
    tl.store(PART_SS + slot, tl.sum(acc_ss, 0))
    tl.store(PART_DOT + part, tl.sum(acc_st, 0))
    tl.store(PART_XX + part, tl.sum(acc_tt, 0))

    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        k_mask = ks < K
        if INDEXED_NEG:
            n_rows = tl.load(IDX + row * stride_idx + ks, mask=k_mask, other=0).to(tl.int64) * stride_nrow
        else:
            n_rows = row * stride_nrow + ks.to(tl.int64) * stride_nk
        acc_dot = tl.zeros([BLOCK_K, BLOCK_D], ACC)
        acc_xx = tl.zeros([BLOCK_K, BLOCK_D], ACC)
        for d in range(d_begin, d_end, BLOCK_D):
            cols = d + offs_d
            mask = cols < d_end
            s = tl.load(s_row + cols, mask=mask, other=0.0).to(ACC)
            n = tl.load(
                N + n_rows[:, None] + cols[None, :], mask=k_mask[:, None] & mask[None, :], other=0.0
            ).to(ACC)
            acc_dot += n * s[None, :]
            acc_xx += n * n
        tl.store(PART_DOT + part + 1 + ks, tl.sum(acc_dot, 1), mask=k_mask)
        tl.store(PART_XX + part + 1 + ks, tl.sum(acc_xx, 1), mask=k_mask)


@triton.jit
def _fwd_finalize_kernel(
    PART_SS, PART_DOT, PART_XX, LOSS, NORM_S, NORM_X, COS, WC, LSE,
    K, NUM_SPLITS, eps, inv_tau,
    IS_INFO: tl.constexpr, BLOCK_SPLIT: tl.constexpr, BLOCK_J: tl.constexpr, ACC: tl.constexpr,
):
    """Reduce the split partials of one row into cosines, the loss and sum_j w_j c_j."""
    row = tl.program_id(0).to(tl.int64)
    J = K + 1
    offs_s = tl.arange(0, BLOCK_SPLIT)
    s_mask = offs_s < NUM_SPLITS
    norm_s = tl.sqrt(tl.sum(tl.load(PART_SS + row * NUM_SPLITS + offs_s, mask=s_mask, other=0.0), 0))
    tl.store(NORM_S + row, norm_s)
    ns = tl.maximum(norm_s, eps)

    pos = tl.zeros([BLOCK_J], ACC)
    neg_sum = tl.zeros([BLOCK_J], ACC)
    run_max = tl.full([BLOCK_J], float("-inf"), ACC)  # online softmax, one lane per j slot
    run_sum = tl.zeros([BLOCK_J], ACC)  # sum exp(z - run_max)
    run_pc = tl.zeros([BLOCK_J], ACC)  # sum exp(z - run_max) * c
    base = row * NUM_SPLITS * J
    for j0 in range(0, J, BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J)
        j_mask = js < J
        ptrs = base + offs_s[:, None] * J + js[None, :]
        m2 = s_mask[:, None] & j_mask[None, :]
        dot = tl.sum(tl.load(PART_DOT + ptrs, mask=m2, other=0.0), 0)
        norm_x = tl.sqrt(tl.sum(tl.load(PART_XX + ptrs, mask=m2, other=0.0), 0))
        c = dot / (ns * tl.maximum(norm_x, eps))
        tl.store(NORM_X + row * J + js, norm_x, mask=j_mask)
        tl.store(COS + row * J + js, c, mask=j_mask)
        pos += tl.where(js == 0, c, 0.0)
        if IS_INFO:
            run_max, run_sum, run_pc = _online_softmax_step(run_max, run_sum, run_pc, c, j_mask, inv_tau)
        else:
            neg_sum += tl.where(j_mask & (js > 0), c, 0.0)

    c_pos = tl.sum(pos, 0)
    if IS_INFO:
        lse, wc = _online_softmax_finish(run_max, run_sum, run_pc, c_pos, inv_tau)
        loss = lse - c_pos * inv_tau
        tl.store(LSE + row, lse)
    else:
        loss = 2.0 - 1.5 * c_pos + 0.5 * tl.sum(neg_sum, 0) / K
        wc = loss - 2.0
    tl.store(LOSS + row, loss)
    tl.store(WC + row, wc)


@triton.jit
def _bwd_kernel(
    S, T, N, IDX, GRAD_ROW, NORM_S, NORM_X, COS, WC, LSE, GS, GT, GN,
    D, K, CHUNK, eps, inv_tau,
    stride_s, stride_t, stride_nrow, stride_nk, stride_idx,
    stride_gs, stride_gt, stride_gnrow, stride_gnk,
    INDEXED_NEG: tl.constexpr, IS_INFO: tl.constexpr,
    GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, GRAD_N: tl.constexpr,
    ATOMIC_T: tl.constexpr, ATOMIC_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    """One streaming pass over a D-chunk of one row: grad of s, and of t / negatives if asked."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    d_begin = split * CHUNK
    d_end = tl.minimum(d_begin + CHUNK, D)
    offs_d = tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    J = K + 1

    go = tl.load(GRAD_ROW + row).to(ACC)
    norm_s = tl.load(NORM_S + row)
    ns = tl.maximum(norm_s, eps)
    s_coef = -go * tl.load(WC + row) * tl.where(norm_s >= eps, 1.0, 0.0) / (ns * ns)
    c0 = tl.load(COS + row * J)
    norm_t = tl.load(NORM_X + row * J)
    nt = tl.maximum(norm_t, eps)
    if IS_INFO:
        lse = tl.load(LSE + row)
        w0 = (tl.exp(c0 * inv_tau - lse) - 1.0) * inv_tau
    else:
        w0 = -1.5
    t_coef = go * w0 / (ns * nt)
    t_self = -go * w0 * c0 * tl.where(norm_t >= eps, 1.0, 0.0) / (nt * nt)

    for d in range(d_begin, d_end, BLOCK_D):
        cols = d + offs_d
        mask = cols < d_end
        s = tl.load(S + row * stride_s + cols, mask=mask, other=0.0).to(ACC)
        t = tl.load(T + row * stride_t + cols, mask=mask, other=0.0).to(ACC)
        gs = t_coef * t + s_coef * s
        if GRAD_T:
            gt = t_coef * s + t_self * t
            if ATOMIC_T:
                tl.atomic_add(GT + row * stride_gt + cols, gt, mask=mask)
            else:
                tl.store(GT + row * stride_gt + cols, gt.to(GT.dtype.element_ty), mask=mask)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + offs_k
            k_mask = ks < K
            c = tl.load(COS + row * J + 1 + ks, mask=k_mask, other=0.0)
            norm_n = tl.load(NORM_X + row * J + 1 + ks, mask=k_mask, other=1.0)
            nn = tl.maximum(norm_n, eps)
            if IS_INFO:
                w = tl.where(k_mask, tl.exp(c * inv_tau - lse) * inv_tau, 0.0)
            else:
                w = tl.where(k_mask, 0.5, 0.0).to(ACC) / K
            n_coef = go * w / (ns * nn)
            if INDEXED_NEG:
                n_idx = tl.load(IDX + row * stride_idx + ks, mask=k_mask, other=0).to(tl.int64)
                n_rows = n_idx * stride_nrow
            else:
                n_rows = row * stride_nrow + ks.to(tl.int64) * stride_nk
            m2 = k_mask[:, None] & mask[None, :]
            n = tl.load(N + n_rows[:, None] + cols[None, :], mask=m2, other=0.0).to(ACC)
            gs += tl.sum(n_coef[:, None] * n, 0)
            if GRAD_N:
                n_self = -go * w * c * tl.where(norm_n >= eps, 1.0, 0.0) / (nn * nn)
                gn = n_coef[:, None] * s[None, :] + n_self[:, None] * n
                if INDEXED_NEG:
                    gn_rows = n_idx * stride_gnrow
                else:
                    gn_rows = row * stride_gnrow + ks.to(tl.int64) * stride_gnk
                if ATOMIC_N:
                    tl.atomic_add(GN + gn_rows[:, None] + cols[None, :], gn, mask=m2)
                else:
                    tl.store(GN + gn_rows[:, None] + cols[None, :], gn.to(GN.dtype.element_ty), mask=m2)
        if GRAD_S:
            tl.store(GS + row * stride_gs + cols, gs.to(GS.dtype.element_ty), mask=mask)


@triton.jit
def _weighted_colsum_kernel(
    X, W, OUT, B, D, ROWS_PER_PROGRAM, stride_x,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    """OUT[d] += sum_b W[b] X[b, d] over one block of rows (OUT is zeroed by the caller)."""
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    b_begin = tl.program_id(1) * ROWS_PER_PROGRAM
    b_end = tl.minimum(b_begin + ROWS_PER_PROGRAM, B)
    acc = tl.zeros([BLOCK_D], ACC)
    for b0 in range(b_begin, b_end, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_mask = rows < b_end
        w = tl.load(W + rows, mask=row_mask, other=0.0)
        x = tl.load(
            X + rows.to(tl.int64)[:, None] * stride_x + cols[None, :],
            mask=row_mask[:, None] & col_mask[None, :], other=0.0,
        ).to(ACC)
        acc += tl.sum(w[:, None] * x, 0)
    tl.atomic_add(OUT + cols, acc, mask=col_mask)


@triton.jit
def _row_dot_vec_kernel(X, V, PART, D, CHUNK, stride_x, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """PART[b, split] = X[b, chunk] . V[chunk]."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    d_begin = split * CHUNK
    d_end = tl.minimum(d_begin + CHUNK, D)
    acc = tl.zeros([BLOCK_D], ACC)
    for d in range(d_begin, d_end, BLOCK_D):
        cols = d + tl.arange(0, BLOCK_D)
        mask = cols < d_end
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(ACC)
        acc += x * tl.load(V + cols, mask=mask, other=0.0)
    tl.store(PART + row * tl.num_programs(1) + split, tl.sum(acc, 0))


@triton.jit
def _row_combine_kernel(
    X, Y, V, A, BY, C, OUT, D, stride_x, stride_y, stride_out,
    BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    """OUT[b] = A[b] X[b] + BY[b] Y[b] + C[b] V, written in OUT's dtype."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(ACC)
    y = tl.load(Y + row * stride_y + cols, mask=mask, other=0.0).to(ACC)
    v = tl.load(V + cols, mask=mask, other=0.0)
    out = tl.load(A + row) * x + tl.load(BY + row) * y + tl.load(C + row) * v
    tl.store(OUT + row * stride_out + cols, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _in_batch_info_fwd_kernel(
    DOTS, NORM_S, NORM_T, LOSS, LSE, WC, B, eps, inv_tau, BLOCK_J: tl.constexpr, ACC: tl.constexpr,
):
    """Row b of the B x B raw dot products -> cosines -> InfoNCE with the diagonal as positive."""
    row = tl.program_id(0).to(tl.int64)
    ns = tl.maximum(tl.load(NORM_S + row), eps)
    pos = tl.zeros([BLOCK_J], ACC)
    run_max = tl.full([BLOCK_J], float("-inf"), ACC)
    run_sum = tl.zeros([BLOCK_J], ACC)
    run_pc = tl.zeros([BLOCK_J], ACC)
    for j0 in range(0, B, BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J)
        j_mask = js < B
        nt = tl.maximum(tl.load(NORM_T + js, mask=j_mask, other=1.0), eps)
        c = tl.load(DOTS + row * B + js, mask=j_mask, other=0.0) / (ns * nt)
        pos += tl.where(js == row, c, 0.0)
        run_max, run_sum, run_pc = _online_softmax_step(run_max, run_sum, run_pc, c, j_mask, inv_tau)
    c_pos = tl.sum(pos, 0)
    lse, wc = _online_softmax_finish(run_max, run_sum, run_pc, c_pos, inv_tau)
    tl.store(LOSS + row, lse - c_pos * inv_tau)
    tl.store(LSE + row, lse)
    tl.store(WC + row, wc)


@triton.jit
def _in_batch_info_bwd_kernel(
    DOTS, NORM_S, NORM_T, LSE, GRAD_ROW, COEF, COL_WC, B, eps, inv_tau,
    BLOCK_J: tl.constexpr, ACC: tl.constexpr,
):
    """COEF[b, j] = go_b w_bj / (ns_b nt_j), and COL_WC[j] += go_b w_bj c_bj (for the teacher)."""
    row = tl.program_id(0).to(tl.int64)
    ns = tl.maximum(tl.load(NORM_S + row), eps)
    lse = tl.load(LSE + row)
    go = tl.load(GRAD_ROW + row).to(ACC)
    for j0 in range(0, B, BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J)
        j_mask = js < B
        nt = tl.maximum(tl.load(NORM_T + js, mask=j_mask, other=1.0), eps)
        c = tl.load(DOTS + row * B + js, mask=j_mask, other=0.0) / (ns * nt)
        w = go * (tl.exp(c * inv_tau - lse) - tl.where(js == row, 1.0, 0.0)) * inv_tau
        w = tl.where(j_mask, w, 0.0)
        tl.store(COEF + row * B + js, w / (ns * nt), mask=j_mask)
        tl.atomic_add(COL_WC + js, w * c, mask=j_mask)


# --------------------------------------------------------------------------- launch planning


def is_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _block_d() -> int:
    # Small blocks under the interpreter so CI exercises masking and several splits.
    return 32 if is_interpreted() else 256


def _split_plan(batch: int, dim: int, device: torch.device) -> tuple[int, int]:
    """(chunk, num_splits): split D so that B x splits programs fill the device."""
    block_d = _block_d()
    blocks = triton.cdiv(dim, block_d)
    if device.type == "cuda":
        target = 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        target = 3 * batch  # interpreter: a few splits per row, to test the split logic
    splits = max(1, min(blocks, triton.cdiv(target, batch)))
    chunk = triton.cdiv(blocks, splits) * block_d
    return chunk, triton.cdiv(dim, chunk)


def _block_k(num_negatives: int) -> int:
    return max(2, min(16 if not is_interpreted() else 8, triton.next_power_of_2(num_negatives)))


def _device_guard(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _check_runnable(device: torch.device) -> None:
    if device.type == "cpu" and not is_interpreted():
        raise RuntimeError(
            "backend='triton' on CPU tensors runs under the Triton interpreter: set "
            "TRITON_INTERPRET=1 in the environment before importing lrc_kernels, or use "
            "backend='torch' / 'auto'"
        )
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"backend='triton' supports CUDA (and CPU under the interpreter), got {device}")


def _acc(*tensors) -> tuple[torch.dtype, tl.dtype]:
    dtype = compute_dtype(*tensors)
    return dtype, _TL_DTYPE[dtype]


# --------------------------------------------------------------------------- explicit / indexed


def _grad_buffer(x: torch.Tensor, atomic: bool, acc_dtype: torch.dtype) -> torch.Tensor:
    """Rows that several programs add into are accumulated with atomics in acc_dtype (then cast);
    rows owned by one program are written directly in the input's dtype."""
    if atomic:
        return torch.zeros(x.shape, device=x.device, dtype=acc_dtype)
    return torch.empty(x.shape, device=x.device, dtype=x.dtype)


class _GatherNegativesLoss(torch.autograd.Function):
    """Per-row loss with explicit [B, K, D] negatives or rows gathered from a bank by index."""

    @staticmethod
    def forward(ctx, student, teacher, negatives, neg_index, is_info, eps, temperature):
        indexed = neg_index is not None
        bank_is_teacher = indexed and negatives is None
        source = teacher if bank_is_teacher else negatives
        batch, dim = student.shape
        num_neg = neg_index.shape[1] if indexed else negatives.shape[1]
        acc_dtype, acc = _acc(student, teacher, negatives)
        device = student.device
        chunk, splits = _split_plan(batch, dim, device)
        block_k = _block_k(num_neg)
        stride_nrow = source.stride(0)
        stride_nk = 0 if indexed else source.stride(1)
        idx = neg_index if indexed else student  # placeholder pointer when unused

        part_ss = torch.empty(batch, splits, device=device, dtype=acc_dtype)
        part_dot = torch.empty(batch, splits, num_neg + 1, device=device, dtype=acc_dtype)
        part_xx = torch.empty_like(part_dot)
        loss = torch.empty(batch, device=device, dtype=acc_dtype)
        norm_s, wc, lse = torch.empty_like(loss), torch.empty_like(loss), torch.empty_like(loss)
        norm_x = torch.empty(batch, num_neg + 1, device=device, dtype=acc_dtype)
        cos = torch.empty_like(norm_x)
        with _device_guard(device):
            _fwd_partials_kernel[(batch, splits)](
                student, teacher, source, idx, part_ss, part_dot, part_xx,
                dim, num_neg, chunk,
                student.stride(0), teacher.stride(0), stride_nrow, stride_nk,
                neg_index.stride(0) if indexed else 0,
                INDEXED_NEG=indexed, BLOCK_K=block_k, BLOCK_D=_block_d(), ACC=acc,
            )
            _fwd_finalize_kernel[(batch,)](
                part_ss, part_dot, part_xx, loss, norm_s, norm_x, cos, wc, lse,
                num_neg, splits, eps, 1.0 / temperature,
                IS_INFO=is_info, BLOCK_SPLIT=triton.next_power_of_2(splits),
                BLOCK_J=min(128, triton.next_power_of_2(num_neg + 1)), ACC=acc,
            )
        ctx.save_for_backward(student, teacher, negatives, neg_index, norm_s, norm_x, cos, wc, lse)
        ctx.config = (is_info, eps, temperature, chunk, splits, block_k, acc)
        return loss.float() if acc_dtype != torch.float64 else loss

    @staticmethod
    @single_backward
    def backward(ctx, grad_rows):
        student, teacher, negatives, neg_index, norm_s, norm_x, cos, wc, lse = ctx.saved_tensors
        is_info, eps, temperature, chunk, splits, block_k, acc = ctx.config
        need_s, need_t, need_n = ctx.needs_input_grad[:3]
        indexed = neg_index is not None
        bank_is_teacher = indexed and negatives is None
        source = teacher if bank_is_teacher else negatives
        batch, dim = student.shape
        num_neg = cos.shape[1] - 1
        grad_rows = grad_rows.to(norm_s.dtype).contiguous()

        acc_dtype = norm_s.dtype
        grad_s = _grad_buffer(student, False, acc_dtype) if need_s else None
        grad_t = _grad_buffer(teacher, bank_is_teacher, acc_dtype) if need_t else None
        # When the teacher is the bank, negatives' gradients land in the teacher's buffer.
        grad_n = grad_t if bank_is_teacher else (_grad_buffer(negatives, indexed, acc_dtype) if need_n else None)
        dummy = student
        gs, gt, gn = (grad_s if need_s else dummy), (grad_t if need_t else dummy), (grad_n if grad_n is not None else dummy)
        with _device_guard(student.device):
            _bwd_kernel[(batch, splits)](
                student, teacher, source, neg_index if indexed else dummy, grad_rows,
                norm_s, norm_x, cos, wc, lse, gs, gt, gn,
                dim, num_neg, chunk, eps, 1.0 / temperature,
                student.stride(0), teacher.stride(0), source.stride(0),
                0 if indexed else source.stride(1), neg_index.stride(0) if indexed else 0,
                gs.stride(0), gt.stride(0), gn.stride(0), 0 if indexed or grad_n is None else gn.stride(1),
                INDEXED_NEG=indexed, IS_INFO=is_info,
                GRAD_S=need_s, GRAD_T=need_t, GRAD_N=grad_n is not None,
                ATOMIC_T=bank_is_teacher, ATOMIC_N=indexed,
                BLOCK_K=block_k, BLOCK_D=_block_d(), ACC=acc,
            )
        return (
            grad_s,
            grad_t.to(teacher.dtype) if need_t else None,
            grad_n.to(negatives.dtype) if need_n and not bank_is_teacher else None,
            None, None, None, None,
        )


# --------------------------------------------------------------------------- in-batch


def _row_stats(student, teacher, acc_dtype, acc):
    """(|s|, |t|, s.t) per row through the split partial kernel with no negatives."""
    batch, dim = student.shape
    chunk, splits = _split_plan(batch, dim, student.device)
    part_ss = torch.empty(batch, splits, device=student.device, dtype=acc_dtype)
    part_st = torch.empty(batch, splits, 1, device=student.device, dtype=acc_dtype)
    part_tt = torch.empty_like(part_st)
    _fwd_partials_kernel[(batch, splits)](
        student, teacher, teacher, student, part_ss, part_st, part_tt,
        dim, 0, chunk, student.stride(0), teacher.stride(0), 0, 0, 0,
        INDEXED_NEG=False, BLOCK_K=2, BLOCK_D=_block_d(), ACC=acc,
    )
    return part_ss.sum(1).sqrt(), part_tt.sum((1, 2)).sqrt(), part_st.sum((1, 2))


def _weighted_colsum(x, weights, acc_dtype, acc):
    """sum_b weights[b] * x[b] -> [D]."""
    batch, dim = x.shape
    out = torch.zeros(dim, device=x.device, dtype=acc_dtype)
    block_d = _block_d() * (1 if is_interpreted() else 2)
    block_b = 8
    col_blocks = triton.cdiv(dim, block_d)
    target = 4 * _sm_count(x.device.index or 0) if x.device.type == "cuda" else 2
    row_groups = max(1, min(triton.cdiv(batch, block_b), triton.cdiv(target, col_blocks)))
    rows_per = triton.cdiv(triton.cdiv(batch, row_groups), block_b) * block_b
    _weighted_colsum_kernel[(col_blocks, triton.cdiv(batch, rows_per))](
        x, weights.contiguous(), out, batch, dim, rows_per, x.stride(0),
        BLOCK_B=block_b, BLOCK_D=block_d, ACC=acc,
    )
    return out


def _row_dot_vec(x, vec, acc):
    batch, dim = x.shape
    chunk, splits = _split_plan(batch, dim, x.device)
    part = torch.empty(batch, splits, device=x.device, dtype=vec.dtype)
    _row_dot_vec_kernel[(batch, splits)](x, vec, part, dim, chunk, x.stride(0), BLOCK_D=_block_d(), ACC=acc)
    return part.sum(1)


def _row_combine(x, coef_x, y, coef_y, vec, coef_vec, out_dtype, acc):
    """coef_x[b] x[b] + coef_y[b] y[b] + coef_vec[b] vec, in out_dtype."""
    batch, dim = x.shape
    out = torch.empty(batch, dim, device=x.device, dtype=out_dtype)
    block_d = _block_d()
    _row_combine_kernel[(batch, triton.cdiv(dim, block_d))](
        x, y, vec, coef_x.contiguous(), coef_y.contiguous(), coef_vec.contiguous(), out,
        dim, x.stride(0), y.stride(0), out.stride(0), BLOCK_D=block_d, ACC=acc,
    )
    return out


class _TritonRowPrimitives:
    """The streaming primitives of the shared in-batch COS-NCE (``in_batch.InBatchCosNCE``)."""

    def __init__(self, acc_dtype: torch.dtype):
        self.acc_dtype, self.acc = acc_dtype, _TL_DTYPE[acc_dtype]

    def row_stats(self, x, y):
        with _device_guard(x.device):
            return _row_stats(x, y, self.acc_dtype, self.acc)

    def weighted_colsum(self, x, w):
        with _device_guard(x.device):
            return _weighted_colsum(x, w.to(self.acc_dtype), self.acc_dtype, self.acc)

    def row_dot_vec(self, x, v):
        with _device_guard(x.device):
            return _row_dot_vec(x, v, self.acc)

    def row_combine(self, x, a, y, c, v, e, out_dtype):
        with _device_guard(x.device):
            return _row_combine(x, a, y, c, v, e, out_dtype, self.acc)


class _InBatchInfoNCE(torch.autograd.Function):
    """In-batch InfoNCE: one GEMM of raw rows, then cosines and softmax in Triton."""

    @staticmethod
    def forward(ctx, student, teacher, eps, temperature):
        acc_dtype, acc = _acc(student, teacher)
        batch = student.shape[0]
        with _device_guard(student.device), torch.autocast(student.device.type, enabled=False):
            norm_s, norm_t, _ = _row_stats(student, teacher, acc_dtype, acc)
            dots = (student.to(acc_dtype) @ teacher.to(acc_dtype).T).contiguous()
            loss, lse, wc = (torch.empty(batch, device=student.device, dtype=acc_dtype) for _ in range(3))
            _in_batch_info_fwd_kernel[(batch,)](
                dots, norm_s, norm_t, loss, lse, wc, batch, eps, 1.0 / temperature,
                BLOCK_J=min(128, triton.next_power_of_2(batch)), ACC=acc,
            )
        ctx.save_for_backward(student, teacher, dots, norm_s, norm_t, lse, wc)
        ctx.eps, ctx.temperature, ctx.acc = eps, temperature, acc
        return loss if acc_dtype == torch.float64 else loss.float()

    @staticmethod
    @single_backward
    def backward(ctx, grad_rows):
        student, teacher, dots, norm_s, norm_t, lse, wc = ctx.saved_tensors
        need_s, need_t = ctx.needs_input_grad[:2]
        eps, acc = ctx.eps, ctx.acc
        batch = student.shape[0]
        go = grad_rows.to(dots.dtype).contiguous()
        coef = torch.empty_like(dots)
        col_wc = torch.zeros(batch, device=dots.device, dtype=dots.dtype)
        ns, nt = norm_s.clamp_min(eps), norm_t.clamp_min(eps)
        grad_s = grad_t = None
        with _device_guard(student.device), torch.autocast(student.device.type, enabled=False):
            _in_batch_info_bwd_kernel[(batch,)](
                dots, norm_s, norm_t, lse, go, coef, col_wc, batch, eps, 1.0 / ctx.temperature,
                BLOCK_J=min(128, triton.next_power_of_2(batch)), ACC=acc,
            )
            s32, t32 = student.to(dots.dtype), teacher.to(dots.dtype)
            if need_s:
                self_coef = -go * wc * (norm_s >= eps).to(dots.dtype) / ns**2
                grad_s = torch.addmm(self_coef[:, None] * s32, coef, t32).to(student.dtype)
            if need_t:
                self_coef = -col_wc * (norm_t >= eps).to(dots.dtype) / nt**2
                grad_t = torch.addmm(self_coef[:, None] * t32, coef.T, s32).to(teacher.dtype)
        return grad_s, grad_t, None, None


# --------------------------------------------------------------------------- entry point


def row_losses(problem: ContrastiveProblem) -> torch.Tensor:
    """Per-row losses [B] (fp32, or fp64 for fp64 inputs) computed by the Triton kernels."""
    _check_runnable(problem.device)
    is_info = problem.loss == "info_nce"
    if problem.mode == NegativeMode.IN_BATCH:
        if is_info:
            return _InBatchInfoNCE.apply(problem.student, problem.teacher, problem.eps, problem.temperature)
        acc_dtype, _ = _acc(problem.student, problem.teacher)
        return InBatchCosNCE.apply(problem.student, problem.teacher, problem.eps, _TritonRowPrimitives(acc_dtype))
    neg_index = problem.neg_index.contiguous() if problem.mode.indexed else None
    return _GatherNegativesLoss.apply(
        problem.student, problem.teacher, problem.negatives, neg_index, is_info, problem.eps, problem.temperature
    )


__all__ = ["row_losses", "is_interpreted"]
