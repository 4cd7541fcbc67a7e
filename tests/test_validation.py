"""Bad input: one validation layer, the same clear exception for every backend."""

import pytest
import torch

import lrc_kernels as lk

BACKENDS = ["auto", *lk.available_backends("cpu")]


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


CASES = [
    # (description, call kwargs, exception, message fragment)
    ("shapes differ", dict(student=_x(4, 8), teacher=_x(4, 9)), ValueError, "same shape"),
    ("B = 1 in-batch", dict(student=_x(1, 8), teacher=_x(1, 8)), ValueError, "B >= 2"),
    ("K = 0 explicit", dict(negatives=_x(4, 0, 8)), ValueError, "K >= 1"),
    ("K = 0 indexed", dict(negatives=_x(10, 8), neg_index=torch.zeros(4, 0, dtype=torch.long)), ValueError, "K >= 1"),
    ("index too large", dict(negatives=_x(10, 8), neg_index=torch.full((4, 2), 10)), IndexError, "neg_index"),
    ("index negative", dict(negatives=_x(10, 8), neg_index=torch.full((4, 2), -1)), IndexError, "neg_index"),
    ("index into teacher too large", dict(neg_index=torch.full((4, 2), 4)), IndexError, "teacher"),
    ("index not integer", dict(negatives=_x(10, 8), neg_index=torch.zeros(4, 2)), TypeError, "neg_index"),
    ("index bool", dict(negatives=_x(10, 8), neg_index=torch.zeros(4, 2, dtype=torch.bool)), TypeError, "neg_index"),
    ("index not a tensor", dict(negatives=_x(10, 8), neg_index=[[0, 1]] * 4), TypeError, "neg_index"),
    ("index shape", dict(negatives=_x(10, 8), neg_index=torch.zeros(3, 2, dtype=torch.long)), ValueError, "neg_index"),
    ("index 1-d", dict(negatives=_x(10, 8), neg_index=torch.zeros(4, dtype=torch.long)), ValueError, "neg_index"),
    ("bank features", dict(negatives=_x(10, 7), neg_index=torch.zeros(4, 2, dtype=torch.long)), ValueError, "negatives"),
    ("explicit shape", dict(negatives=_x(4, 3, 7)), ValueError, "negatives"),
    ("explicit batch", dict(negatives=_x(5, 3, 8)), ValueError, "negatives"),
    ("int student", dict(student=torch.ones(4, 8, dtype=torch.long)), TypeError, "student"),
    ("int teacher", dict(teacher=torch.ones(4, 8, dtype=torch.long)), TypeError, "teacher"),
    ("int negatives", dict(negatives=torch.ones(4, 2, 8, dtype=torch.long)), TypeError, "negatives"),
    ("complex student", dict(student=torch.ones(4, 8, dtype=torch.complex64)), TypeError, "student"),
    ("student not a tensor", dict(student=[[1.0] * 8] * 4), TypeError, "student"),
    ("1-d student", dict(student=_x(4), teacher=_x(4)), ValueError, "student"),
    ("empty features", dict(student=_x(4, 0), teacher=_x(4, 0)), ValueError, "student"),
    ("reduction", dict(reduction="avg"), ValueError, "reduction"),
    ("backend", dict(backend="cudnn"), ValueError, "backend"),
    ("eps zero", dict(eps=0.0), ValueError, "eps"),
    ("eps nan", dict(eps=float("nan")), ValueError, "eps"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("loss_fn", [lk.cos_nce_loss, lk.info_nce_loss], ids=["cos_nce", "info_nce"])
def test_bad_input_raises_clearly(loss_fn, case, backend):
    _, overrides, exc, fragment = case
    kwargs = dict(student=_x(4, 8), teacher=_x(4, 8), negatives=None, neg_index=None, backend=backend)
    kwargs.update(overrides)
    with pytest.raises(exc, match=fragment):
        loss_fn(kwargs.pop("student"), kwargs.pop("teacher"), kwargs.pop("negatives"), kwargs.pop("neg_index"),
                **kwargs)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        lk.info_nce_loss(_x(4, 8), _x(4, 8), temperature=temperature)
    with pytest.raises(ValueError, match="temperature"):
        lk.InfoNCELoss(temperature=temperature)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device type")
def test_inputs_on_different_devices_cuda():
    with pytest.raises(ValueError, match="device"):
        lk.cos_nce_loss(_x(4, 8), _x(4, 8).cuda())


def test_inputs_on_different_devices():
    meta = torch.empty(4, 8, device="meta")
    with pytest.raises(ValueError, match="teacher is on (the )?meta"):
        lk.cos_nce_loss(_x(4, 8), meta)
    with pytest.raises(ValueError, match="negatives is on (the )?meta"):
        lk.cos_nce_loss(_x(4, 8), _x(4, 8), torch.empty(4, 2, 8, device="meta"))
    with pytest.raises(ValueError, match="neg_index is on (the )?meta"):
        lk.cos_nce_loss(_x(4, 8), _x(4, 8), _x(6, 8), torch.zeros(4, 2, dtype=torch.long, device="meta"))


def test_module_options_checked_at_construction():
    with pytest.raises(ValueError, match="reduction"):
        lk.CosNCELoss(reduction="avg")
    with pytest.raises(ValueError, match="backend"):
        lk.CosNCELoss(backend="nope")
    with pytest.raises(ValueError, match="eps"):
        lk.InfoNCELoss(eps=-1.0)


def test_failed_call_leaves_inputs_untouched():
    s, t = _x(4, 8), _x(4, 8)
    before = s.clone(), t.clone()
    with pytest.raises(IndexError):
        lk.cos_nce_loss(s, t, neg_index=torch.full((4, 2), 99))
    assert torch.equal(s, before[0]) and torch.equal(t, before[1])


def test_triton_on_cpu_without_interpreter_explains(monkeypatch):
    if "triton" not in lk.available_backends("cpu"):
        pytest.skip("triton not installed")
    from lrc_kernels.ops import cos_nce_triton

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        cos_nce_triton.row_losses(lk._validation.prepare_problem("cos_nce", _x(4, 8), _x(4, 8)))
