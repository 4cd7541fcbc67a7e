"""Kernel microbenchmark: COS-NCE and InfoNCE against eager PyTorch, torch.compile and the roofline.

    python bench/bench_cos_nce.py                 # the device's default suite
    python bench/bench_cos_nce.py --smoke         # tiny shapes, seconds (used by the tests)

For each case it reports the median forward, backward and forward + backward time, the
peak memory added by forward + backward, and the achieved bandwidth as a fraction of the
copy bandwidth measured in the same run.

The fewest bytes forward + backward must move: the inputs (s, t and the K negatives of each
row) read once, and grad(s) written once. The backward need not re-read the inputs: row b's
gradient is grad_output_b times its gradient at grad_output = 1, which the forward can compute
while the row is in cache (the CPU one-pass path does). %BW divides those true minimum bytes;
"2-pass %BW" divides what a forward plus a separate backward moves (the inputs twice), which is
today's algorithm elsewhere, not a floor. "x floor" is the time over the single-read floor,
min_bytes / read bandwidth, the bandwidth of a large torch.sum over the inputs' bytes. On the
CPU the two are timed back to back in every round and "x floor" is the median of the ratios,
over up to 31 rounds where a round is cheap (a shared machine drifts more between separate
measurements than the margins being measured). The indexed mode draws a new index every call,
as a training step does, and its floor reads a new buffer every call (from DRAM, not the LLC).

On the CPU the speedups of lrc_kernels rows are interleaved too: each implementation and its
baseline (best eager, torch.compile of it) timed back to back for about 0.5 s of the baseline,
the median of the ratios.

The backward column times backward alone, each time on a fresh graph built untimed.

Only the student requires grad, as in distillation (teacher outputs are detached), so
"peak added memory <= 1.1x the gradient" compares with the size of grad(student).
"""

from __future__ import annotations

import argparse
import multiprocessing
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import common  # the script's own folder is on sys.path when it runs

import lrc_kernels as lk

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}


@dataclass
class Case:
    group: str  # "paper", "cls", "bank", "sweep-D", "sweep-K", "sweep-BD", "dtypes", "smoke"
    loss: str  # "cos_nce" | "info_nce"
    mode: str  # "explicit" | "in_batch" | "indexed"
    dtype: str
    batch: int
    num_neg: int
    dim: int
    bank_rows: int = 0

    @property
    def label(self) -> str:
        extra = f" N={self.bank_rows}" if self.mode == "indexed" else ""
        return f"{self.loss} {self.mode} {self.dtype} B={self.batch} K={self.num_neg} D={self.dim}{extra}"

    def make_inputs(self, device):
        dtype = DTYPES[self.dtype]
        s = torch.randn(self.batch, self.dim, device=device, dtype=dtype, requires_grad=True)
        t = torch.randn(self.batch, self.dim, device=device, dtype=dtype)
        if self.mode == "explicit":
            return s, t, torch.randn(self.batch, self.num_neg, self.dim, device=device, dtype=dtype), None
        if self.mode == "indexed":
            bank = torch.randn(self.bank_rows, self.dim, device=device, dtype=dtype)
            return s, t, bank, torch.randint(0, self.bank_rows, (self.batch, self.num_neg), device=device)
        return s, t, None, None

    def input_bytes(self) -> int:
        """The inputs a forward must read: s, t and the negatives (indexed: the B K gathered rows)."""
        rows = self.batch * (2 + (0 if self.mode == "in_batch" else self.num_neg))
        return rows * self.dim * DTYPES[self.dtype].itemsize

    def min_bytes(self) -> int:
        """The true minimum of forward + backward: the inputs read once, grad(s) written once."""
        return self.input_bytes() + self.batch * self.dim * DTYPES[self.dtype].itemsize

    def floor_scale(self) -> float:
        """The single-read floor is min_bytes / read bandwidth, the bandwidth that of a torch.sum over
        the inputs' bytes: that sum's time times min_bytes / input_bytes (18 / 17 at the paper shape;
        before 2026-12-02 the floor was the sum's time alone, 6% stricter there)."""
        return self.min_bytes() / self.input_bytes()

    def two_pass_bytes(self) -> int:
        """What a forward and a separate backward move (the inputs twice, grad(s) once); not a floor."""
        return 2 * self.input_bytes() + self.batch * self.dim * DTYPES[self.dtype].itemsize


def suite(device: torch.device, smoke: bool) -> list[Case]:
    if smoke:
        return [Case("smoke", loss, mode, "fp32", 4, 3, 64, 16)
                for loss in ("cos_nce", "info_nce") for mode in ("explicit", "in_batch", "indexed")]
    dtypes = ["fp32", "bf16"] if device.type == "cuda" else ["fp32"]
    cases = []
    for dtype in dtypes:
        for loss in ("cos_nce", "info_nce"):
            cases += [
                Case("paper", loss, "explicit", dtype, 16, 15, 98304),
                Case("paper", loss, "in_batch", dtype, 16, 15, 98304),
                Case("paper", loss, "indexed", dtype, 16, 15, 98304, 256),
                Case("cls", loss, "in_batch", dtype, 256, 255, 768),
                Case("bank", loss, "indexed", dtype, 64, 64, 768, 100_000 if device.type == "cuda" else 50_000),
            ]
        cases += [Case("sweep-D", "cos_nce", "explicit", dtype, 16, 15, d) for d in (768, 3072, 12288, 49152)]
        cases += [Case("sweep-K", "cos_nce", "explicit", dtype, 16, k, 12288) for k in (1, 4, 63, 127)]
    if device.type == "cpu":
        # The other CPU dtypes at the paper shape and the [CLS] shape.
        cases += [Case("dtypes", "cos_nce", mode, dtype, *shape) for dtype in ("bf16", "fp64")
                  for mode, shape in (("explicit", (16, 15, 98304)), ("in_batch", (256, 255, 768)))]
        # auto against best eager over B x D (explicit K = 15 up to 256 MiB of negatives).
        for batch in (2, 16, 256):
            for dim in (64, 768, 3072, 12288, 98304):
                cases += [Case("sweep-BD", loss, "in_batch", "fp32", batch, batch - 1, dim)
                          for loss in ("cos_nce", "info_nce")]
                if batch * 15 * dim <= 1 << 26:
                    cases.append(Case("sweep-BD", "cos_nce", "explicit", "fp32", batch, 15, dim))
    return cases


# --------------------------------------------------------------------------- baselines


def _acc(x):
    """The op's accumulation dtype: fp64 for fp64 inputs, else fp32."""
    return x.double() if x.dtype == torch.float64 else x.float()


def _finish(loss, pos, neg, temperature=0.1):
    if loss == "cos_nce":
        return (2.0 - 1.5 * pos + 0.5 * neg.mean(1)).mean()
    logits = torch.cat([pos[:, None], neg], 1) / temperature
    return (torch.logsumexp(logits, 1) - logits[:, 0]).mean()


def naive(loss, s, t, n, idx):
    """Gather the negatives into [B, K, D], then F.cosine_similarity."""
    batch = s.shape[0]
    if n is None and idx is None:
        others = torch.tensor([[j for j in range(batch) if j != b] for b in range(batch)], device=s.device)
        n = t[others]
    elif idx is not None:
        n = n[idx]
    pos = F.cosine_similarity(_acc(s), _acc(t), dim=-1, eps=1e-8)
    neg = F.cosine_similarity(_acc(s)[:, None], _acc(n), dim=-1, eps=1e-8)
    return _finish(loss, pos, neg)


def eager_best(loss, s, t, n, idx):
    """What a practitioner writes: F.normalize, then einsum (explicit/indexed) or one matmul (in-batch)."""
    s_hat, t_hat = F.normalize(_acc(s), dim=-1, eps=1e-8), F.normalize(_acc(t), dim=-1, eps=1e-8)
    pos = (s_hat * t_hat).sum(-1)
    if n is None and idx is None:
        cos = s_hat @ t_hat.T
        batch = s.shape[0]
        if loss == "cos_nce":  # the mean over j != b without materialising the off-diagonal
            return (2.0 - 1.5 * pos + 0.5 * (cos.sum(1) - pos) / (batch - 1)).mean()
        return F.cross_entropy(cos / 0.1, torch.arange(batch, device=s.device))
    if idx is not None:
        n = n[idx]
    neg = torch.einsum("bd,bkd->bk", s_hat, F.normalize(_acc(n), dim=-1, eps=1e-8))
    return _finish(loss, pos, neg)


def ours(backend):
    def run(loss, s, t, n, idx):
        fn = lk.cos_nce_loss if loss == "cos_nce" else lk.info_nce_loss
        return fn(s, t, n, idx, backend=backend)

    return run


def implementations(device: torch.device, with_compile: bool, group: str = "") -> dict:
    if group == "sweep-BD":  # the question there is only whether auto ever loses to eager
        return {"best eager": eager_best, "lrc_kernels[auto]": ours("auto")}
    impls = {"naive eager": naive, "best eager": eager_best}
    if with_compile:
        # A fresh compile per case: past dynamo's recompile limit, calls would silently run eagerly.
        torch._dynamo.reset()
        impls["torch.compile(best eager)"] = torch.compile(eager_best, dynamic=False)
    for backend in lk.available_backends(device.type):
        if device.type == "cpu" and backend == "triton":
            continue  # the interpreter is a correctness tool, not a CPU backend
        impls[f"lrc_kernels[{backend}]"] = ours(backend)
    return impls


# --------------------------------------------------------------------------- measuring


INDEX_SETS = 64


class CaseInputs:
    """The input sets one implementation is timed on: ``common.Rotating`` copies, and in the indexed
    mode a new index every call. A training step draws new negatives; one fixed index would leave
    its B K bank rows in the LLC (12.6 MB at N = 50,000), timing a cache-hot gather no step sees."""

    def __init__(self, case: Case, device):
        self.rotating = common.Rotating(lambda: case.make_inputs(device), device)
        self.indices = None
        if case.mode == "indexed":
            self.indices = [torch.randint(0, case.bank_rows, (case.batch, case.num_neg), device=device)
                            for _ in range(INDEX_SETS)]
        self.calls = 0

    def next(self):
        s, t, n, idx = self.rotating.next()
        if self.indices is not None:
            self.calls += 1
            idx = self.indices[self.calls % INDEX_SETS]
        return s, t, n, idx


def forward_backward_of(case: Case, fn, device, inputs=None):
    inputs = inputs or CaseInputs(case, device)

    def forward_backward():
        s, t, n, idx = inputs.next()
        torch.autograd.grad(fn(case.loss, s, t, n, idx), s)

    return forward_backward


def measure(case: Case, fn, device, repeats: int, floor=None) -> dict:
    inputs = CaseInputs(case, device)

    def forward():
        s, t, n, idx = inputs.next()
        return fn(case.loss, s, t, n, idx)

    forward_backward = forward_backward_of(case, fn, device, inputs)

    def fresh_graph():
        s, t, n, idx = inputs.next()
        return fn(case.loss, s, t, n, idx), s

    fwd = common.median_seconds(forward, device, repeats=repeats)
    both = common.median_seconds(forward_backward, device, repeats=repeats)
    # The backward alone, each on a fresh graph built untimed (re-running a retained graph is not
    # possible for every implementation: the one-pass backward scales its saved G in place).
    bwd = common.median_seconds(lambda graph: torch.autograd.grad(*graph), device, repeats=repeats,
                                setup=fresh_graph)
    row = {"fwd_ms": 1e3 * fwd, "bwd_ms": 1e3 * bwd, "fwd_bwd_ms": 1e3 * both}
    if floor is not None:  # the single-read floor timed right before each forward + backward
        # More rounds where they are cheap: a median of 7 moved by 0.5 between runs on a shared VM.
        rounds = max(repeats, min(31, int(0.5 / max(both, 1e-6))))
        ratio, read_s = common.interleaved_ratio(forward_backward, floor, repeats=rounds)
        row["x_floor"], row["floor_ms"] = ratio / case.floor_scale(), 1e3 * read_s * case.floor_scale()
    if device.type == "cuda":
        row["fwd_bwd_gpu_ms"] = 1e3 * common.gpu_kernel_seconds(forward_backward)
    return row


def measure_peak(case: Case, fn, device) -> int | None:
    s, t, n, idx = case.make_inputs(device)

    def forward_backward():
        torch.autograd.grad(fn(case.loss, s, t, n, idx), s)

    forward_backward()  # one-time costs (extension loading, compiling) are not the op's memory
    lk.empty_cpu_cache()  # the measured call allocates its gradient afresh: the cache is not free memory
    return common.peak_added_bytes(forward_backward, device)


def run(args) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    env = common.environment(device)
    copy_bw = common.copy_bandwidth(device, nbytes=(1 << 22) if args.smoke else (1 << 28))
    results = []
    groups = set(args.groups.split(",")) if args.groups else None
    compile_groups = set(args.compile_groups.split(","))
    for case in suite(device, args.smoke):
        if groups is not None and case.group not in groups:
            continue
        min_bytes = case.min_bytes()
        # The single-read floor, measured in this run: the inputs' bytes read once, timed, scaled to
        # the true minimum bytes (Case.floor_scale). On the CPU it is timed interleaved with each
        # implementation (x floor is the median of the ratios).
        floor = common.read_floor(device, case.input_bytes(), cold=case.mode == "indexed")
        floor_s = None if device.type == "cpu" else common.median_seconds(floor, device, repeats=10, warmup=3)
        impls = implementations(device, not args.no_compile and case.group in compile_groups, case.group)
        for name, fn in impls.items():
            try:
                row = measure(case, fn, device, args.repeats, floor if device.type == "cpu" else None)
            except (RuntimeError, torch.OutOfMemoryError) as exc:  # report, never hide
                row = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
            else:
                row["fwd_bw_fraction"] = case.input_bytes() / (row["fwd_ms"] / 1e3) / copy_bw
                row["fwd_bwd_bw_fraction"] = min_bytes / (row["fwd_bwd_ms"] / 1e3) / copy_bw  # true minimum
                row["fwd_bwd_two_pass_fraction"] = case.two_pass_bytes() / (row["fwd_bwd_ms"] / 1e3) / copy_bw
                if floor_s is not None:
                    row["floor_ms"] = 1e3 * floor_s * case.floor_scale()
                    row["x_floor"] = row["fwd_bwd_ms"] / row["floor_ms"]
                if "fwd_bwd_gpu_ms" in row:
                    row["fwd_bwd_gpu_bw_fraction"] = min_bytes / (row["fwd_bwd_gpu_ms"] / 1e3) / copy_bw
            results.append({"case": asdict(case), "label": case.label, "impl": name, **row})
            status = row.get("error") or f"{row['fwd_bwd_ms']:.3f} ms fwd+bwd"
            print(f"{case.label:62} {name:28} {status}", flush=True)
        if device.type == "cpu":
            interleave_against_baselines(case, impls, results[-len(impls):], device, args.repeats)
    jobs = [(row["case"], row["impl"]) for row in results if "error" not in row and row["case"]["group"] != "sweep-BD"]
    if device.type == "cpu":
        # A fresh process that pins glibc's mmap threshold before its first allocation: here,
        # heap chunks freed by the timings would be reused unseen, and pinning slows timings.
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            peaks = pool.apply(_cpu_peaks, (jobs, not args.no_compile))
    else:
        peaks = [measure_peak(Case(**case), implementations(device, impl.startswith("torch.compile"))[impl], device)
                 for case, impl in jobs]
    measured = (r for r in results if "error" not in r and r["case"]["group"] != "sweep-BD")  # speed only there
    for row, peak in zip(measured, peaks):
        case = Case(**row["case"])
        row["peak_added_bytes"] = peak
        if peak is not None:
            row["peak_over_grad"] = peak / (case.batch * case.dim * DTYPES[case.dtype].itemsize)
    return {"env": env, "copy_bandwidth_GBps": copy_bw / 1e9, "results": results}


def interleave_against_baselines(case: Case, impls: dict, rows: list, device, repeats: int) -> None:
    """Each lrc_kernels row's speedup over best eager and torch.compile, each pair timed back to
    back for about 0.5 s of the baseline, the median of the per-round ratios: separate medians
    drift on a shared machine by more than the margins measured (7-run medians of 0.3 ms calls by
    20%, of the N = 50,000 bank by 2x)."""
    by_impl = {row["impl"]: row for row in rows if "error" not in row}
    for baseline, key in (("best eager", "speedup_vs_eager_interleaved"),
                          ("torch.compile(best eager)", "speedup_vs_compile_interleaved")):
        if baseline not in by_impl:
            continue
        rounds = max(repeats, min(301, int(500 / by_impl[baseline]["fwd_bwd_ms"])))
        reference = forward_backward_of(case, impls[baseline], device)
        for name, row in by_impl.items():
            if name.startswith("lrc_kernels["):
                ratio, _ = common.interleaved_ratio(forward_backward_of(case, impls[name], device), reference,
                                                    repeats=rounds)
                row[key] = 1.0 / ratio


def _cpu_peaks(jobs, with_compile: bool) -> list:
    common.pin_mmap_threshold()
    peaks = []
    for case, impl in jobs:
        fn = implementations(torch.device("cpu"), with_compile and impl.startswith("torch.compile"))[impl]
        peaks.append(measure_peak(Case(**case), fn, torch.device("cpu")))
    return peaks


# --------------------------------------------------------------------------- reporting


def speedups(payload: dict) -> None:
    """Add ratios against best eager and torch.compile, measured in this same run."""
    by_case = {}  # keyed by group too: a sweep may repeat another group's shape, timed apart
    for r in payload["results"]:
        by_case.setdefault((r["case"]["group"], r["label"]), {})[r["impl"]] = r
    for group in by_case.values():
        base = group.get("best eager", {}).get("fwd_bwd_ms")
        comp = group.get("torch.compile(best eager)", {}).get("fwd_bwd_ms")
        base_gpu = group.get("best eager", {}).get("fwd_bwd_gpu_ms")
        comp_gpu = group.get("torch.compile(best eager)", {}).get("fwd_bwd_gpu_ms")
        for r in group.values():
            if "fwd_bwd_ms" in r:
                separate_eager = base / r["fwd_bwd_ms"] if base else None
                separate_compile = comp / r["fwd_bwd_ms"] if comp else None
                r["speedup_vs_eager"] = r.get("speedup_vs_eager_interleaved") or separate_eager
                r["speedup_vs_compile"] = r.get("speedup_vs_compile_interleaved") or separate_compile
            if "fwd_bwd_gpu_ms" in r:
                r["gpu_speedup_vs_eager"] = base_gpu / r["fwd_bwd_gpu_ms"] if base_gpu else None
                r["gpu_speedup_vs_compile"] = comp_gpu / r["fwd_bwd_gpu_ms"] if comp_gpu else None


def markdown(payload: dict) -> str:
    env = payload["env"]
    gpu_run = not env["device_slug"].startswith("cpu")
    head = (
        f"Device: **{env['device']}**; torch {env['versions']['torch']}, triton {env['versions']['triton']}; "
        f"commit `{(env['git_commit'] or '?')[:10]}`{' (dirty)' if env['git_dirty'] else ''}; {env['date']}. "
        f"Measured copy bandwidth: {payload['copy_bandwidth_GBps']:.1f} GB/s (read + write). "
        "Times are medians in ms; speedups are against the same run's best eager and torch.compile"
        + ("" if gpu_run else " (for lrc_kernels rows, the median ratio of the two timed back to back)") + "; "
        "%BW is the true minimum bytes (the inputs read once, grad(student) written once) / time over the "
        "copy bandwidth; '2-pass %BW' divides what a forward plus a separate backward move instead (not a "
        "floor). 'x floor' is the time over the single-read floor, measured in this run: the true minimum "
        "bytes at the read bandwidth of a large torch.sum over the inputs' bytes"
        + ("." if gpu_run else "; on the CPU the median of per-round ratios, the floor timed right before each "
           "forward + backward. The indexed mode draws a new index every call, and its floor reads from DRAM.")
    )
    gpu = any("fwd_bwd_gpu_ms" in r for r in payload["results"])
    if gpu:
        head += (" On the GPU, wall times at these sizes are mostly host-side launch overhead, so the "
                 "**GPU** columns give the kernels' own time (profiler, summed per call) and the speedups "
                 "and %BW on it.")
    rows = []
    for r in payload["results"]:
        width = 10 if gpu else 7
        if "error" in r:
            rows.append([r["label"], r["impl"], r["error"]] + [None] * (width + 2))
            continue
        peak = r.get("peak_added_bytes")
        row = [
            r["label"], r["impl"], r["fwd_ms"], r["bwd_ms"], r["fwd_bwd_ms"],
            r.get("speedup_vs_eager"), r.get("speedup_vs_compile"),
        ]
        if gpu:
            row += [r.get("fwd_bwd_gpu_ms"), r.get("gpu_speedup_vs_eager"), r.get("gpu_speedup_vs_compile")]
        percent = r.get("fwd_bwd_gpu_bw_fraction", r["fwd_bwd_bw_fraction"])
        row += [None if peak is None else peak / 2**20, r.get("peak_over_grad"), 100 * percent,
                100 * r["fwd_bwd_two_pass_fraction"], r.get("x_floor")]
        rows.append(row)
    header = ["case", "impl", "fwd ms", "bwd ms", "fwd+bwd ms", "x eager", "x compile"]
    if gpu:
        header += ["GPU fwd+bwd ms", "GPU x eager", "GPU x compile"]
    header += ["peak MiB", "peak/grad", "%BW" + (" (GPU time)" if gpu else ""), "2-pass %BW", "x floor"]
    table = common.markdown_table(header, rows)
    sweep = [r for r in payload["results"] if r["impl"] == "lrc_kernels[auto]" and r.get("speedup_vs_eager")]
    if sweep:
        worst = min(sweep, key=lambda r: r["speedup_vs_eager"])
        table += (f"\n\n`auto` against best eager over the B x D sweep ({len(sweep)} shapes, B 2 to 256, D 64 to "
                  f"98,304; on the CPU the median ratio of the two timed back to back, about 0.5 s of each): worst {worst['speedup_vs_eager']:.2f}x ({worst['label']}), median "
                  f"{sorted(r['speedup_vs_eager'] for r in sweep)[len(sweep) // 2]:.2f}x.")
    figure = f"\n\n![speedup and roofline]({env['device_slug']}-cos_nce.png)" if has_sweeps(payload) else ""
    return head + "\n\n" + table + figure


def has_sweeps(payload: dict) -> bool:
    """Whether the D and K sweeps ran: the figure plots them, and is not drawn (or linked) without."""
    return any(r["case"]["group"] in ("sweep-D", "sweep-K") and "fwd_bwd_ms" in r for r in payload["results"])


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex="col")
    for col, (group, key) in enumerate((("sweep-D", "dim"), ("sweep-K", "num_neg"))):
        rows = [r for r in payload["results"] if r["case"]["group"] == group and "fwd_bwd_ms" in r]
        for impl in sorted({r["impl"] for r in rows}):
            for dtype in sorted({r["case"]["dtype"] for r in rows}):
                pts = sorted((r["case"][key], r) for r in rows if r["impl"] == impl and r["case"]["dtype"] == dtype)
                if not pts:
                    continue
                xs = [p[0] for p in pts]
                label = f"{impl} {dtype}"
                axes[0, col].plot(xs, [p[1].get("speedup_vs_eager") or float("nan") for p in pts], "o-", label=label)
                axes[1, col].plot(xs, [100 * p[1]["fwd_bwd_bw_fraction"] for p in pts], "o-", label=label)
        axes[0, col].set_title(f"COS-NCE explicit, {group}")
        axes[0, col].set_ylabel("speedup vs best eager (fwd+bwd)")
        axes[1, col].set_ylabel("% of copy bandwidth, true minimum bytes (fwd+bwd)")
        axes[1, col].set_xlabel("D" if key == "dim" else "K")
        for ax in axes[:, col]:
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"lrc_kernels COS-NCE on {payload['env']['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per measurement on CPU")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script, not the speed")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--groups", default="", help="comma list of case groups to run (default: all)")
    parser.add_argument("--compile-groups", default="paper,cls,bank,smoke",
                        help="groups that get the torch.compile baseline (one fresh compile per case; "
                             "the sweeps compare against eager only, to keep the suite short)")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR, help="results folder")
    args = parser.parse_args(argv)
    payload = run(args)
    speedups(payload)
    name = "cos_nce-smoke" if args.smoke else "cos_nce"
    path = common.write_json(name, payload, args.out)
    if not args.smoke:
        if has_sweeps(payload):
            plot(payload, args.out / f"{payload['env']['device_slug']}-cos_nce.png")
        common.write_device_markdown(payload["env"]["device_slug"], {"COS-NCE kernel": markdown(payload)}, args.out)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
