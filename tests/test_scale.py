"""Scaling the trainer: DDP (gloo, 2 CPU processes) with global negatives, gradient
accumulation, mixed precision, the teacher cache and memory-bank negatives."""

from __future__ import annotations

import faulthandler
import gc
import json
import os
import shutil
import socket
import time
import weakref
from pathlib import Path

import pytest
import torch

pytest.importorskip("datasets")
pytest.importorskip("sklearn")

import torch.multiprocessing as mp  # noqa: E402

from lrc_bert import runs  # noqa: E402
from lrc_bert.config import build_config  # noqa: E402
from lrc_bert.distill import DistillMethod  # noqa: E402
from lrc_bert.runtime import Runtime, dist_timeout, run_with_runtime  # noqa: E402
from lrc_bert.tasks import get_task  # noqa: E402
from lrc_bert.teacher_cache import TeacherCache  # noqa: E402
from trainer_fixtures import build_teacher, tiny_distill_settings  # noqa: E402

import lrc_kernels as lk  # noqa: E402


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return build_teacher(tmp_path_factory.mktemp("teacher"), layers=4)


@pytest.fixture(scope="module")
def student_config(teacher, tmp_path_factory):
    """A 2 x 16 student without dropout: runs on different process counts then compute the same function."""
    from transformers import AutoConfig

    path = tmp_path_factory.mktemp("student") / "config.json"
    path.write_text(json.dumps({"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                                "intermediate_size": 32, "hidden_dropout_prob": 0.0,
                                "attention_probs_dropout_prob": 0.0, "classifier_dropout": 0.0,
                                "vocab_size": AutoConfig.from_pretrained(teacher).vocab_size}))
    return path


def _settings(teacher, output, student_config, **overrides):
    return tiny_distill_settings(teacher, output, student_config=str(student_config), **overrides)


def _train_records(out: Path) -> list:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == "train"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch(teacher, rows: int, seed: int = 0) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teacher)
    words = ["a man rides a horse", "two dogs play", "a woman reads", "kids at school", "the sun is up",
             "a cat sleeps on the mat", "people walk", "a boy eats"]
    g = torch.Generator().manual_seed(seed)
    a = [words[i] for i in torch.randint(0, len(words), (rows,), generator=g).tolist()]
    b = [words[i] for i in torch.randint(0, len(words), (rows,), generator=g).tolist()]
    batch = dict(tokenizer(a, b, padding="max_length", max_length=16, return_tensors="pt"))
    batch["labels"] = torch.randint(0, 3, (rows,), generator=g)
    batch["index"] = torch.arange(rows)
    return batch


def _method(settings: dict, runtime: Runtime, cache=None) -> DistillMethod:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg = build_config(None, **settings)
    torch.manual_seed(cfg.seed)
    teacher = AutoModelForSequenceClassification.from_pretrained(cfg.teacher)
    method = DistillMethod(cfg, get_task("snli"), teacher, AutoTokenizer.from_pretrained(cfg.teacher), runtime, cache)
    method.total_steps = 10
    return method


def _grads(method) -> dict:
    return {k: p.grad.detach().clone() for k, p in method.trained.named_parameters() if p.grad is not None}


def assert_close_tensors(got: dict, expected: dict, rtol: float) -> None:
    """Each tensor within rtol of its own norm; tensors that are zero in exact arithmetic
    (e.g. attention key-bias gradients) within rtol of 1% of the norm of them all."""
    assert set(got) == set(expected)
    total = torch.cat([g.flatten() for g in expected.values()]).norm()
    for name, g in expected.items():
        err = (got[name] - g).norm()
        assert torch.isfinite(err) and err <= rtol * (g.norm() + 1e-2 * total), (name, float(err), float(g.norm()))


SPAWN_DEADLINE_S = 300  # the whole spawned run; a healthy one takes under 30 s here


def _spawn(fn, world: int, *args, deadline_s: float = SPAWN_DEADLINE_S):
    """Run ``fn`` on ``world`` ranks; a rank that dies or a run that hangs fails the test
    within ``deadline_s`` instead of stalling CI in a collective."""
    port = _free_port()
    context = mp.start_processes(fn, args=(world, port, *args), nprocs=world, start_method="spawn", join=False)
    deadline = time.monotonic() + deadline_s
    while not context.join(timeout=5):  # raises ProcessRaisedException / ProcessExitedException
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{fn.__name__}: {world} ranks still running after {deadline_s} s "
                        f"(exit codes {[p.exitcode for p in context.processes]})")


def _as_rank(rank: int, world: int, port: int, deadline_s: float = SPAWN_DEADLINE_S) -> None:
    # A rank still alive near the deadline prints every thread's stack and exits, so a hang
    # fails with where it stood.
    faulthandler.dump_traceback_later(deadline_s - 30, exit=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LRC_BERT_DIST_TIMEOUT_S="120")


def _global_negatives_worker(rank, world, port, settings, batch, out):
    _as_rank(rank, world, port)

    def step(runtime):
        method = _method(settings, runtime)
        share = batch["input_ids"].shape[0] // world
        local = {k: v[rank * share:(rank + 1) * share] for k, v in batch.items()}
        parts = method.train_step(local, 9)  # stage 2: COS-NCE + soft + hard, with perturbation
        if rank == 0:
            torch.save({"parts": parts, "grads": _grads(method)}, out)
        runtime.barrier()

    run_with_runtime("cpu", "fp32", step)


@pytest.mark.parametrize("num_negatives", [None, 5])
def test_two_processes_with_global_negatives_equal_one_with_the_whole_batch(teacher, student_config, tmp_path,
                                                                            num_negatives):
    settings = _settings(teacher, tmp_path / "run", student_config, global_negatives=True, perturb_eps=1.0,
                         num_negatives=num_negatives)
    batch = _batch(teacher, 8)
    single = _method(settings, Runtime(torch.device("cpu")))
    parts = single.train_step(batch, 9)
    expected = _grads(single)
    _spawn(_global_negatives_worker, 2, settings, batch, tmp_path / "rank0.pt")
    got = torch.load(tmp_path / "rank0.pt", weights_only=True)
    assert got["parts"]["stage"] == 2
    # Rank 0's loss covers its rows only: the DDP mean over ranks is the one-process loss,
    # which the gradients (averaged by DDP) show exactly.
    assert_close_tensors(got["grads"], expected, 1e-4)
    assert torch.isfinite(torch.tensor(parts["loss"]))


def _distill_worker(rank, world, port, settings):
    _as_rank(rank, world, port)
    destroy = torch.distributed.destroy_process_group

    def count_live_ddp_modules_then_destroy():
        from torch.nn.parallel import DistributedDataParallel

        live = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
        (Path(settings["output"]) / f"ddp-modules-at-destroy-rank{rank}").write_text(str(live))
        destroy()

    torch.distributed.destroy_process_group = count_live_ddp_modules_then_destroy
    runs.run_training(build_config(None, **settings), "distill")


def test_ddp_run_resumes_on_another_world_size_and_matches_one_process(teacher, student_config, tmp_path):
    common = dict(global_negatives=True, max_steps=6, save_steps=3, eval_steps=100, keep_checkpoints=5,
                  batch_size=8, perturb_eps=1.0, stage1_fraction=0.5)
    one = _settings(teacher, tmp_path / "one", student_config, **common)
    runs.run_training(build_config(None, **one), "distill")
    two = _settings(teacher, tmp_path / "two", student_config, **common)
    _spawn(_distill_worker, 2, two)
    # A DDP reducer alive when the group is destroyed would drop it later with the GIL held,
    # which can deadlock the rank at exit (runtime.run_with_runtime).
    assert [(tmp_path / "two" / f"ddp-modules-at-destroy-rank{r}").read_text() for r in (0, 1)] == ["0", "0"]
    # Rank 0 alone wrote the run's files.
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").glob("step-*")) == ["step-00000003",
                                                                                         "step-00000006"]
    # Resume the 2-process run's step-3 checkpoint in one process.
    shutil.copytree(tmp_path / "two", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-00000006")
    resumed = _settings(teacher, tmp_path / "resumed", student_config, **common)
    runs.run_training(build_config(None, **resumed), "distill", resume=True)
    from safetensors.torch import load_file

    final = {name: load_file(str(tmp_path / name / "checkpoints" / "step-00000006" / "student.safetensors"))
             for name in ("one", "two", "resumed")}
    for name in ("two", "resumed"):
        assert_close_tensors(final[name], final["one"], 1e-3)
    assert [r["step"] for r in _train_records(tmp_path / "two")] == [1, 2, 3, 4, 5, 6]


def test_gradient_accumulation_scales_the_loss(teacher, student_config, tmp_path):
    """Two micro-batches of 4 accumulate the gradient of one batch of 8 (a loss without in-batch negatives)."""
    settings = _settings(teacher, tmp_path / "run", student_config, perturb_eps=0.0,
                         stages=[{"fraction": 1.0, "weights": {"soft": 1.0, "hard": 3.0}}])
    batch = _batch(teacher, 8)
    whole = _method(settings, Runtime(torch.device("cpu")))
    whole.train_step(batch, 0)
    split = _method(settings, Runtime(torch.device("cpu"), loss_factor=0.5))
    for half in (slice(0, 4), slice(4, 8)):
        split.train_step({k: v[half] for k, v in batch.items()}, 0)
    assert_close_tensors(_grads(split), _grads(whole), 1e-5)


def test_accumulating_run_trains_with_micro_batches(teacher, tmp_path):
    from lrc_bert.trainer import Trainer

    seen = []
    original = Trainer.optimizer_step

    def spy(self, step, batches):
        seen.append([b["input_ids"].shape[0] for b in batches])
        return original(self, step, batches)

    Trainer.optimizer_step = spy
    try:
        cfg = build_config(None, **tiny_distill_settings(teacher, tmp_path / "run", grad_accum_steps=2, max_steps=3))
        runs.run_training(cfg, "distill")
    finally:
        Trainer.optimizer_step = original
    assert seen == [[4, 4]] * 3
    with pytest.raises(ValueError, match="grad_accum_steps"):
        runs.run_training(build_config(None, **tiny_distill_settings(teacher, tmp_path / "bad", grad_accum_steps=3)),
                         "distill")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_and_checkpoints_the_scaler(teacher, tmp_path, precision):
    out = tmp_path / precision
    cfg = build_config(None, **tiny_distill_settings(teacher, out, precision=precision, max_steps=4, save_steps=2,
                                                     perturb_eps=1.0, stage1_fraction=0.5))
    runs.run_training(cfg, "distill")
    losses = [r["loss"] for r in _train_records(out)]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    state = torch.load(out / "checkpoints" / "step-00000004" / "trainer_state.pt", weights_only=True)
    assert (state["scaler"] is not None) == (precision == "fp16")


# ------------------------------------------------------------------ teacher cache and memory bank


def _write_cache(teacher, folder, **overrides):
    settings = dict(task="snli", teacher=str(teacher), output=str(folder), max_length=32, student_layers=2,
                    data_dir=tiny_distill_settings(teacher, folder)["data_dir"], eval_batch_size=16)
    settings.update(overrides)
    return runs.run_cache_teacher(build_config(None, **settings))


@pytest.fixture(scope="module")
def cache(teacher, tmp_path_factory):
    return _write_cache(teacher, tmp_path_factory.mktemp("cache") / "teacher_cache")


def test_cache_holds_the_teachers_outputs(teacher, cache):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lrc_bert.data import Collator, tokenize_split
    from lrc_bert.modeling import representation

    stored = TeacherCache(cache)
    assert stored.layers == [2, 4] and stored.reps.dtype.name == "float16"
    cfg = build_config(None, **tiny_distill_settings(teacher, cache))
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    train = tokenize_split(get_task("snli"), "train", tokenizer, cfg)
    assert stored.num_examples == len(train)
    rows = torch.tensor([0, 5, len(train) - 1])
    batch = Collator(tokenizer, False)(train[rows.tolist()])
    model = AutoModelForSequenceClassification.from_pretrained(teacher).eval()
    with torch.no_grad():
        out = model(**{k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")},
                    output_hidden_states=True)
    logits, reps = stored.rows(rows, [2, 4], torch.device("cpu"), torch.float32)
    torch.testing.assert_close(logits, out.logits, atol=2e-3, rtol=2e-3)
    for layer, rep in zip([2, 4], reps):
        ref = representation(out.hidden_states[layer], batch["attention_mask"], "sequence")
        torch.testing.assert_close(rep, ref, atol=5e-3, rtol=5e-3)


def test_cache_states_its_disk_need_and_refuses_when_it_does_not_fit(teacher, tmp_path, monkeypatch, caplog):
    import lrc_bert.teacher_cache as tc

    monkeypatch.setattr(tc.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 << 20, 9 << 20, 1 << 20))
    with caplog.at_level("INFO", logger="lrc_bert"), pytest.raises(OSError, match="--output .* needs"):
        _write_cache(teacher, tmp_path / "c")
    assert "on disk" in caplog.text
    assert not (tmp_path / "c").exists()


def test_distill_from_the_cache_matches_the_live_teacher_and_refuses_other_data(teacher, cache, tmp_path):
    live = _method(tiny_distill_settings(teacher, tmp_path / "a", perturb_eps=0.0), Runtime(torch.device("cpu")))
    cached = _method(tiny_distill_settings(teacher, tmp_path / "b", perturb_eps=0.0, teacher_cache=str(cache)),
                     Runtime(torch.device("cpu")), TeacherCache(cache))
    assert cached.teacher is None
    # The cache is indexed by training-set row; make the batch those rows.
    from transformers import AutoTokenizer

    from lrc_bert.data import Collator, tokenize_split

    cfg = build_config(None, **tiny_distill_settings(teacher, tmp_path))
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    train = tokenize_split(get_task("snli"), "train", tokenizer, cfg)
    index = torch.tensor([3, 17, 40, 41, 90, 95])
    batch = Collator(tokenizer, False)(train[index.tolist()])
    batch["index"] = index
    torch.manual_seed(0)
    a = live.train_step(batch, 9)
    torch.manual_seed(0)
    b = cached.train_step(batch, 9)
    for key in ("cos_nce", "soft", "hard"):
        assert b[key] == pytest.approx(a[key], rel=5e-3, abs=1e-6), key  # fp16 cache rounding
    with pytest.raises(ValueError, match="max_length"):
        runs.run_training(build_config(None, **tiny_distill_settings(teacher, tmp_path / "c", max_length=24,
                                                                    teacher_cache=str(cache))), "distill")
    with pytest.raises(ValueError, match="another training set"):
        runs.run_training(build_config(None, **tiny_distill_settings(teacher, tmp_path / "d", max_length=32,
                                                                    teacher_cache=str(cache), limit_train=None,
                                                                    data_dir=str(_shrunk_data(tmp_path)))),
                         "distill")


def _shrunk_data(tmp_path) -> Path:
    from trainer_fixtures import SNLI_SAMPLE

    folder = tmp_path / "data"
    shutil.copytree(SNLI_SAMPLE, folder)
    lines = (folder / "train.tsv").read_text().splitlines()
    (folder / "train.tsv").write_text("\n".join(lines[:-8]) + "\n")
    return folder


def test_bank_negatives_are_indexed_draws_over_the_training_set(teacher, cache, tmp_path):
    stored = TeacherCache(cache)
    method = _method(tiny_distill_settings(teacher, tmp_path, perturb_eps=0.0, teacher_cache=str(cache),
                                           negative_source="bank", num_negatives=7), Runtime(torch.device("cpu")),
                     stored)
    n = stored.num_examples
    index = torch.tensor([0, 1, n - 1, 50])
    for _ in range(20):
        neg = method._negatives(4, index, torch.zeros(4, dtype=torch.long))
        assert neg.shape == (4, 7) and int(neg.min()) >= 0 and int(neg.max()) < n
        assert not (neg == index[:, None]).any()  # never the sample itself
    # The loss the trainer computes is COS-NCE against exactly those bank rows.
    captured = {}
    real = lk.cos_nce_loss

    def spy(s, t, negatives=None, neg_index=None, **kw):
        captured.setdefault("calls", []).append((s.detach(), t, negatives, neg_index))
        return real(s, t, negatives, neg_index, **kw)

    import lrc_bert.losses as losses

    losses.lk.cos_nce_loss, original = spy, losses.lk.cos_nce_loss
    try:
        from transformers import AutoTokenizer

        from lrc_bert.data import Collator, tokenize_split

        cfg = build_config(None, **tiny_distill_settings(teacher, tmp_path))
        tokenizer = AutoTokenizer.from_pretrained(teacher)
        train = tokenize_split(get_task("snli"), "train", tokenizer, cfg)
        batch = Collator(tokenizer, False)(train[index.tolist()])
        batch["index"] = index
        parts = method.train_step(batch, 0)
    finally:
        losses.lk.cos_nce_loss = original
    assert len(captured["calls"]) == 2
    total = 0.0
    for layer, (s, t, bank, neg_index) in zip(stored.layers, captured["calls"]):
        assert bank.shape == (n, stored.meta["features"]) and neg_index.shape == (4, 7)
        full = torch.from_numpy(stored.reps[stored.layers.index(layer)].astype("float32"))
        total += float(lk.cos_nce_loss(s.double(), full[index].double(), full[neg_index].double(), backend="torch"))
        torch.testing.assert_close(t.float(), full[index])
    assert parts["cos_nce"] == pytest.approx(total, rel=1e-4)


def test_bank_needs_a_cache_and_k(teacher, tmp_path):
    from lrc_bert.config import validate

    with pytest.raises(ValueError, match="teacher-cache"):
        validate(build_config(None, **tiny_distill_settings(teacher, tmp_path, negative_source="bank",
                                                            num_negatives=4)), "distill")
    with pytest.raises(FileNotFoundError, match="teacher-cache"):
        validate(build_config(None, **tiny_distill_settings(teacher, tmp_path, teacher_cache=str(tmp_path))),
                 "distill")


# ------------------------------------------------------------------ on a GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision,compiled", [("bf16", False), ("fp16", False), ("bf16", True)])
def test_cuda_distill_with_mixed_precision_cache_bank_and_compile(teacher, cache, tmp_path, precision, compiled):
    out = tmp_path / "run"
    cfg = build_config(None, **tiny_distill_settings(
        teacher, out, device="cuda", precision=precision, compile_student=compiled, loss_backend="auto",
        teacher_cache=str(cache), negative_source="bank", num_negatives=16, max_steps=6, save_steps=3,
        stage1_fraction=0.5, perturb_eps=1.0))
    runs.run_training(cfg, "distill")
    losses = [r["loss"] for r in _train_records(out)]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert (out / "student" / "model.safetensors").is_file()


# ------------------------------------------------------------------ CUDA graphs


@pytest.mark.parametrize("overrides,match", [
    (dict(device="cpu"), "CUDA device"),
    (dict(device="cuda", precision="fp16"), "fp32 or bf16"),
    (dict(device="cuda", max_length=None), "max-length"),
    (dict(device="cuda", compile_student=True), "choose one"),
])
def test_cuda_graphs_refuse_what_a_graph_cannot_replay(teacher, tmp_path, overrides, match):
    from lrc_bert.config import validate

    cfg = build_config(None, **tiny_distill_settings(teacher, tmp_path, cuda_graphs=True))
    for key, value in overrides.items():
        setattr(cfg, key, value)
    with pytest.raises(ValueError, match=match):
        validate(cfg, "distill")


def test_learning_rates_switch_between_floats_and_device_tensors():
    from transformers import get_linear_schedule_with_warmup

    from lrc_bert.trainer import set_lr_kind

    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w], lr=1e-3)
    sched = get_linear_schedule_with_warmup(opt, 2, 10)
    set_lr_kind(opt, True, torch.device("cpu"))
    lr = opt.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor)
    sched.step()
    assert opt.param_groups[0]["lr"] is lr  # filled in place: what a captured optimiser reads
    assert float(lr) == pytest.approx(1e-3 * 1 / 2)
    set_lr_kind(opt, False, torch.device("cpu"))
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4) and isinstance(opt.param_groups[0]["lr"], float)



@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision,cached", [("fp32", False), ("bf16", False), ("fp32", True)])
def test_cuda_graph_steps_equal_eager_steps_and_resume_eagerly(teacher, student_config, cache, tmp_path, caplog,
                                                               precision, cached):
    """Same run eagerly and as replayed graphs (dropout off): same losses and weights, through a
    stage change (a second graph) and the memory bank; its checkpoint resumes without graphs."""
    import logging

    from safetensors.torch import load_file

    extra = dict(teacher_cache=str(cache), negative_source="bank", num_negatives=5) if cached else {}
    common = dict(device="cuda", precision=precision, loss_backend="auto", max_steps=10, save_steps=5,
                  keep_checkpoints=5, stage1_fraction=0.5, perturb_eps=1.0, **extra)
    runs = {}
    for name, graphs in (("eager", False), ("graphs", True)):
        with caplog.at_level(logging.INFO, logger="lrc_bert"):
            caplog.clear()
            runs.run_training(build_config(None, **_settings(teacher, tmp_path / name, student_config,
                                                            cuda_graphs=graphs, **common)), "distill")
            captures = sum("capturing the training step" in r.getMessage() for r in caplog.records)
        assert captures == (2 if graphs else 0)  # one graph per stage
        runs[name] = _train_records(tmp_path / name)
    rtol = 1e-4 if precision == "fp32" else 3e-2
    for a, b in zip(runs["eager"], runs["graphs"], strict=True):
        assert a["stage"] == b["stage"] and a["lr"] == pytest.approx(b["lr"], rel=1e-6)
        for key in ("loss", "cos_nce", "loss_perturbed", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=rtol, abs=1e-6), (a["step"], key)
    # The graph run's step-5 checkpoint, resumed eagerly, ends where the graph run ended.
    shutil.copytree(tmp_path / "graphs", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-00000010")
    runs.run_training(build_config(None, **_settings(teacher, tmp_path / "resumed", student_config, **common)),
                     "distill", resume=True)
    final = {name: load_file(str(tmp_path / name / "checkpoints" / "step-00000010" / "student.safetensors"))
             for name in ("eager", "graphs", "resumed")}
    for name in ("graphs", "resumed"):
        assert_close_tensors(final[name], final["eager"], 1e-3 if precision == "fp32" else 5e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_finetune_equals_eager(teacher, tmp_path):
    """finetune goes through the same split step: graphed and eager runs log the same losses."""
    model = tmp_path / "model"
    shutil.copytree(teacher, model)
    config = json.loads((model / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (model / "config.json").write_text(json.dumps(config))
    runs = {}
    for name, graphs in (("eager", False), ("graphs", True)):
        settings = tiny_distill_settings(teacher, tmp_path / name, device="cuda", precision="bf16", max_steps=6,
                                         cuda_graphs=graphs)
        del settings["teacher"]
        runs.run_training(build_config(None, **settings, model=str(model)), "finetune")
        runs[name] = _train_records(tmp_path / name)
    assert len(runs["graphs"]) == 6
    for a, b in zip(runs["eager"], runs["graphs"], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=3e-2) and b["grad_norm"] == pytest.approx(a["grad_norm"],
                                                                                                    rel=5e-2)


def test_collective_timeout_comes_from_the_environment_and_bad_values_name_the_variable(monkeypatch):
    monkeypatch.delenv("LRC_BERT_DIST_TIMEOUT_S", raising=False)
    assert dist_timeout().total_seconds() == 1800
    monkeypatch.setenv("LRC_BERT_DIST_TIMEOUT_S", "90.5")
    assert dist_timeout().total_seconds() == 90.5
    for bad in ("0", "-3", "ten", "inf", "nan"):
        monkeypatch.setenv("LRC_BERT_DIST_TIMEOUT_S", bad)
        with pytest.raises(ValueError, match="LRC_BERT_DIST_TIMEOUT_S"):
            dist_timeout()


def _ddp_step_then_leave_worker(rank, world, _port, ports):
    from torch.nn.parallel import DistributedDataParallel

    def step(runtime):
        model = DistributedDataParallel(torch.nn.Linear(8, 8))
        model(torch.randn(4, 8)).sum().backward()
        total = torch.ones(1000)
        torch.distributed.all_reduce(total)
        assert total[0] == world

    for port in ports:
        _as_rank(rank, world, port, deadline_s=90)
        run_with_runtime("cpu", "fp32", step)


def test_ranks_leave_the_process_group_without_hanging():
    """Twelve DDP runs end in a row. With the group destroyed while the DDP module lived, the
    rank hung at exit within 2 to 10 such runs here (~ProcessGroupGloo under the GIL)."""
    _spawn(_ddp_step_then_leave_worker, 2, [_free_port() for _ in range(12)], deadline_s=120)


@pytest.mark.parametrize("fails", [False, True])
def test_the_run_is_released_before_the_process_group_is_destroyed(monkeypatch, fails):
    """What the run built (a DDP reducer holds the group) is gone when destroy_process_group runs,
    on success and when the run raises: a failed run's traceback would otherwise keep it alive."""
    from lrc_bert import runtime as runtime_module

    class Reducer:  # stands in for a DDP module, which sits in a reference cycle
        def __init__(self):
            self.me = self

    alive_at_destroy = []
    built = []
    monkeypatch.setattr(runtime_module, "init_runtime", lambda *_: Runtime(torch.device("cpu"), world_size=2))
    monkeypatch.setattr(runtime_module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(runtime_module.dist, "destroy_process_group",
                        lambda: alive_at_destroy.append(built[0]() is not None))

    def body(runtime):
        reducer = Reducer()
        built.append(weakref.ref(reducer))
        if fails:
            raise RuntimeError("step 3 failed")
        return "done"

    if fails:
        with pytest.raises(RuntimeError, match="step 3 failed"):
            run_with_runtime("cpu", "fp32", body)
    else:
        assert run_with_runtime("cpu", "fp32", body) == "done"
    assert alive_at_destroy == [False]
