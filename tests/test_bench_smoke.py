"""The benchmark scripts run end to end on tiny shapes (speed is measured in bench/, not here)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def test_kernel_benchmark_smoke(tmp_path):
    import bench_cos_nce

    payload = json.loads(bench_cos_nce.main(["--smoke", "--no-compile", "--repeats", "1", "--out", str(tmp_path)])
                         .read_text())
    assert payload["env"]["git_commit"] is None or len(payload["env"]["git_commit"]) == 40
    impls = {r["impl"] for r in payload["results"]}
    assert {"naive eager", "best eager", "lrc_kernels[torch]"} <= impls
    ok = [r for r in payload["results"] if "error" not in r]
    assert len(ok) == len(payload["results"])
    assert all(r["fwd_ms"] > 0 and r["bwd_ms"] > 0 and r["speedup_vs_eager"] > 0 for r in ok)
    # The figure plots the D and K sweeps: without them (as in --groups paper) none is linked.
    assert "![speedup" not in bench_cos_nce.markdown(payload)
    payload["results"][0]["case"]["group"] = "sweep-D"
    assert "![speedup and roofline](" in bench_cos_nce.markdown(payload)


def test_cpu_peak_memory_sees_a_temporary():
    import common
    import torch

    size = 32 << 20
    # RSS is process-wide: memory another thread of this process releases inside the window
    # (tokenizer or OpenMP pools left by earlier tests) can hide the temporary once; three tries.
    peaks = [common.peak_added_bytes(lambda: torch.ones(size // 4), torch.device("cpu")) for _ in range(3)]
    if peaks[0] is None:
        pytest.skip("no /proc/self/clear_refs here")
    assert 0.9 * size <= max(peaks) <= 1.5 * size, peaks


def test_distill_benchmark_smoke(tmp_path):
    pytest.importorskip("transformers")
    import bench_distill

    pytest.importorskip("datasets")
    payload = json.loads(bench_distill.main(["--smoke", "--precisions", "fp32", "--out", str(tmp_path)]).read_text())
    assert [r["config"] for r in payload["train"]] == ["reference", "fused fp32", "fused fp32 + cache"]
    assert all(r["samples_per_s"] > 0 for r in payload["train"])
    assert payload["inference"]["smaller"] > 1
    assert bench_distill.layer_map(4, 12) == [3, 6, 9, 12]


def test_kernel_ab_script_builds_a_source_and_times_it_against_the_floor(tmp_path):
    import subprocess

    script = Path(__file__).resolve().parents[1] / "bench" / "ab_cpu_kernel.py"
    source = Path(__file__).resolve().parents[1] / "csrc" / "cpu" / "cos_nce_cpu.cpp"
    run = subprocess.run([sys.executable, str(script), str(source), "--shape", "3,2,70", "--rounds", "2"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert lines[-3].startswith("cos_nce, B=3 K=2 D=70") and "floor (torch.sum)" in lines[-2]
    assert "v0:cos_nce_cpu.cpp" in lines[-1] and "x sum" in lines[-1]
    missing = subprocess.run([sys.executable, str(script), str(tmp_path / "missing.cpp")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "no such kernel source" in missing.stderr


def test_floor_breakdown_reports_each_part_against_the_floor(capsys):
    import floor_breakdown

    floor_breakdown.main(["--shape", "3,2,70", "--rounds", "2", "--runs", "2", "--loss", "info_nce"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("info_nce, B=3 K=2 D=70") and lines[1].startswith("run | floor ms")
    rows = [[float(v) for v in line.split(" | ")] for line in lines[2:4]]
    assert [row[0] for row in rows] == [1, 2]
    assert all(len(row) == 6 and min(row[1:5]) > 0 for row in rows)  # floor ms, then three x floor
    median = lines[4].split(" | ")
    assert median[0] == "median" and len(median) == 6
    assert [float(v) for v in median[1:]] == pytest.approx([(a + b) / 2 for a, b in zip(rows[0][1:], rows[1][1:])],
                                                           abs=2e-3)  # each printed to 3 decimals
    with pytest.raises(SystemExit) as bad:
        floor_breakdown.main(["--shape", "3,2"])
    assert bad.value.code == 2 and "--shape must be B,K,D" in capsys.readouterr().err
