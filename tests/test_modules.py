"""The nn.Module wrappers hold options and match the functional API."""

import torch

import lrc_kernels as lk
from helpers import make_inputs


def test_modules_match_functional():
    s, t, n, idx = make_inputs("bank", 5, 3, (4, 6), requires_grad=False)
    cos = lk.CosNCELoss(reduction="sum", eps=1e-6)
    torch.testing.assert_close(cos(s, t, n, idx), lk.cos_nce_loss(s, t, n, idx, reduction="sum", eps=1e-6))
    info = lk.InfoNCELoss(temperature=0.5, reduction="none")
    torch.testing.assert_close(info(s, t), lk.info_nce_loss(s, t, temperature=0.5, reduction="none"))
    assert "temperature=0.5" in repr(info) and "reduction='sum'" in repr(cos)


def test_module_has_no_parameters_and_moves_freely():
    module = lk.CosNCELoss()
    assert list(module.parameters()) == []
    assert module.to(torch.float64) is module


def test_public_api():
    assert {"cos_nce_loss", "info_nce_loss", "CosNCELoss", "InfoNCELoss"} <= set(lk.__all__)
    assert lk.backend_names()[:3] == ("auto", "torch", "triton")
    assert "torch" in lk.available_backends("cpu")


def test_import_needs_no_triton(tmp_path):
    """`import lrc_kernels` must work where triton is missing: block it and import in a subprocess."""
    import os
    import subprocess
    import sys

    blocker = tmp_path / "triton.py"
    blocker.write_text("raise ImportError('triton blocked for this test')\n")
    code = (
        "import lrc_kernels as lk, torch\n"
        "x = torch.randn(3, 4)\n"
        "print(float(lk.cos_nce_loss(x, x.flip(0))))\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.getcwd()}"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
