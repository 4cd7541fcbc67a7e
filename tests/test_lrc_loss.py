"""LRC-BERT for other trainers: LRCDistillationLoss, EmbeddingPerturbation, label-aware
negatives, and the Hugging Face Trainer example, offline on tiny models."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("datasets")

from lrc_bert import EmbeddingPerturbation, LRCDistillationLoss, runs  # noqa: E402
from lrc_bert.config import build_config, validate  # noqa: E402
from lrc_bert.negatives import sample_other_label  # noqa: E402
from trainer_fixtures import SNLI_SAMPLE, build_teacher, tiny_distill_settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return build_teacher(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="module")
def models(teacher):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, \
        BertForSequenceClassification

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    t = AutoModelForSequenceClassification.from_pretrained(teacher).eval()
    s = BertForSequenceClassification(BertConfig(vocab_size=t.config.vocab_size, hidden_size=16, num_hidden_layers=2,
                                                 num_attention_heads=2, intermediate_size=32, num_labels=3,
                                                 max_position_embeddings=64))
    batch = dict(tokenizer(["a man rides a horse .", "two dogs play .", "a woman reads .", "kids are at school ."],
                           ["a person rides .", "dogs sleep .", "she reads .", "kids learn ."], padding=True,
                           return_tensors="pt"))
    return t, s, batch, torch.tensor([0, 2, 0, 1])


def outputs(models):
    t, s, batch, labels = models
    with torch.no_grad():
        t_out = t(**batch, output_hidden_states=True)
    return t_out, s(**batch, output_hidden_states=True), batch["attention_mask"], labels


def test_the_loss_follows_the_papers_stages_and_reports_every_part_per_layer(models):
    t, s, batch, labels = models
    criterion = LRCDistillationLoss(t.config, s.config, total_steps=10)
    assert criterion.layer_map == [1, 2] and len(list(criterion.parameters())) == 4  # two Linear projections
    t_out, s_out, mask, labels = outputs(models)
    first = criterion(s_out, t_out, mask, labels, step=0)
    assert first.stage == 1 and set(first.parts) == {"cos_nce", "cos_nce/layer1", "cos_nce/layer2"}
    assert first.loss.item() == pytest.approx(first.parts["cos_nce"].item())
    assert first.parts["cos_nce"].item() == pytest.approx(
        first.parts["cos_nce/layer1"].item() + first.parts["cos_nce/layer2"].item())
    t_out, s_out, mask, labels = outputs(models)
    last = criterion(s_out, t_out, mask, labels, step=9)
    assert last.stage == 2 and {"soft", "hard"} <= set(last.parts)
    p = last.parts
    assert last.loss.item() == pytest.approx((p["cos_nce"] + p["soft"] + 3 * p["hard"]).item(), rel=1e-6)
    last.loss.backward()
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in criterion.projections.parameters())
    with pytest.raises(ValueError, match="step="):
        LRCDistillationLoss(t.config, s.config)(s_out, t_out, mask, labels)


def test_the_module_computes_what_the_trainer_computes(teacher, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lrc_bert.distill import DistillMethod
    from lrc_bert.runtime import Runtime
    from lrc_bert.tasks import get_task

    cfg = build_config(None, **tiny_distill_settings(teacher, tmp_path, perturb_eps=0.0))
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    method = DistillMethod(cfg, get_task("snli"), AutoModelForSequenceClassification.from_pretrained(teacher),
                           tokenizer, Runtime(torch.device("cpu")))
    method.total_steps = 10
    batch = dict(tokenizer(["a man rides .", "dogs play .", "she reads ."], ["a person .", "dogs .", "reads ."],
                           padding="max_length", max_length=16, return_tensors="pt"))
    batch["labels"] = torch.tensor([0, 1, 2])
    method.student.eval()  # no dropout: both computations see the same network
    inputs, info = method.prepare_step(batch, 9)
    expected = method.compute_step(inputs, info)
    with torch.no_grad():
        t_out = method.teacher(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True)
    s_out = method.student(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True)
    got = method.criterion(s_out, t_out, batch["attention_mask"], batch["labels"], step=9)
    for name in ("cos_nce", "cos_nce/layer1", "soft", "hard"):
        assert got.parts[name].item() == pytest.approx(expected[name].item(), rel=1e-5), name


def test_the_perturbed_loss_is_higher_to_first_order(models):
    t, s, batch, labels = models
    criterion = LRCDistillationLoss(t.config, s.config, losses={"hard": {"weight": 1.0}}, total_steps=10)
    with torch.no_grad():
        t_out = t(**batch, output_hidden_states=True)
    perturbation = EmbeddingPerturbation(s.base_model.embeddings)
    s.eval()  # no dropout: the two passes differ only by the perturbation

    def loss():
        return criterion(s(**batch, output_hidden_states=True), t_out, batch["attention_mask"], labels, step=0).loss

    clean, perturbed = perturbation.losses(loss, eps=1e-2)
    assert perturbed.item() > clean.item()  # e moved along dL/de
    assert perturbation.delta is None  # the hook is idle again
    assert loss().item() == pytest.approx(clean.item(), rel=1e-6)
    perturbed.backward()
    assert all(p.grad is not None for p in s.bert.embeddings.parameters() if p.requires_grad)
    s.train()


def test_other_label_negatives_follow_the_documented_rule():
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 0, 0, 1, 2, 2, 1, 0])
    index, fallback = sample_other_label(labels, 3, generator)
    assert index.shape == (8, 3) and fallback == 0
    assert all(labels[j] != labels[b] for b in range(8) for j in index[b])
    # fewer other-class rows than K: every one of them is used, the rest repeat them
    index, _ = sample_other_label(torch.tensor([0, 0, 0, 1]), 3, generator)
    assert index[3].tolist() and set(index[3].tolist()) == {0, 1, 2}
    assert index[:3].eq(3).all()  # rows of class 0 have one other-class row: it fills all K slots
    # a batch of one class: any other row, and the count says so
    index, fallback = sample_other_label(torch.tensor([2, 2, 2]), 2, generator)
    assert fallback == 3 and all(b not in index[b].tolist() for b in range(3))


def test_distill_with_other_label_negatives(teacher, tmp_path):
    out = tmp_path / "run"
    runs.run_training(build_config(None, **tiny_distill_settings(teacher, out, max_steps=4, negatives="other-label",
                                                                 num_negatives=3, perturb_eps=0.0)), "distill")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["cos_nce"] < 8 for r in rows if r["type"] == "train")
    bad = build_config(None, **tiny_distill_settings(teacher, tmp_path / "bad", negatives="other-label",
                                                     global_negatives=True))
    with pytest.raises(ValueError, match="other-label"):
        validate(bad, "distill")


def test_the_hf_trainer_example_trains_the_student_and_the_projections(teacher, tmp_path):
    pytest.importorskip("accelerate")
    spec = importlib.util.spec_from_file_location("hf_trainer", ROOT / "examples" / "hf_trainer.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "hf"
    trainer = example.main(["--teacher", str(teacher), "--data-dir", str(SNLI_SAMPLE), "--output", str(out),
                            "--max-steps", "6", "--batch-size", "8", "--max-length", "32", "--student-layers", "2",
                            "--student-hidden", "16", "--student-heads", "2", "--student-intermediate", "32",
                            "--learning-rate", "1e-3"])
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and all(0 < v < 20 for v in losses)
    criterion = trainer.model.criterion
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in optimised for p in criterion.projections.parameters())
    from transformers import AutoModelForSequenceClassification

    student = AutoModelForSequenceClassification.from_pretrained(out / "student")
    assert student.config.num_hidden_layers == 2
