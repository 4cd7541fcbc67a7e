"""GLUE and SNLI: where the data lives, how its files are laid out, and its labels.

Every task is normalised to the columns ``text_a``, ``text_b`` (absent for single-sentence
tasks) and ``label`` (the index into :attr:`TaskSpec.labels`, or a float for STS-B).

Without a data directory the data comes from the Hugging Face hub through
``datasets.load_dataset`` (the GLUE configs, and ``stanfordnlp/snli``). With one, the
standard GLUE TSV files are read through the ``datasets`` csv builder, so tokenisation
is cached and mapped like any other dataset.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

log = logging.getLogger("lrc_bert")

TASK_NAMES = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli", "snli")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    labels: Optional[tuple[str, ...]]  # None: regression (STS-B)
    main_metric: str
    # Official GLUE TSV layout: text columns, label column, whether the file has a header
    # (CoLA's train/dev files do not; then ``columns`` names them), and how a raw label
    # value maps to a label name (e.g. "1" -> "positive").
    tsv_text: tuple[str, ...]
    tsv_label: str
    tsv_columns: Optional[tuple[str, ...]] = None
    tsv_label_values: Optional[dict] = None
    hub: tuple = ()  # (path, name) for datasets.load_dataset
    hub_text: tuple[str, ...] = ()
    dev_files: dict = field(default_factory=lambda: {"dev": "dev.tsv"})
    hub_dev_splits: dict = field(default_factory=lambda: {"dev": "validation"})

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)


def _binary(neg: str, pos: str) -> dict:
    return {"0": neg, "1": pos}


TASKS: dict[str, TaskSpec] = {
    "cola": TaskSpec("cola", ("unacceptable", "acceptable"), "matthews_corrcoef", ("sentence",), "label",
                     tsv_columns=("source", "label", "original_label", "sentence"),
                     tsv_label_values=_binary("unacceptable", "acceptable"),
                     hub=("glue", "cola"), hub_text=("sentence",)),
    "sst2": TaskSpec("sst2", ("negative", "positive"), "accuracy", ("sentence",), "label",
                     tsv_label_values=_binary("negative", "positive"), hub=("glue", "sst2"), hub_text=("sentence",)),
    "mrpc": TaskSpec("mrpc", ("not_equivalent", "equivalent"), "f1", ("#1 String", "#2 String"), "Quality",
                     tsv_label_values=_binary("not_equivalent", "equivalent"),
                     hub=("glue", "mrpc"), hub_text=("sentence1", "sentence2")),
    "stsb": TaskSpec("stsb", None, "pearson", ("sentence1", "sentence2"), "score",
                     hub=("glue", "stsb"), hub_text=("sentence1", "sentence2")),
    "qqp": TaskSpec("qqp", ("not_duplicate", "duplicate"), "f1", ("question1", "question2"), "is_duplicate",
                    tsv_label_values=_binary("not_duplicate", "duplicate"),
                    hub=("glue", "qqp"), hub_text=("question1", "question2")),
    "mnli": TaskSpec("mnli", ("entailment", "neutral", "contradiction"), "accuracy", ("sentence1", "sentence2"),
                     "gold_label", hub=("glue", "mnli"), hub_text=("premise", "hypothesis"),
                     dev_files={"dev_matched": "dev_matched.tsv", "dev_mismatched": "dev_mismatched.tsv"},
                     hub_dev_splits={"dev_matched": "validation_matched", "dev_mismatched": "validation_mismatched"}),
    "qnli": TaskSpec("qnli", ("entailment", "not_entailment"), "accuracy", ("question", "sentence"), "label",
                     hub=("glue", "qnli"), hub_text=("question", "sentence")),
    "rte": TaskSpec("rte", ("entailment", "not_entailment"), "accuracy", ("sentence1", "sentence2"), "label",
                    hub=("glue", "rte"), hub_text=("sentence1", "sentence2")),
    "wnli": TaskSpec("wnli", ("not_entailment", "entailment"), "accuracy", ("sentence1", "sentence2"), "label",
                     tsv_label_values=_binary("not_entailment", "entailment"),
                     hub=("glue", "wnli"), hub_text=("sentence1", "sentence2")),
    # ../shared/data/snli layout: pairID, sentence1, sentence2, gold_label ("-" rows dropped).
    "snli": TaskSpec("snli", ("entailment", "neutral", "contradiction"), "accuracy", ("sentence1", "sentence2"),
                     "gold_label", hub=("stanfordnlp/snli", None), hub_text=("premise", "hypothesis")),
}


def label_kwargs(task: TaskSpec) -> dict:
    """Config fields that name the task's labels, so later label checks can work."""
    if task.is_regression:
        return {"num_labels": 1, "problem_type": "regression"}
    return {"num_labels": task.num_labels, "id2label": dict(enumerate(task.labels)),
            "label2id": {name: i for i, name in enumerate(task.labels)},
            "problem_type": "single_label_classification"}


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASK_NAMES)}; got {name!r}")
    return TASKS[name]


def split_files(task: TaskSpec, data_dir: Path) -> dict[str, Path]:
    """{split: file} for the TSV layout; ``train`` plus the task's dev split(s)."""
    return {"train": data_dir / "train.tsv", **{split: data_dir / f for split, f in task.dev_files.items()}}


def check_data_files(task: TaskSpec, data_dir: Optional[Path], splits: tuple[str, ...]) -> None:
    """Fail early (before any model is loaded) when a data file is missing."""
    if data_dir is None:
        return
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"--data-dir {data_dir} is not a directory")
    files = split_files(task, data_dir)
    for split in splits:
        path = files.get(split, data_dir / f"{split}.tsv")
        if not path.is_file():
            raise FileNotFoundError(f"{task.name}: the {split} file {path} is missing (expected the GLUE TSV layout)")


class DataError(ValueError):
    """A data file that cannot be read as the task's TSV layout; names the file and the line."""


def text_lines(file: Path):
    """(line number, line without its newline) of a UTF-8 text file, streamed. A leading byte-order
    mark is dropped; bytes that are not UTF-8 raise :class:`DataError` naming the file, the line
    and the byte offset."""
    with open(file, "rb") as f:
        offset = 0
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{file}, line {number}: not UTF-8 (byte 0x{raw[exc.start]:02x} at byte offset "
                                f"{offset + exc.start} of the file); re-save the file as UTF-8") from None
            offset += len(raw)
            if number == 1:
                line = line.removeprefix("\ufeff")
            yield number, line.rstrip("\r\n")


def tsv_rows(file: Path, width: Optional[int] = None):
    """(line number, fields) of every non-blank line of a TSV (no quoting, as GLUE's files); every
    line must have ``width`` fields, by default the first line's (the header)."""
    for number, line in text_lines(file):
        if not line.strip():
            continue
        fields = line.split("\t")
        if width is None:
            width = len(fields)
        elif len(fields) != width:
            raise DataError(f"{file}, line {number}: {len(fields)} tab-separated fields, expected {width}")
        yield number, fields


def scan_tsv(task: TaskSpec, file: Path) -> tuple[list[str], int]:
    """Check a GLUE-layout TSV line by line before ``datasets`` reads it: UTF-8 (a leading BOM is
    accepted), the same number of tab-separated fields on every line, at least one row, and
    known labels. Returns (column names, unlabelled rows) so that dropped rows can be reported.
    Raises :class:`DataError` naming the file, the line and what is wrong; never drops a row."""
    names = list(task.tsv_columns) if task.tsv_columns is not None else None
    label_at = None
    known = None if task.is_regression else {*task.labels, *(task.tsv_label_values or {})}
    rows = unlabelled = 0
    for number, fields in tsv_rows(file, len(names) if names else None):
        if names is None:
            names = fields
            continue
        rows += 1
        if label_at is None:
            if task.tsv_label not in names:
                raise DataError(f"{file}: no {task.tsv_label!r} column (the {task.name} label); "
                                f"found {names}")
            label_at = names.index(task.tsv_label)
        label = fields[label_at].strip()
        if label in ("", "-"):
            unlabelled += 1
        elif known is not None and label not in known:
            raise DataError(f"{file}, line {number}: unknown {task.name} label {label!r}; expected one of "
                            f"{sorted(known)}")
        elif known is None:
            try:
                float(label)
            except ValueError:
                raise DataError(f"{file}, line {number}: the {task.name} score {label!r} is not a number") from None
    if names is None:
        raise DataError(f"{file} is empty")
    if rows == 0:
        raise DataError(f"{file} has {'a header but ' if task.tsv_columns is None else ''}no rows")
    missing = [c for c in task.tsv_text if c not in names]
    if missing:
        raise DataError(f"{file}: no {missing} column(s) (the {task.name} text); found {names}")
    return names, unlabelled


def dev_splits(task: TaskSpec) -> tuple[str, ...]:
    return tuple(task.dev_files)


def _normalise(task: TaskSpec, text_columns, label_fn):
    def convert(batch):
        out = {"text_a": [str(x) for x in batch[text_columns[0]]]}
        if len(text_columns) > 1:
            out["text_b"] = [str(x) for x in batch[text_columns[1]]]
        out["label"] = [label_fn(x) for x in batch["__label__"]]
        return out

    return convert


def _label_from_name(task: TaskSpec):
    if task.is_regression:
        return float
    index = {name: i for i, name in enumerate(task.labels)}
    values = task.tsv_label_values or {}

    def convert(raw):
        name = values.get(str(raw).strip(), str(raw).strip())
        if name not in index:
            raise ValueError(f"{task.name}: unknown label {raw!r} in the data; expected one of {task.labels}")
        return index[name]

    return convert


def load_split(task: TaskSpec, split: str, data_dir: Optional[Path] = None, cache_dir: Optional[str] = None,
               limit: Optional[int] = None):
    """One split as a ``datasets.Dataset`` with text_a[, text_b], label."""
    import datasets

    if data_dir is None:
        path, name = task.hub
        hub_split = "train" if split == "train" else task.hub_dev_splits.get(split, split)
        ds = datasets.load_dataset(path, name, split=hub_split, cache_dir=cache_dir)
        if task.labels is not None:
            ds = ds.filter(lambda ex: ex["label"] >= 0)  # unlabelled pairs (SNLI "-", GLUE test)
            names = ds.features["label"].names
            if tuple(names) != task.labels:
                raise ValueError(f"{task.name}: the hub's label names {names} differ from {task.labels}")
        ds = ds.rename_column("label", "__label__")
        label_fn = (lambda x: x) if task.labels is not None else float
    else:
        file = split_files(task, Path(data_dir)).get(split, Path(data_dir) / f"{split}.tsv")
        check_data_files(task, Path(data_dir), (split,))
        names, unlabelled = scan_tsv(task, file)
        kwargs = dict(delimiter="\t", quoting=csv.QUOTE_NONE, keep_default_na=False, encoding="utf-8-sig")
        if task.tsv_columns is not None:
            kwargs.update(header=None, column_names=names)
        # Every column as text: pandas would otherwise turn "1" into an int and "NA" into NaN.
        kwargs["features"] = datasets.Features({name: datasets.Value("string") for name in names})
        ds = datasets.load_dataset("csv", data_files={split: str(file)}, split=split, cache_dir=cache_dir, **kwargs)
        if unlabelled:
            log.info("%s: %d unlabelled rows (label '-' or empty) left out of %s, as in the official splits",
                     file, unlabelled, split)
            ds = ds.filter(lambda ex: ex[task.tsv_label].strip() not in ("", "-"))
        ds = ds.rename_column(task.tsv_label, "__label__")
        label_fn = _label_from_name(task)
    text = task.hub_text if data_dir is None else task.tsv_text
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return ds.map(_normalise(task, text, label_fn), batched=True, remove_columns=ds.column_names,
                  desc=f"{task.name}/{split}: normalise")


def label_alignment(task: TaskSpec, id2label: dict, assume_label_order: bool = False) -> Optional[list[int]]:
    """Map dataset label index -> model output index, by label name; never a silent permutation.

    Returns None for regression. Raises ``ValueError`` when the model's labels are not the
    task's (a different set, a different count, or generic ``LABEL_i`` names unless
    ``assume_label_order`` says the model was trained in this task's canonical order).
    """
    if task.is_regression:
        if len(id2label) != 1:
            raise ValueError(f"{task.name} is a regression task; the model has {len(id2label)} outputs")
        return None
    model_names = [str(id2label[i] if i in id2label else id2label[str(i)]) for i in range(len(id2label))]
    if len(model_names) != len(task.labels):
        raise ValueError(f"label mismatch: the model has {len(model_names)} labels {model_names}, "
                         f"task {task.name} has {len(task.labels)} {list(task.labels)}")
    generic = [f"LABEL_{i}" for i in range(len(model_names))]
    if model_names == generic:
        if not assume_label_order:
            raise ValueError(
                f"label mismatch: the model's labels are the generic {generic}, so their meaning cannot be checked "
                f"against task {task.name} {list(task.labels)}; fine-tune with `lrc-bert finetune` (which names "
                "them) or pass --assume-label-order if the model was trained in this task's order")
        return list(range(len(model_names)))
    lowered = [n.lower() for n in model_names]
    if sorted(lowered) != sorted(task.labels):
        raise ValueError(f"label mismatch: the model's labels {model_names} are not task {task.name}'s "
                         f"{list(task.labels)}")
    return [lowered.index(name) for name in task.labels]
