"""The ``lrc-bert`` command: finetune, distill, evaluate.

Settings come from the defaults (the paper's; see lrc_bert/configs/lrc_bert.yaml), then
``--config YAML``, then flags. Everything is checked before any model or data loads.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import typing
from typing import Optional

from . import __version__
from .config import TrainConfig, build_config

log = logging.getLogger("lrc_bert")

COMMON_HELP = {
    "task": "GLUE task (cola sst2 mrpc stsb qqp mnli qnli rte wnli) or snli",
    "data_dir": "folder with the GLUE TSV files (train.tsv, dev.tsv; MNLI: dev_matched.tsv, dev_mismatched.tsv); "
                "default: download through datasets from the Hugging Face hub",
    "config": "YAML file of settings, or the name of a shipped one (lrc_bert: the paper's); flags override it",
    "epochs": "training epochs (default 3)",
    "max_steps": "stop after this many optimiser steps (overrides --epochs)",
    "batch_size": "global training batch per optimiser step, over all processes and micro-batches "
                  "(default 16, as in the paper)",
    "grad_accum_steps": "split each process's share of the batch into N micro-batches, accumulating gradients "
                        "(the loss is divided by N; default 1)",
    "precision": "fp32 (default), bf16 (autocast) or fp16 (autocast and a gradient scaler)",
    "eval_batch_size": "evaluation batch size (default 64)",
    "learning_rate": "peak AdamW learning rate (the paper searches 5e-5, 1e-4, 3e-4; default 5e-5)",
    "weight_decay": "AdamW weight decay (default 0.01; none on biases and LayerNorm)",
    "warmup_ratio": "fraction of steps with linear warm-up (default 0.1), then linear decay to 0",
    "max_grad_norm": "gradient clipping norm (default 1.0)",
    "max_length": "pad / truncate every input to this many tokens (default 128, as in the paper); "
                  "0 for dynamic padding",
    "seed": "random seed (data order, init, dropout, negative sampling; default 42)",
    "eval_steps": "evaluate on dev every N steps, and at the end (default 500)",
    "save_steps": "write a resumable checkpoint every N steps (default 500)",
    "keep_checkpoints": "keep the last N checkpoints (default 2; the best model is kept apart)",
    "logging_steps": "log the loss parts every N steps (default 10)",
    "device": "auto (default), cpu, cuda, cuda:N or mps",
    "limit_train": "use only the first N training examples (smoke runs)",
    "limit_eval": "use only the first N examples of each dev split",
    "cache_dir": "datasets cache folder",
}

CUDA_GRAPHS_HELP = ("replay each training step as one CUDA graph (one process, fp32 or bf16, fixed --max-length): "
                    "removes the per-kernel launch cost that bounds small batches")

DISTILL_HELP = {
    "student_config": "transformers config JSON for the student (default: BERT 4 layers, 312 wide, 12 heads, "
                      "FFN 1200, the teacher's vocabulary)",
    "student_init": "a pretrained student (path or hub name) instead of a random init: a general-distill student "
                    "(OUTPUT/student) makes the run LRC-BERT; without it, LRC-BERT1",
    "student_layers": "student layers for the default config (default 4)",
    "student_hidden": "student width for the default config (default 312)",
    "student_heads": "student attention heads for the default config (default 12)",
    "student_intermediate": "student FFN width for the default config (default 1200)",
    "representation": "COS-NCE representation: sequence (whole layer, padding masked; the paper) or cls",
    "num_negatives": "K negatives sampled per row from the batch (default: all B - 1), or drawn from the bank",
    "negative_source": "batch: other rows of the batch (default); bank: K rows per sample drawn from the cached "
                       "teacher representations of the whole training set (needs --teacher-cache)",
    "negatives": "any: every other row may be a negative (default); other-label: only rows of another class "
                 "(no false negatives; K per row, refilled from those rows when fewer)",
    "teacher_cache": "folder written by `lrc-bert cache-teacher`: the teacher's outputs are read from it and "
                     "the teacher never runs",
    "loss_backend": "lrc_kernels backend for COS-NCE: auto (default), torch, triton, cpp, cuda",
    "temperature": "soft-loss temperature (default 1.1)",
    "alpha": "COS-NCE weight, both stages (default 1)",
    "beta": "soft (KL) loss weight in stage 2 (default 1; stage 1 uses 0)",
    "gamma": "hard (cross-entropy) loss weight in stage 2 (default 3; stage 1 uses 0)",
    "stage1_fraction": "fraction of steps in stage 1 (default 0.8)",
    "perturb_eps": "norm of the per-example gradient perturbation of the embedding output (default 1.0; 0: off)",
    "perturb_mode": "replace: train on the perturbed gradient only (the paper); add: clean + perturbed (FGM)",
}


GENERAL_HELP = {
    "dataset": "a text dataset for datasets.load_dataset (e.g. wikitext), instead of --corpus",
    "dataset_config": "the dataset's configuration (e.g. wikitext-103-raw-v1)",
    "dataset_split": "the dataset's split (default train)",
    "text_column": "the dataset's text column (default text)",
    "validation_fraction": "fraction of the packed sequences held out to judge checkpoints (default 0.01)",
}
GENERAL_FROM = ("epochs", "max_steps", "batch_size", "grad_accum_steps", "precision", "eval_batch_size", "learning_rate",
                "weight_decay", "warmup_ratio", "max_grad_norm", "seed", "eval_steps", "save_steps",
                "keep_checkpoints", "logging_steps", "device", "cache_dir", "config")
GENERAL_DISTILL_FROM = ("student_config", "student_init", "student_layers", "student_hidden", "student_heads",
                        "student_intermediate", "representation", "num_negatives", "loss_backend", "alpha",
                        "perturb_eps", "perturb_mode")


def _value_type(name: str):
    """int or float for numeric settings (Optional[...] unwrapped), else str."""
    hint = typing.get_type_hints(TrainConfig)[name]
    kinds = [k for k in typing.get_args(hint) if k is not type(None)] or [hint]
    return kinds[0] if kinds[0] in (int, float) else str


def _add_settings(parser: argparse.ArgumentParser, helps: dict) -> None:
    for name, text in helps.items():
        if name == "config":
            parser.add_argument("--config", default=None, metavar="YAML", help=text)
            continue
        kind = _value_type(name)
        choices = {"representation": ["sequence", "cls"], "perturb_mode": ["replace", "add"],
                   "precision": ["fp32", "bf16", "fp16"], "negative_source": ["batch", "bank"],
                   "negatives": ["any", "other-label"]}.get(name)
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=None, choices=choices,
                            help=text)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lrc-bert", description="LRC-BERT distillation (Fu et al., AAAI 2021) "
                                     "with the fused COS-NCE kernels of lrc_kernels.")
    parser.add_argument("--version", action="version", version=f"lrc-bert {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    ft = sub.add_parser("finetune", help="fine-tune a teacher; saves the best dev model to OUTPUT/model")
    ft.add_argument("--model", required=True, help="Hugging Face encoder: a local path or a hub name")
    ft.add_argument("--output", required=True, help="run folder: metrics.jsonl, checkpoints/, model/")
    ft.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUTPUT")
    ft.add_argument("--ignore-mismatched-sizes", dest="ignore_mismatched_sizes", action="store_true", default=None,
                    help="re-initialise (with a warning) a classification head whose label count is not the task's")
    _add_settings(ft, COMMON_HELP)
    _add_switches(ft, "overwrite_output", "cuda_graphs", "group_by_length", "no_tensorboard")

    ds = sub.add_parser("distill", help="distill a fine-tuned teacher into a small student (LRC-BERT)")
    ds.add_argument("--teacher", required=True, help="fine-tuned teacher folder (e.g. OUTPUT/model of finetune)")
    ds.add_argument("--output", required=True, help="run folder: metrics.jsonl, checkpoints/, student/")
    ds.add_argument("--resume", action="store_true", help="continue exactly from the latest checkpoint in OUTPUT")
    ds.add_argument("--ignore-mismatched-sizes", dest="ignore_mismatched_sizes", action="store_true", default=None,
                    help="re-initialise (with a warning) a --student-init classification head of another label count")
    ds.add_argument("--assume-label-order", dest="assume_label_order", action="store_true", default=None,
                    help="accept a teacher whose labels are the generic LABEL_i, in the task's canonical order")
    _add_settings(ds, {**COMMON_HELP, **DISTILL_HELP})
    _add_layer_map(ds)
    _add_switches(ds, "overwrite_output", "no_tensorboard", "compile_student", "group_by_length", "cuda_graphs",
                  "global_negatives", "reinit_projections")

    ct = sub.add_parser("cache-teacher", help="run the teacher once over the training set and store its logits "
                        "and mapped-layer representations (fp16 memory maps) for distill --teacher-cache")
    ct.add_argument("--teacher", required=True, help="fine-tuned teacher folder (e.g. OUTPUT/model of finetune)")
    ct.add_argument("--output", required=True, help="cache folder to write (its disk need is stated first)")
    _add_settings(ct, {**{k: COMMON_HELP[k] for k in ("task", "data_dir", "config", "max_length", "eval_batch_size",
                                                     "precision", "device", "limit_train", "cache_dir")},
                       **{k: DISTILL_HELP[k] for k in ("representation", "student_layers")}})
    _add_layer_map(ct)

    gl = sub.add_parser("glue", help="a whole GLUE distillation: per task, fine-tune the teacher, distill the "
                        "student, evaluate both; the paper's table and the leaderboard files")
    gl.add_argument("--teacher-base", dest="teacher_base", required=True,
                    help="pretrained encoder each task's teacher is fine-tuned from (local path or hub name)")
    gl.add_argument("--output", required=True, help="run folder: <task>/..., results.md, results.json, glue_submission/")
    gl.add_argument("--data-dir", dest="data_dir", default=None,
                    help="the official GLUE folder (CoLA/, SST-2/, MRPC/, STS-B/, QQP/, MNLI/, QNLI/, RTE/, WNLI/, "
                         "diagnostic/); default: the hub's glue dataset")
    gl.add_argument("--tasks", default="all", help="all (default) or a comma-separated list, e.g. cola,sst2,mrpc")
    gl.add_argument("--general-student", dest="general_student", default=None,
                    help="a general-distilled student to start every task from (LRC-BERT); default: random init "
                         "(LRC-BERT1)")
    gl.add_argument("--teachers", default=None, help="reuse DIR/<task>/model as the teacher where it exists")
    gl.add_argument("--config", default="glue", metavar="YAML",
                    help="settings for every task and stage, per stage (finetune:, distill:) and per task (tasks:); "
                         "default: the shipped `glue` (the paper's settings)")
    gl.add_argument("--predict-test", dest="predict_test", action="store_true",
                    help="also predict the unlabelled test sets: glue_submission/*.tsv and glue_submission.zip")
    gl.add_argument("--seeds", type=int, default=1, help="students per task, seeds seed..seed+N-1 (mean ± std)")
    gl.add_argument("--fail-fast", dest="fail_fast", action="store_true",
                    help="stop at the first failed task (default: report it and go on)")
    gl.add_argument("--latency-repeats", dest="latency_repeats", type=int, default=20,
                    help="interleaved timings per model for the latency columns (default 20)")
    _add_settings(gl, {k: v for k, v in {**COMMON_HELP, **DISTILL_HELP}.items()
                       if k not in ("task", "data_dir", "config", "student_init")})

    gd = sub.add_parser("general-distill", help="LRC-BERT's pre-training stage: distill a general student from a "
                        "general encoder on unlabeled text (-> OUTPUT/student, with its projections)")
    gd.add_argument("--teacher", required=True, help="a general (not fine-tuned) encoder: local path or hub name")
    gd.add_argument("--output", required=True, help="run folder: metrics.jsonl, checkpoints/, student/, corpus_cache/")
    gd.add_argument("--corpus", nargs="+", default=None, metavar="PATH",
                    help="plain-text files or folders of .txt files: one document per line, or documents separated "
                         "by blank lines")
    gd.add_argument("--dataset-streaming", dest="dataset_streaming", action="store_true", default=None,
                    help="stream --dataset (for corpora that do not fit in memory)")
    gd.add_argument("--resume", action="store_true", help="continue exactly from the latest checkpoint in OUTPUT")
    _add_settings(gd, {**{k: COMMON_HELP[k] for k in GENERAL_FROM}, **{k: DISTILL_HELP[k] for k in GENERAL_DISTILL_FROM},
                       **GENERAL_HELP, "max_length": "tokens per packed sequence, [CLS] and [SEP] included (default "
                                                     "128)"})
    _add_layer_map(gd)
    _add_switches(gd, "overwrite_output", "map_embeddings", "cuda_graphs", "global_negatives", "no_tensorboard")

    au = sub.add_parser("augment", help="TinyBERT's data augmentation: N variants of every training sentence from "
                        "a masked LM's predictions, written in the task's TSV layout")
    au.add_argument("--task", required=True, help=COMMON_HELP["task"])
    au.add_argument("--data-dir", dest="data_dir", required=True, help="the task's TSV folder (train.tsv, dev.tsv, ...)")
    au.add_argument("--output", required=True, help="folder for the augmented train.tsv and copies of the other files")
    au.add_argument("--mlm", required=True, help="any AutoModelForMaskedLM: local path or hub name")
    au.add_argument("--n-aug", dest="n_aug", type=int, default=20, help="variants per sentence (default 20)")
    au.add_argument("--p", type=float, default=0.4, help="chance that a single-piece word is replaced (default 0.4)")
    au.add_argument("--top-k", dest="top_k", type=int, default=15, help="candidates per word (default 15)")
    au.add_argument("--seed", type=int, default=42, help="the variants' random seed (default 42)")
    au.add_argument("--batch-size", dest="batch_size", type=int, default=64, help="masked-LM batch (default 64)")
    au.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda, cuda:N")

    ev = sub.add_parser("evaluate", help="evaluate a saved model; prints one JSON line of metrics")
    ev.add_argument("--model", required=True, help="model folder (finetune's model/, distill's student/)")
    ev.add_argument("--split", choices=["dev", "test"], default="dev",
                    help="dev (MNLI: matched and mismatched) or test (SNLI only: GLUE test labels are not public)")
    ev.add_argument("--assume-label-order", dest="assume_label_order", action="store_true", default=None,
                    help="accept a model whose labels are the generic LABEL_i")
    _add_settings(ev, {k: COMMON_HELP[k] for k in ("task", "data_dir", "config", "max_length", "eval_batch_size",
                                                   "device", "limit_eval", "cache_dir")})
    return parser


# On/off flags shared by the training commands: name -> (flag, dest, action, help).
SWITCHES = {
    "overwrite_output": ("--overwrite-output", "overwrite_output", "store_true",
                         "OUTPUT already holds a run: delete its checkpoints, metrics, TensorBoard logs and export, "
                         "and start over (without this, such a folder is refused)"),
    "cuda_graphs": ("--cuda-graphs", "cuda_graphs", "store_true", CUDA_GRAPHS_HELP),
    "group_by_length": ("--group-by-length", "group_by_length", "store_true",
                        "with --max-length 0 (dynamic padding): batches of rows of similar length, so less padding "
                        "(the order stays random and resumable)"),
    "no_tensorboard": ("--no-tensorboard", "tensorboard", "store_false", "do not write TensorBoard scalars"),
    "compile_student": ("--compile-student", "compile_student", "store_true",
                        "torch.compile the student's encoder (forward and backward)"),
    "global_negatives": ("--global-negatives", "global_negatives", "store_true",
                         "under torchrun: COS-NCE negatives from the global batch (teacher rows all-gathered)"),
    "reinit_projections": ("--reinit-projections", "reinit_projections", "store_true",
                           "with --student-init: do not load the projections saved beside it"),
    "map_embeddings": ("--map-embeddings", "map_embeddings", "store_true",
                       "also map the embedding outputs (layer 0 -> 0) with their own projection"),
}


def _add_switches(parser: argparse.ArgumentParser, *names: str) -> None:
    for name in names:
        flag, dest, action, text = SWITCHES[name]
        parser.add_argument(flag, dest=dest, action=action, default=None, help=text)


def _add_layer_map(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layer-map", dest="layer_map", type=lambda v: [int(x) for x in v.split(",")], default=None,
                        help="teacher layer (1-based) per student layer, comma separated (default: uniform ceil(i N / M))")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {k: v for k, v in vars(args).items() if k not in ("command", "config", "resume", "split")}
    cfg = build_config(args.config, **values)
    if cfg.max_length == 0:  # the flag's spelling of "dynamic padding"
        cfg.max_length = None
    return cfg


def main(argv: Optional[list[str]] = None) -> int:
    from .runs import run_cache_teacher, run_evaluate, run_training
    from .trainer import TrainingDiverged

    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "augment":
            from .augment import AugmentConfig, augment

            keys = ("task", "data_dir", "output", "mlm", "n_aug", "p", "top_k", "seed", "batch_size", "device")
            print(json.dumps({"augmented": str(augment(AugmentConfig(**{k: getattr(args, k) for k in keys})))}))
            return 0
        if args.command == "glue":
            from .glue import run_glue

            names = (set(COMMON_HELP) | set(DISTILL_HELP)) - {"task", "data_dir", "config", "student_init"}
            return run_glue(args, {k: v for k, v in vars(args).items() if k in names and v is not None})
        cfg = config_from_args(args)
        if args.command == "evaluate":
            print(json.dumps({"task": cfg.task, "model": cfg.model, **run_evaluate(cfg, args.split)}))
        elif args.command == "general-distill":
            from .general import run_general_distill

            final = run_general_distill(cfg, resume=args.resume)
            if final:
                print(json.dumps({"output": cfg.output, **final}))
        elif args.command == "cache-teacher":
            print(json.dumps({"task": cfg.task, "teacher_cache": str(run_cache_teacher(cfg))}))
        else:
            final = run_training(cfg, args.command, resume=getattr(args, "resume", False))
            if final:  # rank 0
                print(json.dumps({"task": cfg.task, "output": cfg.output, **final}))
    except TrainingDiverged as exc:
        print(f"lrc-bert {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, FileNotFoundError, OSError, MemoryError) as exc:
        print(f"lrc-bert {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"lrc-bert {args.command}: error: {exc}; install the trainer's dependencies with "
              "pip install 'lrc-kernels[train]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
