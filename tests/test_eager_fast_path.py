"""The eager CPU fast path (``eager_reduced_loss``: the extension checks the arguments itself).

Where it runs, the same bits as the usual path, in value and gradient; wherever an argument is
wrong or needs the usual path (a copy, a fallback, a gradient for the teacher), it declines, and
the usual path's error or result follows."""

from __future__ import annotations

import pytest
import torch

import lrc_kernels as lk
from lrc_kernels import backends
from helpers import LOSSES, make_inputs

pytestmark = pytest.mark.skipif("cpp" not in lk.available_backends("cpu"), reason="no C++ toolchain")
MODES = ("explicit", "bank", "teacher_bank", "in_batch")


@pytest.fixture
def fast_calls(monkeypatch):
    """What each fast-path call returned (None: declined), once backend='cpp' has resolved."""
    s, t, n, _ = make_inputs("explicit", 2, 1, 3)
    lk.cos_nce_loss(s, t, n, backend="cpp")  # resolves cpp: its fast path is registered
    fast = backends.eager_fast_path("cpp")
    assert fast is not None
    results = []

    def spy(*args):
        results.append(fast(*args))
        return results[-1]

    monkeypatch.setitem(backends._EAGER_CPU, "cpp", spy)
    return results


def usual_path(monkeypatch):
    monkeypatch.setattr(backends, "eager_fast_path", lambda name: None)


def run(loss, inputs, **kwargs):
    s, t, n, idx = inputs
    for x in (s, t, n):
        if x is not None:
            x.grad = None
    value = LOSSES[loss](s, t, n, idx, backend="cpp", **kwargs)
    value.backward()
    return value.detach(), [None if x is None or not x.requires_grad else x.grad for x in (s, t, n)]


def student_only(mode, batch, num_neg, features, dtype=torch.float32, seed=0):
    s, t, n, idx = make_inputs(mode if mode != "in_batch" else "none", batch, num_neg, features, dtype,
                               generator=torch.Generator().manual_seed(seed), requires_grad=False)
    return s.requires_grad_(), t, n, idx


@pytest.mark.parametrize("features", [37, (3, 11)], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("mode", MODES)
def test_fast_path_gives_the_bits_of_the_usual_path(fast_calls, monkeypatch, mode, loss, reduction, features):
    inputs = student_only(mode, 5, 3, features, seed=1)
    kwargs = {"reduction": reduction, **({"temperature": 0.3} if loss == "info_nce" else {})}
    got, got_grads = run(loss, inputs, **kwargs)
    assert len(fast_calls) == 1 and fast_calls[0] is not None  # taken
    usual_path(monkeypatch)
    want, want_grads = run(loss, inputs, **kwargs)
    assert len(fast_calls) == 1  # not consulted
    assert torch.equal(got, want) and got.dtype == want.dtype
    assert torch.equal(got_grads[0], want_grads[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_fast_path_other_dtypes(fast_calls, monkeypatch, dtype):
    inputs = student_only("explicit", 4, 2, 70, dtype, seed=2)
    got, got_grads = run("info_nce", inputs)
    usual_path(monkeypatch)
    want, want_grads = run("info_nce", inputs)
    assert fast_calls[0] is not None
    assert torch.equal(got, want) and torch.equal(got_grads[0], want_grads[0])
    assert got_grads[0].dtype == dtype


def test_fast_path_without_grad_does_no_gradient_work(fast_calls):
    from lrc_kernels.ops import _build

    s, t, n, _ = student_only("explicit", 4, 3, 50)
    before = _build.cpu_extension().gradient_rows_computed()
    with torch.no_grad():
        lk.cos_nce_loss(s, t, n, backend="cpp")
    lk.info_nce_loss(s.detach(), t, n, backend="cpp")
    assert all(r is not None for r in fast_calls) and len(fast_calls) == 2
    assert _build.cpu_extension().gradient_rows_computed() == before


@pytest.mark.parametrize("case, error, match", [
    ({"eps": -1.0}, ValueError, "eps must be a finite number > 0"),
    ({"eps": float("nan")}, ValueError, "eps must be a finite number > 0"),
    ({"temperature": 0.0}, ValueError, "temperature must be a finite number > 0"),
    ({"reduction": "avg"}, ValueError, "reduction must be one of"),
    ({"teacher": lambda s, t, n, i: t[:, :-1]}, ValueError, "same shape"),
    ({"negatives": lambda s, t, n, i: n[:, :0]}, ValueError, "K >= 1"),
    ({"negatives": lambda s, t, n, i: n[:-1]}, ValueError, r"negatives must have shape \[B, K, \*features\]"),
    ({"negatives": lambda s, t, n, i: n.long()}, TypeError, "negatives must be a floating-point tensor"),
    ({"student": lambda s, t, n, i: s[:, 0]}, ValueError, "at least one feature dim"),
    ({"neg_index": lambda s, t, n, i: torch.full((4, 2), 9)}, IndexError, r"neg_index values must lie in \[0, 4\)"),
    ({"neg_index": lambda s, t, n, i: torch.full((4, 2), -1)}, IndexError, r"neg_index values must lie in \[0, 4\)"),
    ({"neg_index": lambda s, t, n, i: torch.zeros(3, 2, dtype=torch.long)}, ValueError, r"neg_index must have shape"),
    ({"neg_index": lambda s, t, n, i: torch.zeros(4, 2)}, TypeError, "neg_index must be an integer tensor"),
], ids=lambda v: str(v)[:40] if not isinstance(v, dict) else ",".join(v))
def test_fast_path_declines_bad_arguments_and_the_usual_error_follows(fast_calls, case, error, match):
    s, t, n, _ = student_only("explicit", 4, 2, 9)
    arguments = {"student": s, "teacher": t, "negatives": n, "neg_index": None}
    options = {}
    for key, value in case.items():
        if key in arguments:
            arguments[key] = value(s, t, n, None)
        else:
            options[key] = value
    if case.get("neg_index") is not None:
        arguments["negatives"] = None  # into the teacher rows
    loss = lk.info_nce_loss if "temperature" in options else lk.cos_nce_loss
    with pytest.raises(error, match=match):
        loss(arguments["student"], arguments["teacher"], arguments["negatives"], arguments["neg_index"],
             backend="cpp", **options)
    assert fast_calls == [None] * len(fast_calls)  # declined (or not consulted) before the error


@pytest.mark.parametrize("backend", [["cpp"], "cpu", None], ids=str)
def test_a_wrong_backend_name_gets_the_usual_error_after_the_fast_path_registered(fast_calls, backend):
    s, t, n, _ = student_only("explicit", 3, 2, 8)
    with pytest.raises(ValueError, match="backend must be one of"):
        lk.cos_nce_loss(s, t, n, backend=backend)
    assert fast_calls == []


def test_fast_path_declines_what_needs_the_usual_path(fast_calls, monkeypatch):
    """A copy (rows not one unit-stride run, an int32 index), a teacher gradient, inference
    tensors beside a student that requires grad, an integer option, a subclass, and non-finite
    norms (the usual path's fallback gives NaN): the same values as the usual path."""
    s, t, n, _ = student_only("explicit", 4, 2, 12)
    teacher_grad = t.clone().requires_grad_()
    with torch.inference_mode():
        t_inference = t.clone()

    class Tagged(torch.Tensor):
        pass

    nan_teacher = t.clone()
    nan_teacher[1, 3] = float("nan")
    cases = {
        "strided features": (s, t, n.transpose(1, 2).contiguous().transpose(1, 2), None, {}),
        "int32 index": (s, t, n[:, 0].clone(), torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0]], dtype=torch.int32), {}),
        "teacher grad": (s, teacher_grad, n, None, {}),
        "inference teacher": (s, t_inference, n, None, {}),
        "integer eps": (s, t, n, None, {"eps": 1}),
        "subclass": (s, t.as_subclass(Tagged), n, None, {}),
        "non-finite": (s, nan_teacher, n, None, {}),
    }
    for name, (student, teacher, negatives, index, options) in cases.items():
        fast_calls.clear()
        got = lk.cos_nce_loss(student, teacher, negatives, index, backend="cpp", **options)
        assert fast_calls == [None] * len(fast_calls), name
        with monkeypatch.context() as patch:
            usual_path(patch)
            want = lk.cos_nce_loss(student, teacher, negatives, index, backend="cpp", **options)
        assert torch.equal(got, want) or (got.isnan() and want.isnan()), name
    assert lk.cos_nce_loss(s, nan_teacher, n, backend="cpp").isnan()
    lk.cos_nce_loss(s, teacher_grad, n, backend="cpp").backward()
    assert teacher_grad.grad is not None and teacher_grad.grad.abs().sum() > 0


def test_fast_path_on_rows_with_a_row_stride(fast_calls, monkeypatch):
    """Rows strided over the batch (a slice of a wider buffer) need no copy: the fast path takes them."""
    base = torch.randn(6, 2, 40)
    s = base[:, 0].clone().requires_grad_()
    t = base[:, 1]
    n = torch.randn(1, 1, 40).expand(6, 3, 40)
    got, got_grads = run("cos_nce", (s, t, n, None))
    assert fast_calls[0] is not None
    usual_path(monkeypatch)
    want, want_grads = run("cos_nce", (s, t, n, None))
    assert torch.equal(got, want) and torch.equal(got_grads[0], want_grads[0])
