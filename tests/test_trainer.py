"""The LRC-BERT trainer (python/lrc_bert) on tiny random models and a 192-pair SNLI sample."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("datasets")
pytest.importorskip("sklearn")

from lrc_bert import cli, runs  # noqa: E402
from lrc_bert.config import TrainConfig, build_config, load_yaml, validate  # noqa: E402
from lrc_bert.distill import DistillMethod  # noqa: E402
from lrc_bert.modeling import uniform_layer_map  # noqa: E402
from lrc_bert.metrics import compute_metrics  # noqa: E402
from lrc_bert.runtime import Runtime  # noqa: E402
from lrc_bert.tasks import get_task, label_alignment  # noqa: E402
from trainer_fixtures import SNLI_LABELS, SNLI_SAMPLE, build_teacher, tiny_distill_settings  # noqa: E402


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return build_teacher(tmp_path_factory.mktemp("teacher"))


def records(output: Path, kind: str) -> list[dict]:
    lines = (output / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def distill(teacher, output, on_step=None, resume=False, **overrides) -> dict:
    cfg = build_config(None, **tiny_distill_settings(teacher, output, **overrides))
    return runs.run_training(cfg, "distill", resume=resume, on_step=on_step)


def make_method(teacher, tmp_path, **overrides):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg = build_config(None, **tiny_distill_settings(teacher, tmp_path, **overrides))
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    method = DistillMethod(cfg, get_task("snli"), AutoModelForSequenceClassification.from_pretrained(teacher),
                           tokenizer, Runtime(torch.device("cpu")))
    method.total_steps = 10
    sentences = ["a man is riding a horse .", "two dogs play in the snow .", "a woman reads a book .",
                 "the kids are at school ."]
    batch = dict(tokenizer(sentences, ["a person rides .", "dogs sleep .", "she reads .", "kids learn ."],
                           padding="max_length", max_length=16, return_tensors="pt"))
    batch["labels"] = torch.tensor([0, 2, 0, 1])
    return method, batch


# ------------------------------------------------------------------ training behaviour


def test_loss_decreases_and_projections_and_student_train(teacher, tmp_path):
    out = tmp_path / "run"
    distill(teacher, out, max_steps=30, stage1_fraction=1.0, perturb_eps=0.0)
    cos = [r["cos_nce"] for r in records(out, "train")]
    assert len(cos) == 30
    assert sum(cos[-5:]) / 5 < sum(cos[:5]) / 5 - 0.05, cos


def test_projections_get_gradients_and_change(teacher, tmp_path):
    method, batch = make_method(teacher, tmp_path, perturb_eps=0.0)
    before = [p.detach().clone() for p in method.projections.parameters()]
    method.train_step(batch, 0)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.projections.parameters())
    opt = torch.optim.AdamW(method.param_groups(0.0), lr=1e-2)
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, method.projections.parameters()))
    assert method.layer_map == uniform_layer_map(2, 2) == [1, 2]


def test_perturbation_changes_the_update(teacher, tmp_path):
    grads = {}
    for name, eps, mode in [("clean", 0.0, "replace"), ("replace", 1.0, "replace"), ("add", 1.0, "add")]:
        torch.manual_seed(0)
        method, batch = make_method(teacher, tmp_path, perturb_eps=eps, perturb_mode=mode)
        torch.manual_seed(1)  # same dropout draws for the first forward of every variant
        parts = method.train_step(batch, 0)
        grads[name] = torch.cat([p.grad.flatten() for p in method.student.parameters() if p.grad is not None])
        if eps:
            assert "loss_perturbed" in parts and math.isfinite(parts["loss_perturbed"])
    assert not torch.allclose(grads["clean"], grads["replace"])
    assert not torch.allclose(grads["replace"], grads["add"])


def test_stage_switch_at_the_right_step(teacher, tmp_path):
    out = tmp_path / "run"
    distill(teacher, out, max_steps=10, stage1_fraction=0.8)
    stages = {r["step"]: r["stage"] for r in records(out, "train")}
    assert [stages[s] for s in range(1, 11)] == [1] * 8 + [2] * 2
    train = {r["step"]: r for r in records(out, "train")}
    assert "hard" not in train[8] and "soft" not in train[8]
    assert train[9]["hard"] > 0 and train[9]["soft"] >= 0
    events = [r for r in records(out, "event") if "stage 2 begins" in str(r.get("event"))]
    assert [e["step"] for e in events] == [9]


def test_sampled_negatives(teacher, tmp_path):
    method, batch = make_method(teacher, tmp_path, num_negatives=2, perturb_eps=0.0)
    index = method._negatives(4, None, batch["labels"])
    assert index.shape == (4, 2)
    assert all(b not in index[b].tolist() for b in range(4))
    parts = method.train_step(batch, 0)
    assert math.isfinite(parts["cos_nce"])


# ------------------------------------------------------------------ checkpoints, resume, export


def test_resume_matches_an_uninterrupted_run(teacher, tmp_path):
    settings = dict(max_steps=12, save_steps=4, eval_steps=6, stage1_fraction=0.5, perturb_eps=1.0)
    full = distill(teacher, tmp_path / "full", **settings)

    def interrupt(step):
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(teacher, tmp_path / "resumed", on_step=interrupt, **settings)
    ckpts = sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").glob("step-*"))
    assert ckpts[-1] == "step-00000007"  # saved on interrupt, nothing lost
    resumed = distill(teacher, tmp_path / "resumed", resume=True, **settings)
    assert resumed == full
    from safetensors.torch import load_file

    a = load_file(tmp_path / "full" / "checkpoints" / "step-00000012" / "student.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoints" / "step-00000012" / "student.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(list((tmp_path / "full" / "checkpoints").glob("step-*"))) == 2  # keep_checkpoints


def test_resume_refuses_changed_settings(teacher, tmp_path):
    distill(teacher, tmp_path / "run", max_steps=4, save_steps=2)
    with pytest.raises(ValueError, match="learning_rate"):
        distill(teacher, tmp_path / "run", max_steps=4, save_steps=2, resume=True, learning_rate=5e-4)


def test_export_loads_without_this_package(teacher, tmp_path):
    out = tmp_path / "run"
    distill(teacher, out, max_steps=4)
    student = out / "student"
    assert (student / "config.json").is_file() and (student / "tokenizer_config.json").is_file()
    code = ("import sys, json; sys.modules['lrc_bert'] = None; sys.modules['lrc_kernels'] = None\n"
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
            f"m = AutoModelForSequenceClassification.from_pretrained({str(student)!r})\n"
            f"t = AutoTokenizer.from_pretrained({str(student)!r})\n"
            "x = t(['a dog runs .'], ['an animal moves .'], return_tensors='pt')\n"
            "print(json.dumps({'labels': m.config.id2label, 'shape': list(m(**x).logits.shape),"
            " 'layers': m.config.num_hidden_layers,"
            " 'keys': [k for k in m.state_dict() if 'projection' in k]}))")
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["shape"] == [1, 3] and info["layers"] == 2 and info["keys"] == []
    assert list(info["labels"].values()) == list(SNLI_LABELS)


def test_checkpoint_write_is_atomic(tmp_path):
    from lrc_bert.checkpoint import atomic_directory, list_checkpoints

    final = tmp_path / "checkpoints" / "step-00000001"
    with pytest.raises(RuntimeError):
        with atomic_directory(final) as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    assert not final.exists() and list_checkpoints(tmp_path / "checkpoints") == []
    assert list((tmp_path / "checkpoints").iterdir()) == []


# ------------------------------------------------------------------ labels and metrics


def test_label_mismatch_errors(tmp_path):
    task = get_task("snli")
    with pytest.raises(ValueError, match="label mismatch"):
        label_alignment(task, {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"})
    with pytest.raises(ValueError, match="label mismatch"):
        label_alignment(task, {0: "negative", 1: "positive"})
    with pytest.raises(ValueError, match="label mismatch"):
        label_alignment(task, {0: "entailment", 1: "neutral", 2: "not_entailment"})
    # Same names in another order: aligned by name, never a silent permutation.
    assert label_alignment(task, {0: "contradiction", 1: "entailment", 2: "neutral"}) == [1, 2, 0]
    assert label_alignment(task, {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}, assume_label_order=True) == [0, 1, 2]


def test_distill_with_a_mismatched_teacher_fails_before_training(tmp_path):
    teacher = build_teacher(tmp_path / "t", id2label={0: "negative", 1: "positive"})
    with pytest.raises(ValueError, match="label mismatch"):
        distill(teacher, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_permuted_teacher_labels_are_realigned(tmp_path):
    order = {0: "contradiction", 1: "entailment", 2: "neutral"}
    teacher = build_teacher(tmp_path / "t", id2label=order)
    method, batch = make_method(teacher, tmp_path, perturb_eps=0.0, stage1_fraction=0.0)
    with torch.no_grad():
        t_logits = method.teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert method.alignment.tolist() == [1, 2, 0]
    aligned = t_logits[:, method.alignment]
    assert torch.equal(aligned[:, 0], t_logits[:, 1])  # dataset "entailment" is the teacher's output 1


def test_metrics_match_hand_computed_values():
    preds, labels = [1, 0, 1, 1, 0, 1], [1, 0, 0, 1, 1, 1]
    tp, fp, fn, tn = 3, 1, 1, 1
    m = compute_metrics(get_task("mrpc"), preds, labels)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert compute_metrics(get_task("cola"), preds, labels)["matthews_corrcoef"] == pytest.approx(mcc)
    x, y = [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 5.0]
    mx, my = sum(x) / 4, sum(y) / 4
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    pearson = cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))
    ranks_y = [1, 3, 2, 4]
    d2 = sum((i + 1 - r) ** 2 for i, r in enumerate(ranks_y))
    m = compute_metrics(get_task("stsb"), x, y)
    assert m["pearson"] == pytest.approx(pearson)
    assert m["spearman"] == pytest.approx(1 - 6 * d2 / (4 * (16 - 1)))
    assert compute_metrics(get_task("snli"), [0, 1, 2], [0, 2, 2]) == {"accuracy": pytest.approx(2 / 3)}


# ------------------------------------------------------------------ config validation


@pytest.mark.parametrize("overrides, error, match", [
    ({"task": "imdb"}, ValueError, "task must be one of"),
    ({"perturb_eps": -0.1}, ValueError, "perturb_eps must be >= 0"),
    ({"alpha": 0.0, "beta": 0.0, "gamma": 0.0}, ValueError, "all loss weights are zero"),
    ({"data_dir": "/nonexistent/glue"}, FileNotFoundError, "not a directory"),
    ({"batch_size": 1}, ValueError, "batch_size must be >= 2"),
    ({"stage1_fraction": 1.5}, ValueError, "stage1_fraction"),
    ({"representation": "mean"}, ValueError, "representation must be one of"),
    ({"loss_backend": "fast"}, ValueError, "loss_backend must be one of"),
    ({"learning_rate": "1e-4"}, TypeError, "learning_rate must be a number"),
    ({"teacher": "./no/such/teacher"}, FileNotFoundError, "does not exist"),
])
def test_bad_config_fails_before_training(teacher, tmp_path, overrides, error, match):
    settings = tiny_distill_settings(teacher, tmp_path / "run")
    settings.update(overrides)
    cfg = build_config(None, **settings)
    with pytest.raises(error, match=match):
        runs.run_training(cfg, "distill")
    assert not (tmp_path / "run").exists()


def test_missing_data_file_fails_before_training(teacher, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.tsv").write_text((SNLI_SAMPLE / "train.tsv").read_text())
    cfg = build_config(None, **tiny_distill_settings(teacher, tmp_path / "run", data_dir=str(data)))
    with pytest.raises(FileNotFoundError, match="dev file"):
        validate(cfg, "distill")


def test_unknown_yaml_setting_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("batch_size: 8\nlearnig_rate: 1e-4\n")
    with pytest.raises(ValueError, match="learnig_rate"):
        build_config(str(path))


def test_shipped_config_is_the_papers_and_the_defaults():
    from lrc_bert.losses import build_losses

    values = load_yaml("lrc_bert")  # the one copy, shipped in the package
    defaults, shipped = TrainConfig(), build_config("lrc_bert")
    assert all(getattr(defaults, k) == v for k, v in values.items() if k != "losses"), values
    assert (values["batch_size"], values["stage1_fraction"]) == (16, 0.8)
    paper = [{"cos_nce": 1.0, "soft": 0.0, "hard": 0.0}, {"cos_nce": 1.0, "soft": 1.0, "hard": 3.0}]
    assert [s["weights"] for s in defaults.stage_plan()] == [s["weights"] for s in shipped.stage_plan()] == paper
    names = ["cos_nce", "hard", "soft"]
    assert build_losses(defaults, names) == build_losses(shipped, names)
    assert build_losses(shipped, ["soft"])["soft"].temperature == 1.1


# ------------------------------------------------------------------ data layouts, finetune, evaluate, CLI


def test_glue_tsv_layouts(tmp_path):
    from lrc_bert.tasks import load_split

    cola = tmp_path / "cola"
    cola.mkdir()
    (cola / "train.tsv").write_text("gj04\t1\t\tThe boy ran.\ngj04\t0\t*\tRan boy the.\n")
    ds = load_split(get_task("cola"), "train", cola)
    assert ds["text_a"] == ["The boy ran.", "Ran boy the."] and ds["label"] == [1, 0]
    mrpc = tmp_path / "mrpc"
    mrpc.mkdir()
    (mrpc / "train.tsv").write_text("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tA \"quoted\" one.\tB.\n")
    ds = load_split(get_task("mrpc"), "train", mrpc)
    assert ds[0] == {"text_a": 'A "quoted" one.', "text_b": "B.", "label": 1}
    stsb = tmp_path / "stsb"
    stsb.mkdir()
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    (stsb / "train.tsv").write_text(header + "0\tmain\tf\t2012\t1\tnone\tnone\tA cat.\tA kitten.\t4.2\n")
    assert load_split(get_task("stsb"), "train", stsb)["label"] == [pytest.approx(4.2)]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.tsv").write_text("pairID\tsentence1\tsentence2\tgold_label\n1\ta\tb\tmaybe\n")
    with pytest.raises(ValueError, match="line 2: unknown snli label .maybe."):
        load_split(get_task("snli"), "train", bad)


def test_mnli_reports_matched_and_mismatched_separately(teacher, tmp_path):
    data = tmp_path / "mnli"
    data.mkdir()
    rows = (SNLI_SAMPLE / "dev.tsv").read_text().splitlines()
    for name, part in (("train.tsv", rows), ("dev_matched.tsv", rows[:20]), ("dev_mismatched.tsv", [rows[0]] + rows[20:])):
        (data / name).write_text("\n".join(part) + "\n")
    final = distill(teacher, tmp_path / "run", task="mnli", data_dir=str(data), max_steps=2)
    assert {"dev_matched/accuracy", "dev_mismatched/accuracy"} <= set(final)


def test_finetune_then_evaluate_cli(teacher, tmp_path, capsys):
    out = tmp_path / "ft"
    code = cli.main(["finetune", "--task", "snli", "--model", str(teacher), "--output", str(out),
                     "--data-dir", str(SNLI_SAMPLE), "--max-steps", "3", "--batch-size", "8", "--max-length", "32",
                     "--eval-steps", "2", "--no-tensorboard"])
    assert code == 0
    assert (out / "model" / "config.json").is_file() and (out / "model" / "tokenizer_config.json").is_file()
    capsys.readouterr()
    code = cli.main(["evaluate", "--task", "snli", "--model", str(out / "model"), "--data-dir", str(SNLI_SAMPLE),
                     "--split", "test", "--max-length", "32"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= result["test/accuracy"] <= 1.0


def test_cli_reports_bad_input_without_a_traceback(capsys):
    assert cli.main(["distill", "--task", "snli", "--teacher", "./missing", "--output", "/tmp/x"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_tensorboard_scalars(teacher, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    distill(teacher, out, max_steps=2, tensorboard=True)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_group_by_length_pads_less_and_keeps_the_order_a_function_of_seed_and_epoch(teacher, tmp_path):
    from transformers import AutoTokenizer

    from lrc_bert.data import Collator, tokenize_split
    from lrc_bert.trainer import Trainer

    def trainer(group):
        cfg = build_config(None, **tiny_distill_settings(teacher, tmp_path / str(group), group_by_length=group,
                                                         batch_size=8))
        cfg.max_length = None
        method, _ = make_method(teacher, tmp_path / f"m{group}", group_by_length=group)
        tokenizer = AutoTokenizer.from_pretrained(teacher)
        train = tokenize_split(get_task("snli"), "train", tokenizer, cfg)
        return Trainer(cfg, method, train, {}, Collator(tokenizer, False), get_task("snli"),
                       Runtime(torch.device("cpu")), "dev"), train

    def padding(t, train, epoch):
        order, lengths = t.epoch_order(epoch), [len(x) for x in train["input_ids"]]
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b)
                   for b in (c.tolist() for c in order.split(8))
                   if len(b) == 8)

    grouped, train = trainer(True)
    plain, _ = trainer(False)
    assert sorted(grouped.epoch_order(0).tolist()) == list(range(len(train)))  # a permutation
    assert torch.equal(grouped.epoch_order(1), grouped.epoch_order(1))  # a function of (seed, epoch)
    assert not torch.equal(grouped.epoch_order(0), grouped.epoch_order(1))
    assert padding(grouped, train, 0) < 0.5 * padding(plain, train, 0)
