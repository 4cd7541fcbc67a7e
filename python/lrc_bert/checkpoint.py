"""Checkpoints: written atomically (a temporary folder renamed into place), loaded safely.

Layout of ``checkpoints/step-00001234/``: one ``<module>.safetensors`` per trained module,
``trainer_state.pt`` (optimizer, scheduler, RNG states, data position; loaded with
``weights_only=True``) and ``config.json``. A crash mid-write leaves a ``.tmp-*`` folder
that is ignored and cleaned up, never a half-written checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import torch

PREFIX = "step-"


@contextlib.contextmanager
def atomic_directory(final: Path):
    """Yield a temporary folder; on success fsync it and rename it to ``final`` (replacing it)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for path in tmp.rglob("*"):
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        trash = final.parent / f".{final.name}.old-{os.getpid()}"
        if final.exists():
            os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_checkpoint(folder: Path, step: int, modules: dict, trainer_state: dict, config: dict, keep: int) -> Path:
    from safetensors.torch import save_file

    final = Path(folder) / f"{PREFIX}{step:08d}"
    with atomic_directory(final) as tmp:
        for name, module in modules.items():
            state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
            save_file(state, str(tmp / f"{name}.safetensors"))
        torch.save(trainer_state, tmp / "trainer_state.pt")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(folder: Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[5:].isdigit())


def latest_checkpoint(folder: Path) -> Optional[Path]:
    found = list_checkpoints(folder)
    return found[-1] if found else None


def load_checkpoint(path: Path, modules: dict, device: torch.device) -> dict:
    """Load module weights in place; return the trainer state (safe loaders only)."""
    from safetensors.torch import load_file

    path = Path(path)
    for name, module in modules.items():
        file = path / f"{name}.safetensors"
        if not file.is_file():
            raise FileNotFoundError(f"checkpoint {path} has no {file.name}")
        module.load_state_dict(load_file(str(file), device=str(device)))
    return torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
