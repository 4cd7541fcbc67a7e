"""Shared benchmark machinery: timing, peak memory, copy bandwidth, environment, results.

Timing
  * GPU: ``triton.testing.do_bench`` (median), with the callable rotating through several
    input sets so that L2 does not hold the previous call's data.
  * CPU: a warm-up, then repeated ``perf_counter`` timings; the median.

Peak added memory
  * GPU: ``torch.cuda.max_memory_allocated`` above what was allocated before the call.
  * CPU: the process's resident-set high-water mark (VmHWM, reset through
    ``/proc/self/clear_refs``) above the resident set before the call, with glibc's mmap
    threshold pinned at 64 KiB so that every large tensor is mapped and unmapped rather
    than recycled inside the heap. Pinning must come before the process's first large
    allocation (freed heap chunks would be reused unseen), and it makes later allocations
    fault their pages in, so benchmarks measure CPU memory in a fresh child process.
"""

from __future__ import annotations

import ctypes
import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------- devices


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


def device_slug(device: torch.device) -> str:
    if device.type == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return f"cpu-{os.cpu_count()}core"


def environment(device: torch.device) -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                                  cwd=Path(__file__).parent).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("triton", "transformers"):
        try:
            versions[pkg] = __import__(pkg).__version__
        except ImportError:
            versions[pkg] = None
    return {
        "device": device_name(device),
        "device_slug": device_slug(device),
        "threads": torch.get_num_threads(),
        "versions": versions,
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- timing


def median_seconds(fn: Callable, device: torch.device, *, repeats: int = 10, warmup: int = 2,
                   setup: Callable | None = None) -> float:
    """Median wall time of ``fn()`` in seconds; with ``setup``, of ``fn(setup())``, the setup untimed."""
    if setup is not None:
        times = []
        for i in range(warmup + repeats):
            arg = setup()
            synchronize(device)
            start = time.perf_counter()
            fn(arg)
            synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
        return statistics.median(times)
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_ratio(fn: Callable, reference: Callable, *, repeats: int = 10, warmup: int = 2) -> tuple[float, float]:
    """(median over rounds of time(fn) / time(reference), median time(reference) in seconds), each
    round timing the two back to back (CPU): on a shared machine the drift between separate
    measurements is larger than the margins being measured, and a ratio taken within a round
    cancels it."""
    for _ in range(warmup):
        reference()
        fn()
    ratios, reference_times = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        reference()
        middle = time.perf_counter()
        fn()
        end = time.perf_counter()
        ratios.append((end - middle) / (middle - start))
        reference_times.append(middle - start)
    return statistics.median(ratios), statistics.median(reference_times)


def gpu_kernel_seconds(fn: Callable[[], object], *, repeats: int = 20) -> float:
    """Mean GPU busy time per call of ``fn()`` (sum of its kernels, from the profiler).

    At these sizes a call's wall time on the GPU is mostly host-side launch overhead
    (Python, autograd, the dispatcher), which hides the kernels; this is the device-side
    cost, the number to hold against the memory roofline.
    """
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    total_us = sum(e.self_device_time_total for e in prof.key_averages())
    return total_us / 1e6 / repeats


class Rotating:
    """Cycle through input sets spanning 3x the L2 cache, so each call reads from HBM (one set on CPU)."""

    def __init__(self, make: Callable[[], Sequence], device: torch.device, budget_bytes: int = 2 << 30):
        first = make()
        size = max(1, sum(x.numel() * x.element_size() for x in first if isinstance(x, torch.Tensor)))
        copies = 1
        if device.type == "cuda":
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
            copies = max(1, min(64, -(-3 * l2 // size), budget_bytes // size))
        self.sets = [first] + [make() for _ in range(copies - 1)]
        self.i = 0

    def next(self):
        self.i = (self.i + 1) % len(self.sets)
        return self.sets[self.i]


# --------------------------------------------------------------------------- memory

_MMAP_PINNED = False


def pin_mmap_threshold() -> None:
    global _MMAP_PINNED
    if not _MMAP_PINNED:
        try:
            ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD = 64 KiB
        except OSError:
            pass
        _MMAP_PINNED = True


def _status_bytes(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_added_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak memory that ``fn()`` adds above what is live before it (None where unmeasurable)."""
    gc.collect()  # garbage freed during fn() would hide what fn() allocates
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    try:
        pin_mmap_threshold()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_bytes("VmRSS:")
        fn()
        return _status_bytes("VmHWM:") - before
    except OSError:
        return None


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 28) -> float:
    """Bytes per second of a large device copy, counting bytes read plus written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device, repeats=10, warmup=3)
    return 2 * nbytes / seconds


def last_level_cache_bytes() -> int:
    """The CPU's largest cache (sysfs; 32 MiB where it cannot be read)."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * scale)
        except ValueError:
            pass
    return max(sizes, default=32 << 20)


def read_floor(device: torch.device, nbytes: int, cold: bool = False) -> Callable[[], object]:
    """Reading a buffer of ``nbytes`` once (a large ``torch.sum``): the floor of an op that must
    read that many bytes. ``cold``: each call reads the next of several such buffers spanning 3x
    the last-level cache, so from DRAM, as an op whose inputs are new every call (a CPU option: on
    the GPU, ``triton.testing.do_bench`` flushes the L2 between calls)."""
    count = 1
    if cold and device.type == "cpu":
        count = max(1, -(-3 * last_level_cache_bytes() // max(nbytes, 1)))
    numel = max(nbytes // 4, 1)
    src = torch.empty(count * numel, dtype=torch.float32, device=device).uniform_()
    windows = src.view(count, numel).unbind(0)
    calls = iter(range(1 << 62))
    return lambda: windows[next(calls) % count].sum()



# --------------------------------------------------------------------------- results


def write_json(name: str, payload: dict, out_dir: Path = RESULTS_DIR) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{payload['env']['device_slug']}-{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)  # atomic: a reader never sees half a file
    return path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    def cell(v):
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_device_markdown(device_slug_: str, sections: dict[str, str], out_dir: Path = RESULTS_DIR) -> Path:
    """Merge this run's sections into ``<device>.md`` (other benchmarks' sections are kept)."""
    path = out_dir / f"{device_slug_}.md"
    existing = {}
    if path.exists():
        for block in re.split(r"(?m)^## ", path.read_text())[1:]:
            title, _, body = block.partition("\n")
            existing[title.strip()] = body.strip()
    existing.update({k: v.strip() for k, v in sections.items()})
    text = f"# Benchmark results: {device_slug_}\n\n" + "\n\n".join(f"## {k}\n\n{v}" for k, v in existing.items())
    path.write_text(text + "\n")
    return path
