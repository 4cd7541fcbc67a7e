"""``lrc-bert augment``: TinyBERT's data augmentation, which the LRC-BERT paper trains on too.

For every training sentence (both sentences of a pair), ``--n-aug`` variants are written. In a
variant, each word that is a single word piece is replaced, with probability ``--p``, by one
of the ``--top-k`` predictions of a masked language model at that word (the word masked in
the original sentence; word pieces, special tokens and the word itself are not candidates).
Words of several pieces are kept (TinyBERT replaces those from GloVe neighbours; no such
vectors are used here). The candidates of each word are computed once, in batches on the GPU
when there is one; the variants then sample from them with a seeded generator, so a seed
gives the same file.

Output: the task's own TSV layout in ``--output``: ``train.tsv`` holds each original row
followed by its variants (every other column, the label included, copied unchanged), and the
task's other files (dev, test, MNLI's matched/mismatched) are copied as they are.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .tasks import check_data_files, get_task, scan_tsv, tsv_rows

log = logging.getLogger("lrc_bert")


@dataclass
class AugmentConfig:
    task: str
    data_dir: str
    output: str
    mlm: str
    n_aug: int = 20
    p: float = 0.4
    top_k: int = 15
    seed: int = 42
    batch_size: int = 64
    device: str = "auto"

    def validate(self) -> None:
        get_task(self.task)
        if isinstance(self.n_aug, bool) or not isinstance(self.n_aug, int) or self.n_aug < 1:
            raise ValueError(f"--n-aug must be an integer >= 1 (variants per sentence), got {self.n_aug}")
        if not (isinstance(self.p, (int, float)) and 0 < self.p <= 1):
            raise ValueError(f"--p must be in (0, 1] (the chance that a word is replaced), got {self.p}")
        if self.top_k < 1 or self.batch_size < 1:
            raise ValueError(f"--top-k and --batch-size must be >= 1, got {self.top_k} and {self.batch_size}")
        check_data_files(get_task(self.task), Path(self.data_dir), ("train",))
        if Path(self.output).resolve() == Path(self.data_dir).resolve():
            raise ValueError("--output must be another folder than --data-dir (the originals are kept)")
        if Path(self.mlm).expanduser().exists() is False and (self.mlm.startswith((".", "/", "~"))):
            raise FileNotFoundError(f"--mlm {self.mlm} does not exist")


class Augmenter:
    """Replacement candidates from a masked LM, and variants sampled from them."""

    def __init__(self, mlm: str, top_k: int, batch_size: int, device: str = "auto"):
        import torch
        from transformers import AutoModelForMaskedLM, AutoTokenizer

        from .runtime import resolve_device

        self.tokenizer = AutoTokenizer.from_pretrained(mlm)
        if self.tokenizer.mask_token is None:
            raise ValueError(f"--mlm {mlm}: its tokenizer has no mask token")
        self.device = resolve_device(device)
        self.model = AutoModelForMaskedLM.from_pretrained(mlm).to(self.device).eval()
        self.top_k, self.batch_size, self.torch = top_k, batch_size, torch
        vocab = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
        # Whole-word candidates only: no continuation pieces, no special or unused tokens.
        banned = set(self.tokenizer.all_special_ids)
        self.allowed = np.array([i not in banned and not t.startswith("##") and not t.startswith("[")
                                 for i, t in enumerate(vocab)])

    def words(self, text: str) -> list[tuple[str, int, int]]:
        """(word, start, end) of the pre-tokenised text (the tokenizer's own word split)."""
        pieces = self.tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)
        return [(w, a, b) for w, (a, b) in pieces]

    def candidates(self, texts: list[str]) -> list[list[Optional[list[str]]]]:
        """Per text, per word: the top-k replacement words, or None for a multi-piece word."""
        from tqdm.auto import tqdm

        jobs, out = [], []
        for t, text in enumerate(texts):
            words = self.words(text)
            out.append([None] * len(words))
            for w, (word, a, b) in enumerate(words):
                if len(self.tokenizer.tokenize(word)) == 1:
                    jobs.append((t, w, text[:a] + self.tokenizer.mask_token + text[b:], word.lower()))
        for start in tqdm(range(0, len(jobs), self.batch_size), desc="masked-LM candidates", leave=False):
            chunk = jobs[start:start + self.batch_size]
            inputs = self.tokenizer([j[2] for j in chunk], padding=True, truncation=True,
                                    return_tensors="pt").to(self.device)
            with self.torch.inference_mode():
                logits = self.model(**inputs).logits.float()
            at = inputs["input_ids"] == self.tokenizer.mask_token_id
            scores = logits[at].cpu().numpy()  # [jobs with a surviving mask, vocab]
            scores[:, ~self.allowed] = -np.inf
            rows = iter(np.argsort(-scores, axis=1, kind="stable")[:, :self.top_k + 1])
            for (t, w, _, original), found in zip(chunk, at.any(dim=1).tolist()):
                if not found:  # the mask was truncated away: keep the word
                    continue
                ranked = [tok for tok in self.tokenizer.convert_ids_to_tokens(next(rows).tolist())
                          if tok.lower() != original][:self.top_k]
                out[t][w] = ranked
        return out

    def variants(self, text: str, candidates: list, n: int, p: float, rng: np.random.Generator) -> list[str]:
        words = self.words(text)
        out = []
        for _ in range(n):
            pieces, cursor = [], 0
            for (word, a, b), options in zip(words, candidates):
                pieces.append(text[cursor:a])
                replace = options and rng.random() < p
                pieces.append(options[rng.integers(len(options))] if replace else word)
                cursor = b
            pieces.append(text[cursor:])
            out.append("".join(pieces))
        return out


def augment(cfg: AugmentConfig) -> Path:
    """Write the augmented train.tsv (and copies of the other files); returns the output folder."""
    from .tasks import split_files

    cfg.validate()
    task = get_task(cfg.task)
    source, out = Path(cfg.data_dir), Path(cfg.output)
    train = split_files(task, source)["train"]
    names, _ = scan_tsv(task, train)
    rows = [fields for _, fields in tsv_rows(train)]
    header = [] if task.tsv_columns is not None else ["\t".join(rows.pop(0))]
    columns = [names.index(c) for c in task.tsv_text]
    augmenter = Augmenter(cfg.mlm, cfg.top_k, cfg.batch_size, cfg.device)
    texts = sorted({row[c] for row in rows for c in columns})
    candidates = dict(zip(texts, augmenter.candidates(texts)))
    rng = np.random.default_rng(cfg.seed)
    written = list(header)
    for row in rows:
        written.append("\t".join(row))
        per_column = {c: augmenter.variants(row[c], candidates[row[c]], cfg.n_aug, cfg.p, rng) for c in columns}
        for v in range(cfg.n_aug):
            written.append("\t".join(per_column[c][v] if c in per_column else field for c, field in enumerate(row)))
    out.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        if file.is_file() and file.name != train.name:
            shutil.copy2(file, out / file.name)
    tmp = out / f".{train.name}.tmp"
    tmp.write_text("\n".join(written) + "\n", encoding="utf-8")
    tmp.replace(out / train.name)
    log.info("augmented %d training rows into %d (x%d variants, p = %s, top-%d of %s) in %s", len(rows),
             len(written) - len(header), cfg.n_aug, cfg.p, cfg.top_k, cfg.mlm, out)
    return out
