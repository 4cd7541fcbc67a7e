"""End-to-end benchmark: one LRC-BERT distillation step, and student vs teacher inference.

    python bench/bench_distill.py            # the paper's configuration
    python bench/bench_distill.py --smoke    # tiny models (used by the tests)

Training step (the paper's configuration, random weights, which is fine for timing):
  * a 12-layer, 768-wide BERT teacher, run without grad;
  * a 4-layer, 312-wide student with 12 heads and FFN 1200;
  * B = 16, L = 128; student layer i -> teacher layer ceil(i * 12 / 4), with one trained
    Linear(312, 768) projection per mapped layer;
  * L = COS-NCE over the 4 layers (in-batch negatives, whole masked sequence) + soft KL
    (T = 1.1) + 3 * hard CE, the paper's stage-2 weights; AdamW; gradient clipping.
    Gradient perturbation, which would add a second student pass, is not included.
It is timed once with the fused op (backend "auto") and once with the torch reference op.
The "loss share" is the loss's own forward and backward, timed on the same hidden states,
over the whole step.

Inference: student vs teacher latency at batch 1 and throughput at batch 32 (L = 128),
beside the paper's claims (7.5x smaller, 9.6x faster).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import lrc_kernels as lk  # noqa: E402

PAPER = {"smaller": 7.5, "faster": 9.6}


def bert_configs(smoke: bool):
    from transformers import BertConfig

    if smoke:
        teacher = BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                             intermediate_size=128, num_labels=3)
        student = BertConfig(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64, num_labels=3)
    else:
        teacher = BertConfig(num_labels=3)  # BERT-base: 12 x 768, 12 heads, FFN 3072
        student = BertConfig(hidden_size=312, num_hidden_layers=4, num_attention_heads=12,
                             intermediate_size=1200, num_labels=3)
    for cfg in (teacher, student):
        cfg.attn_implementation = "sdpa"
    return teacher, student


def layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Uniform mapping: student layer i -> teacher layer ceil(i * N / M) (1-based)."""
    return [math.ceil(i * teacher_layers / student_layers) for i in range(1, student_layers + 1)]


class DistillStep:
    """One optimiser step of LRC-BERT's stage-2 loss; ``backend`` picks the COS-NCE op."""

    def __init__(self, teacher, student, batch, seq, device, backend, temperature=1.1, weights=(1.0, 1.0, 3.0)):
        self.teacher, self.student, self.backend = teacher, student, backend
        self.mapping = layer_map(student.config.num_hidden_layers, teacher.config.num_hidden_layers)
        self.proj = torch.nn.ModuleList(
            torch.nn.Linear(student.config.hidden_size, teacher.config.hidden_size) for _ in self.mapping
        ).to(device)
        params = list(student.parameters()) + list(self.proj.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)
        self.params, self.temperature, self.weights = params, temperature, weights
        gen = torch.Generator().manual_seed(0)
        self.input_ids = torch.randint(0, teacher.config.vocab_size, (batch, seq), generator=gen).to(device)
        lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=gen)
        self.mask = (torch.arange(seq)[None, :] < lengths[:, None]).long().to(device)
        self.labels = torch.randint(0, 3, (batch,), generator=gen).to(device)

    def teacher_outputs(self):
        with torch.no_grad():
            out = self.teacher(input_ids=self.input_ids, attention_mask=self.mask, output_hidden_states=True)
        return out.logits, [out.hidden_states[j] for j in self.mapping]

    def loss(self, student_hidden, student_logits, teacher_hidden, teacher_logits):
        alpha, beta, gamma = self.weights
        keep = self.mask[..., None].to(student_hidden[0].dtype)
        nce = sum(
            lk.cos_nce_loss(proj(h_s) * keep, h_t * keep, backend=self.backend)
            for proj, h_s, h_t in zip(self.proj, student_hidden, teacher_hidden)
        )
        temp = self.temperature
        soft = F.kl_div(F.log_softmax(student_logits / temp, -1), F.softmax(teacher_logits / temp, -1),
                        reduction="batchmean")
        hard = F.cross_entropy(student_logits, self.labels)
        return alpha * nce + beta * soft + gamma * hard

    def __call__(self):
        teacher_logits, teacher_hidden = self.teacher_outputs()
        out = self.student(input_ids=self.input_ids, attention_mask=self.mask, output_hidden_states=True)
        student_hidden = [out.hidden_states[i] for i in range(1, len(self.mapping) + 1)]
        loss = self.loss(student_hidden, out.logits, teacher_hidden, teacher_logits)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        return loss

    def loss_only(self):
        """Forward + backward of the loss alone, on fixed hidden states."""
        teacher_logits, teacher_hidden = self.teacher_outputs()
        with torch.no_grad():
            out = self.student(input_ids=self.input_ids, attention_mask=self.mask, output_hidden_states=True)
        hidden = [out.hidden_states[i].detach().requires_grad_() for i in range(1, len(self.mapping) + 1)]
        logits = out.logits.detach().requires_grad_()

        def run():
            loss = self.loss(hidden, logits, teacher_hidden, teacher_logits)
            torch.autograd.grad(loss, hidden + [logits])

        return run


def _cpu_train_peak(backend: str, smoke: bool) -> int | None:
    """Peak added memory of one training step, measured in a fresh process."""
    from transformers import BertForSequenceClassification

    common.pin_mmap_threshold()
    torch.manual_seed(0)
    teacher_cfg, student_cfg = bert_configs(smoke)
    teacher = BertForSequenceClassification(teacher_cfg).eval()
    student = BertForSequenceClassification(student_cfg).train()
    batch, seq = (4, 16) if smoke else (16, 128)
    step = DistillStep(teacher, student, batch, seq, torch.device("cpu"), backend)
    step()  # optimizer state and one-time costs are not the step's memory
    return common.peak_added_bytes(step, torch.device("cpu"))


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def run(args) -> dict:
    from transformers import BertForSequenceClassification

    device = torch.device(args.device)
    torch.manual_seed(0)
    teacher_cfg, student_cfg = bert_configs(args.smoke)
    teacher = BertForSequenceClassification(teacher_cfg).to(device).eval()
    batch, seq = (4, 16) if args.smoke else (16, 128)
    repeats = 1 if args.smoke else args.repeats
    env = common.environment(device)
    payload = {"env": env, "config": {"batch": batch, "seq": seq, "teacher": teacher_cfg.to_diff_dict(),
                                      "student": student_cfg.to_diff_dict()}, "train": [], "inference": {}}

    steps = []  # kept for the memory pass at the end
    for backend in ("auto", "torch"):
        torch.manual_seed(0)
        student = BertForSequenceClassification(student_cfg).to(device).train()
        step = DistillStep(teacher, student, batch, seq, device, backend)
        resolved = lk.backends.resolve(backend, device).__module__.rsplit(".", 1)[-1]
        step_s = common.median_seconds(step, device, repeats=repeats, warmup=1)
        loss_s = common.median_seconds(step.loss_only(), device, repeats=repeats, warmup=1)
        row = {"op_backend": backend, "resolved": resolved, "step_ms": 1e3 * step_s, "loss_ms": 1e3 * loss_s,
               "loss_share": loss_s / step_s, "samples_per_s": batch / step_s}
        payload["train"].append(row)
        steps.append(step)
        print(f"train step, op backend {backend} ({resolved}): {row['step_ms']:.1f} ms, "
              f"loss {row['loss_ms']:.1f} ms ({100 * row['loss_share']:.1f}%)", flush=True)

    student = BertForSequenceClassification(student_cfg).to(device).eval()
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
    # Memory last, and on CPU in a fresh process (see common.py).
    for row, step in zip(payload["train"], steps):
        if device.type == "cpu":
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                row["peak_added_bytes"] = pool.apply(_cpu_train_peak, (row["op_backend"], args.smoke))
        else:
            row["peak_added_bytes"] = common.peak_added_bytes(step, device)
    payload["paper"] = PAPER
    return payload


def markdown(payload: dict) -> str:
    env, inf, cfg = payload["env"], payload["inference"], payload["config"]
    head = (f"Device: **{env['device']}**; torch {env['versions']['torch']}, transformers "
            f"{env['versions']['transformers']}; commit `{(env['git_commit'] or '?')[:10]}`; {env['date']}. "
            f"B = {cfg['batch']}, L = {cfg['seq']}; medians.")
    train = common.markdown_table(
        ["COS-NCE op", "runs as", "step ms", "samples/s", "loss ms", "loss share", "peak added MiB"],
        [[r["op_backend"], r["resolved"], r["step_ms"], r["samples_per_s"], r["loss_ms"],
          f"{100 * r['loss_share']:.1f}%", None if r["peak_added_bytes"] is None else r["peak_added_bytes"] / 2**20]
         for r in payload["train"]],
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
    return f"{head}\n\nOne distillation training step:\n\n{train}\n\nInference:\n\n{infer}"


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny models: checks the script, not the speed")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    args = parser.parse_args(argv)
    payload = run(args)
    path = common.write_json("distill-smoke" if args.smoke else "distill", payload, args.out)
    if not args.smoke:
        common.write_device_markdown(payload["env"]["device_slug"], {"End-to-end distillation": markdown(payload)},
                                     args.out)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
