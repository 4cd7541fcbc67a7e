"""End-to-end benchmark: LRC-BERT training throughput, and student vs teacher inference.

    python bench/bench_distill.py                 # the paper's configuration (GPU: minutes)
    python bench/bench_distill.py --small         # a small configuration (the CPU numbers)
    python bench/bench_distill.py --smoke         # tiny models (used by the tests)

Training throughput runs the trainer's own step (``Trainer.optimizer_step`` over
``DistillMethod``, AdamW, clipping, the collator) on synthetic token ids, in samples per
second, median over windows of steps. Configuration (the paper's): a 12-layer, 768-wide
BERT teacher; a 4-layer, 312-wide student (12 heads, FFN 1200); B = 16, L = 128 (padding
per row random in [L/2, L], masked); the sequence representation of 4 mapped layers with
trained projections; the stage-2 loss (COS-NCE + soft + 3 hard) with gradient
perturbation, the heaviest step of the method. Rows:

* reference: fp32, COS-NCE through the torch reference op, the teacher run every step;
* fused: the precision given (bf16 by default), COS-NCE through the fused op (``auto``);
* fused + cache: the same, with the teacher's outputs read from a ``cache-teacher`` cache
  (the teacher never runs);
* with ``--cuda-graphs`` (the default on a GPU): the reference and both fused rows again
  with the whole step replayed as a CUDA graph (``lrc_bert/cuda_graph.py``), since at
  B = 16 the eager step is bound by kernel launches, not by the GPU;
* with ``--compile``, the cache row again with the student's encoder compiled.

Weights are random, which is fine for timing. Inference: student vs teacher latency at
batch 1 and throughput at batch 32 (L = 128), beside the paper's claims (7.5x smaller,
9.6x faster).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch

import common  # the script's own folder is on sys.path when it runs

from lrc_bert.modeling import uniform_layer_map as layer_map

PAPER = {"smaller": 7.5, "faster": 9.6}
SNLI_LABELS = {0: "entailment", 1: "neutral", 2: "contradiction"}
SIZES = {  # teacher (layers, width, heads, ffn), student (layers, width, heads, ffn), vocab, batch, seq
    "paper": ((12, 768, 12, 3072), (4, 312, 12, 1200), 30522, 16, 128),
    "small": ((6, 384, 12, 1536), (4, 312, 12, 1200), 30522, 16, 64),
    "smoke": ((4, 64, 4, 128), (2, 32, 4, 64), 512, 4, 16),
}


def bert_configs(size: str):
    from transformers import BertConfig

    (tl, tw, th, tf), (sl, sw, sh, sf), vocab, _, _ = SIZES[size]
    teacher = BertConfig(vocab_size=vocab, hidden_size=tw, num_hidden_layers=tl, num_attention_heads=th,
                         intermediate_size=tf, num_labels=3, id2label=SNLI_LABELS,
                         label2id={v: k for k, v in SNLI_LABELS.items()})
    student = dict(vocab_size=vocab, hidden_size=sw, num_hidden_layers=sl, num_attention_heads=sh,
                   intermediate_size=sf)
    return teacher, student


def synthetic_train_set(rows: int, vocab: int, seq: int):
    """Random token ids with per-row lengths in [seq/2, seq], as a datasets.Dataset."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (rows, seq), generator=g)
    lengths = torch.randint(seq // 2, seq + 1, (rows,), generator=g)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    return Dataset.from_dict({"input_ids": (ids * mask).tolist(), "token_type_ids": torch.zeros_like(ids).tolist(),
                              "attention_mask": mask.tolist(),
                              "label": torch.randint(0, 3, (rows,), generator=g).tolist()})


def collate(rows: dict) -> dict:
    batch = {k: torch.tensor(rows[k]) for k in ("input_ids", "token_type_ids", "attention_mask")}
    batch["labels"] = torch.tensor(rows["label"])
    return batch


class _NoTokenizer:
    def save_pretrained(self, folder):
        pass


def make_trainer(size: str, teacher, device, precision: str, backend: str, cache_dir, compile_student: bool,
                 train_set, cuda_graphs: bool = False, **overrides):
    """A Trainer over the distillation method; ``overrides`` are further TrainConfig settings."""
    from lrc_bert.config import build_config
    from lrc_bert.distill import DistillMethod
    from lrc_bert.runtime import Runtime
    from lrc_bert.tasks import get_task
    from lrc_bert.teacher_cache import TeacherCache
    from lrc_bert.trainer import Trainer

    _, (sl, sw, sh, sf), _, batch, seq = SIZES[size]
    cfg = build_config(None, task="snli", output=str(Path(tempfile.gettempdir()) / "bench_distill"),
                       teacher="(in memory)", batch_size=batch, max_length=seq, precision=precision,
                       loss_backend=backend, student_layers=sl, student_hidden=sw, student_heads=sh,
                       student_intermediate=sf, teacher_cache=str(cache_dir) if cache_dir else None,
                       compile_student=compile_student, cuda_graphs=cuda_graphs, max_steps=10**6,
                       tensorboard=False, **{"stage1_fraction": 0.0, **overrides})
    runtime = Runtime(device, precision)
    cache = TeacherCache(cache_dir) if cache_dir else None
    torch.manual_seed(0)
    method = DistillMethod(cfg, get_task("snli"), teacher.config if cache else teacher, _NoTokenizer(), runtime,
                           cache)
    return Trainer(cfg, method, train_set, {}, collate, get_task("snli"), runtime, "dev")


def throughput(trainer, device, windows: int, steps: int, warmup: int) -> dict:
    """Samples per second of whole training steps (data, step, optimiser), median of windows."""
    batches = trainer.batches(0)
    for _ in range(warmup):
        trainer.optimizer_step(*next(batches))
    rates = []
    for _ in range(windows):
        common.synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            trainer.optimizer_step(*next(batches))
        common.synchronize(device)
        rates.append(steps * trainer.cfg.batch_size / (time.perf_counter() - start))
    return {"samples_per_s": statistics.median(rates), "step_ms": 1e3 * trainer.cfg.batch_size
            / statistics.median(rates), "windows": rates}


def write_cache(size: str, teacher, device, train_set, folder: Path, precision: str) -> Path:
    from lrc_bert.config import build_config
    from lrc_bert.teacher_cache import write_teacher_cache

    _, (sl, *_), _, _, seq = SIZES[size]
    cfg = build_config(None, output=str(folder), representation="sequence", max_length=seq, eval_batch_size=64,
                       teacher="(in memory)", task="snli")
    layers = sorted(set(layer_map(sl, teacher.config.num_hidden_layers)))
    return write_teacher_cache(cfg, teacher, train_set, collate, layers, device, precision)


class Config(NamedTuple):
    name: str
    precision: str
    backend: str  # the COS-NCE op's backend
    cached: bool = False  # teacher outputs from a cache-teacher cache
    compiled: bool = False  # the student's encoder compiled
    graphed: bool = False  # the step replayed as a CUDA graph


def run_training_rows(args, size: str, teacher, device) -> list[dict]:
    _, _, vocab, batch, seq = SIZES[size]
    windows, steps, warmup = (1, 2, 1) if size == "smoke" else (args.windows, args.steps, args.warmup)
    train_set = synthetic_train_set(max(256, batch * (warmup + windows * steps + 1)), vocab, seq)
    configs = [Config("reference", "fp32", "torch")]
    for precision in args.precisions.split(","):
        configs += [Config(f"fused {precision}", precision, "auto"),
                    Config(f"fused {precision} + cache", precision, "auto", cached=True)]
        if args.compile:
            configs.append(Config(f"fused {precision} + cache + compiled student", precision, "auto", cached=True,
                                  compiled=True))
    if args.cuda_graphs:  # each eager row again as a graph (not fp16 or a compiled student: refused there)
        configs += [c._replace(name=f"{c.name} + CUDA graph", graphed=True) for c in configs
                    if not c.compiled and c.precision != "fp16"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        caches = {}
        for name, precision, backend, cached, compiled, graphed in configs:
            cache_dir = None
            if cached:
                if precision not in caches:
                    caches[precision] = write_cache(size, teacher, device, train_set, Path(tmp) / f"cache-{precision}",
                                                    precision)
                cache_dir = caches[precision]
            trainer = make_trainer(size, teacher, device, precision, backend, cache_dir, compiled, train_set, graphed)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            # A graphed run's first steps are eager, then one is captured: all within the warm-up.
            row = {"config": name, "precision": precision, "op_backend": backend, "teacher_cache": cached,
                   "compiled_student": compiled, "cuda_graph": graphed,
                   **throughput(trainer, device, windows, steps, max(warmup, 4) if graphed else warmup)}
            if device.type == "cuda":
                row["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(device)
            rows.append(row)
            print(f"{name}: {row['samples_per_s']:.1f} samples/s ({row['step_ms']:.1f} ms/step)", flush=True)
            del trainer
    for row in rows:
        row["speedup"] = row["samples_per_s"] / rows[0]["samples_per_s"]
    return rows


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def run(args) -> dict:
    from transformers import BertConfig, BertForSequenceClassification

    size = "smoke" if args.smoke else ("small" if args.small else "paper")
    device = torch.device(args.device)
    torch.manual_seed(0)
    teacher_cfg, student_kwargs = bert_configs(size)
    for cfg in (teacher_cfg,):
        cfg.attn_implementation = "sdpa"
    teacher = BertForSequenceClassification(teacher_cfg).to(device).eval()
    _, _, _, batch, seq = SIZES[size]
    payload = {"env": common.environment(device), "size": size,
               "config": {"batch": batch, "seq": seq, "teacher": teacher_cfg.to_diff_dict(), "student": student_kwargs},
               "train": run_training_rows(args, size, teacher, device), "inference": {}}

    student = BertForSequenceClassification(BertConfig(**student_kwargs, num_labels=3)).to(device).eval()
    repeats = 1 if args.smoke else args.repeats
    inf = payload["inference"]
    inf["teacher_params"], inf["student_params"] = count_params(teacher), count_params(student)
    inf["smaller"] = inf["teacher_params"] / inf["student_params"]
    gen = torch.Generator().manual_seed(1)
    for bs in (1, 32):
        ids = torch.randint(0, teacher_cfg.vocab_size, (bs, seq), generator=gen).to(device)
        for name, model in (("teacher", teacher), ("student", student)):
            with torch.inference_mode():
                seconds = common.median_seconds(lambda: model(input_ids=ids), device, repeats=repeats, warmup=1)
            inf[f"{name}_bs{bs}_ms"] = 1e3 * seconds
            inf[f"{name}_bs{bs}_samples_per_s"] = bs / seconds
        inf[f"faster_bs{bs}"] = inf[f"teacher_bs{bs}_ms"] / inf[f"student_bs{bs}_ms"]
        print(f"inference bs={bs}: teacher {inf[f'teacher_bs{bs}_ms']:.1f} ms, "
              f"student {inf[f'student_bs{bs}_ms']:.1f} ms ({inf[f'faster_bs{bs}']:.1f}x)", flush=True)
    payload["paper"] = PAPER
    return payload


def markdown(payload: dict) -> str:
    env, inf, cfg = payload["env"], payload["inference"], payload["config"]
    head = (f"Device: **{env['device']}**; torch {env['versions']['torch']}, transformers "
            f"{env['versions']['transformers']}; commit `{(env['git_commit'] or '?')[:10]}`; {env['date']}. "
            f"B = {cfg['batch']}, L = {cfg['seq']}; medians.")
    train = common.markdown_table(
        ["configuration", "samples/s", "step ms", "vs reference", "peak GPU MiB"],
        [[r["config"], r["samples_per_s"], r["step_ms"], f"{r['speedup']:.2f}x",
          r["peak_gpu_bytes"] / 2**20 if "peak_gpu_bytes" in r else None] for r in payload["train"]],
    )
    infer = common.markdown_table(
        ["", "teacher", "student", "ours (teacher / student)", "paper"],
        [
            ["parameters", inf["teacher_params"], inf["student_params"], f"{inf['smaller']:.2f}x smaller",
             f"{PAPER['smaller']}x smaller"],
            ["latency, batch 1 (ms)", inf["teacher_bs1_ms"], inf["student_bs1_ms"], f"{inf['faster_bs1']:.2f}x faster",
             f"{PAPER['faster']}x faster"],
            ["throughput, batch 32 (samples/s)", inf["teacher_bs32_samples_per_s"], inf["student_bs32_samples_per_s"],
             f"{inf['faster_bs32']:.2f}x faster", f"{PAPER['faster']}x faster"],
        ],
    )
    return (f"{head}\n\nTraining throughput (the trainer's step: stage-2 loss with gradient perturbation, "
            f"AdamW, clipping):\n\n{train}\n\nInference:\n\n{infer}")


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny models: checks the script, not the speed")
    parser.add_argument("--small", action="store_true", help="a 6 x 384 teacher, L = 64 (the CPU configuration)")
    parser.add_argument("--precisions", default=None,
                        help="comma list for the fused rows (default: bf16 on GPU, bf16,fp32 on CPU)")
    parser.add_argument("--compile", action="store_true", help="add a row with the student's encoder compiled")
    parser.add_argument("--cuda-graphs", dest="cuda_graphs", action=argparse.BooleanOptionalAction, default=None,
                        help="add the rows again with the step replayed as a CUDA graph (default: on a GPU)")
    parser.add_argument("--windows", type=int, default=5, help="timing windows (the median is reported)")
    parser.add_argument("--steps", type=int, default=10, help="training steps per window")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.cuda_graphs is None:
        args.cuda_graphs = args.device.startswith("cuda")
    if args.cuda_graphs and not args.device.startswith("cuda"):
        parser.error("--cuda-graphs needs --device cuda")
    if args.precisions is None:
        args.precisions = "bf16" if args.device.startswith("cuda") else "bf16,fp32"
    payload = run(args)
    name = "distill-smoke" if args.smoke else ("distill-small" if args.small else "distill")
    path = common.write_json(name, payload, args.out)
    if not args.smoke:
        title = "End-to-end distillation" + (" (small configuration)" if args.small else "")
        common.write_device_markdown(payload["env"]["device_slug"], {title: markdown(payload)}, args.out)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
