"""The package as users install it: a wheel built from the repository, installed into a fresh
virtual environment (reusing this torch), used from outside the repository."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    import importlib.util

    # This environment's setuptools when it has one (no download); else pip's isolated build.
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", *isolation, "-q", "-w", str(out)],
                   check=True, cwd=out)
    (found,) = out.glob("lrc_kernels-*.whl")
    return found


@pytest.fixture(scope="module")
def venv_python(wheel, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(folder)], check=True)
    python = folder / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True)
    return python


def test_the_wheel_holds_the_native_sources_the_demo_data_and_type_markers(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("lrc_kernels/_csrc/cpu/cos_nce_cpu.cpp", "lrc_kernels/_csrc/cuda/cos_nce_cuda.cu",
                     "lrc_kernels/_csrc/cuda/cos_nce_cuda.cpp", "lrc_kernels/_csrc/common/negative_mode.h",
                     "lrc_bert/_data/snli_demo/train.tsv", "lrc_bert/_data/snli_demo/README.md",
                     "lrc_kernels/py.typed", "lrc_bert/py.typed", "lrc_bert/configs/lrc_bert.yaml"):
        assert required in names, required
    metadata = next(n for n in names if n.endswith("METADATA"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "Classifier: Typing :: Typed" in text and "Project-URL: Paper" in text


def test_an_installed_wheel_runs_the_cpp_backend_outside_the_repository(venv_python, tmp_path):
    code = ("import json, torch, lrc_kernels as lk, lrc_bert\n"
            "from lrc_kernels.ops import _build\n"
            "s, t = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8)\n"
            "lk.cos_nce_loss(s, t, backend='cpp').backward()\n"
            "print(json.dumps({'lk': lk.__file__, 'lrc_bert': lrc_bert.__file__, 'root': str(_build.native_root()),"
            " 'backends': lk.available_backends('cpu'), 'grad': bool(s.grad.abs().sum() > 0)}))")
    result = subprocess.run([str(venv_python), "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    venv = str(venv_python.parents[1])
    assert info["lk"].startswith(venv) and info["lrc_bert"].startswith(venv), info
    assert info["root"].startswith(venv) and info["root"].endswith("_csrc")
    assert "cpp" in info["backends"] and info["grad"]
    tour = subprocess.run([str(venv_python), "-m", "lrc_kernels", "--batch", "4", "--seq", "2", "--width", "8",
                           "--repeats", "1"], capture_output=True, text=True, cwd=tmp_path)
    assert tour.returncode == 0, tour.stderr[-3000:]
    assert "backends ['torch', 'cpp']" in tour.stdout
    assert any(line.split()[2:3] == ["cpp"] for line in tour.stdout.splitlines() if line.startswith("cos_nce"))


def test_the_installed_demo_finds_its_data(venv_python, tmp_path):
    code = "from lrc_bert.demo import demo_data; print(demo_data())"
    result = subprocess.run([str(venv_python), "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True)
    found = result.stdout.strip()
    assert found.startswith(str(venv_python.parents[1])) and found.endswith("_data/snli_demo")


def test_the_demo_says_where_its_data_must_come_from_when_it_is_missing(monkeypatch, capsys, tmp_path):
    from lrc_bert import demo

    monkeypatch.setattr(demo, "_PACKAGED_DATA", tmp_path / "a")
    monkeypatch.setattr(demo, "_CHECKOUT_DATA", tmp_path / "b")
    with pytest.raises(SystemExit) as exit_info:
        demo.main([])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--data-dir" in err and "SNLI layout" in err and "Traceback" not in err
