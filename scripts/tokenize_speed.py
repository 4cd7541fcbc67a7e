"""Tokenisation speed and memory of the general-distill corpus cache on a corpus of a given size.

    python scripts/tokenize_speed.py SOURCE.txt [--megabytes 100] [--tokenizer NAME_OR_PATH]

Builds a corpus of about ``--megabytes`` by repeating SOURCE's lines (each repeat numbered, so
the text is not one block copied), tokenises it with ``lrc_bert.corpus.tokenize_corpus`` into
a fresh cache and prints the tokens per second and the process's peak resident memory before
and after: the token ids go to a memory-mapped file in chunks, never to one Python list.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import tempfile
import time
from pathlib import Path

from lrc_bert.corpus import CorpusSource, tokenize_corpus
from lrc_bert.demo import default_teacher_model


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a text file, one document per line")
    parser.add_argument("--megabytes", type=float, default=100.0)
    parser.add_argument("--tokenizer", default=None, help="default: the installed MiniLM-L6's")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or default_teacher_model())
    lines = [line for line in args.source.read_text(encoding="utf-8").splitlines() if line.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        target, written, repeat = int(args.megabytes * 2**20), 0, 0
        with open(corpus, "w", encoding="utf-8") as f:
            while written < target:
                block = "\n".join(f"{line} ({repeat})" for line in lines) + "\n"
                f.write(block)
                written += len(block.encode())
                repeat += 1
        del lines, block
        before = peak_rss_mib()
        start = time.perf_counter()
        folder = tokenize_corpus(CorpusSource([str(corpus)]), tokenizer, Path(tmp) / "cache")
        seconds = time.perf_counter() - start
        meta = json.loads((folder / "meta.json").read_text())
    result = {"corpus_MiB": round(written / 2**20, 1), "documents": meta["documents"], "tokens": meta["tokens"],
              "seconds": round(seconds, 1), "tokens_per_second": round(meta["tokens"] / seconds),
              "peak_rss_MiB_before": round(before), "peak_rss_MiB_after": round(peak_rss_mib()),
              "token_file_MiB": round(meta["tokens"] * (2 if meta["dtype"] == "uint16" else 4) / 2**20, 1)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
