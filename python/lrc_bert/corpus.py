"""Unlabeled text for general distillation, tokenised once and packed into fixed-length sequences.

* **Sources**: plain-text files, or folders of ``.txt`` files (``--corpus``): a file with blank
  lines holds documents separated by them, otherwise one document per line. Or any text
  dataset through ``datasets.load_dataset`` (``--dataset``, optionally streamed).
* **Tokenised once** into a flat file of token ids (uint16 while the vocabulary fits, else
  int32), written in chunks, never held as Python lists, with documents separated by
  ``[SEP]``. The file lives in ``<cache>/corpus-<fingerprint>/`` and is memory-mapped; the
  fingerprint hashes the corpus (every file's bytes, or the dataset's name, config, split and
  column) and the tokenizer (class, vocabulary, lower-casing), so a second run reuses it and a
  changed corpus or tokenizer builds another.
* **Packed** as TinyBERT's general distillation does: sequence i is ``[CLS]`` + the next
  L - 2 tokens of the stream + ``[SEP]``, every sequence full (no padding); the last
  ``--validation-fraction`` of the sequences is held out to judge checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from .checkpoint import atomic_directory
from .tasks import DataError, text_lines

log = logging.getLogger("lrc_bert")

FORMAT = 1


def corpus_files(paths) -> list[Path]:
    """The files named, and the ``.txt`` files of the folders named, in a stable order."""
    files = []
    for entry in paths:
        path = Path(entry)
        if path.is_dir():
            found = sorted(path.rglob("*.txt"))
            if not found:
                raise DataError(f"--corpus {path} is a folder with no .txt files")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"--corpus {path} does not exist")
    return files


def _file_documents(file: Path) -> Iterator[str]:
    """Documents of one file (blank-line separated if it has blank lines, else one per line);
    bytes that are not UTF-8, and binary files, are errors naming the file, line and offset."""
    with open(file, "rb") as f:
        head = f.read(1 << 13)
    nul = head.find(b"\0")
    if nul >= 0:
        raise DataError(f"{file}: a NUL byte at byte offset {nul}: this looks like a binary file, not text")
    with open(file, "rb") as f:
        blank_separated = any(not line.strip() for line in f)
    block = []
    for _, line in text_lines(file):
        line = line.strip()
        if not blank_separated:
            if line:
                yield line
        elif line:
            block.append(line)
        elif block:
            yield " ".join(block)
            block = []
    if block:
        yield " ".join(block)


def tokenizer_fingerprint(tokenizer) -> str:
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(str(getattr(tokenizer, "do_lower_case", None)).encode())
    return digest.hexdigest()[:16]


class CorpusSource:
    """Where the text comes from, with its fingerprint and a size for the progress bar."""

    def __init__(self, files: Optional[list] = None, dataset: Optional[str] = None, dataset_config=None,
                 dataset_split: str = "train", text_column: str = "text", streaming: bool = False):
        self.files = corpus_files(files) if files else None
        self.dataset, self.dataset_config, self.dataset_split = dataset, dataset_config, dataset_split
        self.text_column, self.streaming = text_column, streaming
        if self.files is None and dataset is None:
            raise ValueError("general-distill needs --corpus PATH [PATH ...] or --dataset NAME")

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        if self.files is not None:
            for file in self.files:
                digest.update(file.name.encode() + b"\0")
                with open(file, "rb") as f:
                    for block in iter(lambda: f.read(1 << 22), b""):
                        digest.update(block)
        else:
            digest.update(json.dumps([self.dataset, self.dataset_config, self.dataset_split,
                                      self.text_column]).encode())
        return digest.hexdigest()[:16]

    def total_bytes(self) -> Optional[int]:
        return sum(f.stat().st_size for f in self.files) if self.files is not None else None

    def documents(self) -> Iterator[str]:
        if self.files is not None:
            for file in self.files:
                yield from _file_documents(file)
            return
        import datasets

        ds = datasets.load_dataset(self.dataset, self.dataset_config, split=self.dataset_split,
                                   streaming=self.streaming)
        if self.text_column not in (ds.column_names or []):
            raise DataError(f"--dataset {self.dataset}: no {self.text_column!r} column (--text-column); found "
                            f"{ds.column_names}")
        for row in ds:
            text = (row[self.text_column] or "").strip()
            if text:
                yield text


def tokenize_corpus(source: CorpusSource, tokenizer, cache_root: Path, batch_docs: int = 1000) -> Path:
    """The cached token-id file of ``source`` (built once, with a progress bar); returns its folder."""
    from tqdm.auto import tqdm

    key = f"corpus-{source.fingerprint()}-{tokenizer_fingerprint(tokenizer)}"
    folder = Path(cache_root) / key
    if (folder / "meta.json").is_file():
        meta = json.loads((folder / "meta.json").read_text())
        log.info("tokenised corpus reused: %s (%d tokens)", folder, meta["tokens"])
        return folder
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max else np.int32
    sep = tokenizer.sep_token_id
    started, tokens, documents = time.time(), 0, 0
    total = source.total_bytes()
    with atomic_directory(folder) as tmp, open(tmp / "tokens.bin", "wb") as out, \
            tqdm(total=total, unit="B", unit_scale=True, desc="tokenising the corpus") as bar:
        batch: list[str] = []

        def flush():
            nonlocal tokens
            if not batch:
                return
            ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
            flat = np.fromiter((t for doc in ids for t in (*doc, sep)), dtype=dtype)
            out.write(flat.tobytes())
            tokens += flat.size
            bar.update(sum(len(d.encode()) + 1 for d in batch) if total else len(batch))
            batch.clear()

        for doc in source.documents():
            batch.append(doc)
            documents += 1
            if len(batch) >= batch_docs:
                flush()
        flush()
        out.close()
        if tokens == 0:
            raise DataError("the corpus is empty: no text in " + (", ".join(map(str, source.files)) if source.files
                                                                  else f"--dataset {source.dataset}"))
        seconds = time.time() - started
        (tmp / "meta.json").write_text(json.dumps({
            "format": FORMAT, "tokens": tokens, "documents": documents, "dtype": np.dtype(dtype).name,
            "seconds": round(seconds, 3), "tokens_per_second": round(tokens / max(seconds, 1e-9)),
            "files": [str(f) for f in source.files] if source.files else None, "dataset": source.dataset,
        }, indent=1) + "\n")
    log.info("tokenised the corpus: %d documents, %d tokens in %.1f s (%.0f tokens/s) -> %s", documents, tokens,
             seconds, tokens / max(seconds, 1e-9), folder)
    return folder


class PackedCorpus:
    """Fixed-length ``[CLS] ... [SEP]`` sequences over a memory-mapped token file (a range of them)."""

    def __init__(self, folder: Path, max_length: int, cls_id: int, sep_id: int, start: int = 0,
                 stop: Optional[int] = None):
        meta = json.loads((Path(folder) / "meta.json").read_text())
        self.folder, self.meta = Path(folder), meta
        self.tokens = np.memmap(self.folder / "tokens.bin", dtype=meta["dtype"], mode="r")
        self.max_length, self.body = max_length, max_length - 2
        self.cls_id, self.sep_id = cls_id, sep_id
        self.total = len(self.tokens) // self.body
        if self.total == 0:
            raise DataError(f"the corpus has {len(self.tokens)} tokens, fewer than one sequence of --max-length "
                            f"{max_length}")
        self.start, self.stop = start, self.total if stop is None else stop

    def __len__(self) -> int:
        return self.stop - self.start

    def split(self, validation_fraction: float) -> tuple["PackedCorpus", "PackedCorpus"]:
        """(train, validation): the last fraction of the sequences is held out (at least one)."""
        held = max(1, math.ceil(validation_fraction * len(self))) if validation_fraction > 0 else 0
        if held >= len(self):
            raise DataError(f"the corpus packs into {len(self)} sequences of {self.max_length} tokens: too few to "
                            f"hold out --validation-fraction {validation_fraction} and train on the rest")
        cut = self.stop - held
        args = (self.folder, self.max_length, self.cls_id, self.sep_id)
        return PackedCorpus(*args, self.start, cut), PackedCorpus(*args, cut, self.stop)

    def __getitem__(self, rows) -> dict:
        rows = [rows] if isinstance(rows, int) else list(rows)
        if any(not 0 <= r < len(self) for r in rows):
            raise IndexError(f"sequence index out of range [0, {len(self)})")
        body = np.stack([self.tokens[(self.start + r) * self.body:(self.start + r + 1) * self.body] for r in rows])
        ids = torch.from_numpy(body.astype(np.int64))
        n = ids.shape[0]
        ids = torch.cat([torch.full((n, 1), self.cls_id), ids, torch.full((n, 1), self.sep_id)], dim=1)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}

    def fingerprint(self) -> str:
        """The data a checkpoint trained on: the token file and this range of it."""
        return hashlib.sha256(f"{self.folder.name}:{self.max_length}:{self.start}:{self.stop}".encode()).hexdigest()[:16]


def collate_packed(rows: dict) -> dict:
    """The rows are tensors already (``PackedCorpus.__getitem__``)."""
    return dict(rows)


def cache_root(cfg) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.output) / "corpus_cache"
