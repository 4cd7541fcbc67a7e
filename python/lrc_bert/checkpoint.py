"""Checkpoints: written atomically (a temporary folder renamed into place), verified, loaded safely.

Layout of ``checkpoints/step-00001234/``: one ``<module>.safetensors`` per trained module,
``trainer_state.pt`` (optimizer, scheduler, RNG states, data position; loaded with
``weights_only=True``), ``config.json`` and ``manifest.json``: the size and SHA-256 of every
other file, written last, before the rename. Loading verifies the manifest first, so a
truncated, zeroed or bit-flipped file is named, never loaded. A crash mid-write leaves a
hidden ``.*.tmp-*`` folder, never a half-written checkpoint; :func:`remove_stale` deletes
such leftovers at the next start, and pruning renames a folder away before deleting it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import torch

PREFIX = "step-"
MANIFEST = "manifest.json"
_STALE_MARKERS = (".tmp-", ".old-", ".trash-")  # hidden leftovers of an interrupted write or prune


class CorruptCheckpointError(ValueError):
    """A checkpoint or model folder whose files do not match its manifest; names the file."""


class DiskFullError(OSError):
    """The file system filled up during a save; the message says where."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """manifest.json: {relative path: {bytes, sha256}} of every file in ``folder``."""
    files = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1, sort_keys=True) + "\n")


def verify_directory(folder: Path) -> bool:
    """Check every file against ``manifest.json``; raise :class:`CorruptCheckpointError` naming the
    first bad one. Returns False for a folder written before manifests existed (nothing to check)."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(f"{manifest} is unreadable ({exc})") from None
    for name, meta in files.items():
        path = folder / name
        if not path.is_file():
            raise CorruptCheckpointError(f"{path} is missing (listed in {manifest})")
        size = path.stat().st_size
        if size != meta["bytes"]:
            raise CorruptCheckpointError(f"{path} has {size} bytes, the manifest says {meta['bytes']} (truncated?)")
        if _sha256(path) != meta["sha256"]:
            raise CorruptCheckpointError(f"{path} does not match its checksum in {manifest} (corrupted on disk)")
    return True


def remove_stale(folder: Path) -> list[Path]:
    """Delete the hidden temporary folders that a killed write or prune left in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if p.name.startswith(".") and any(m in p.name for m in _STALE_MARKERS)]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return stale


def _disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def atomic_directory(final: Path):
    """Yield a temporary folder; on success write its manifest, fsync it and rename it to ``final``
    (replacing it). A full disk raises :class:`DiskFullError` naming the folder; ``final`` is untouched."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
        write_manifest(tmp)
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
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if _disk_full(exc):
            free = shutil.disk_usage(final.parent).free
            raise DiskFullError(exc.errno, f"the disk is full: could not write {final} ({free} bytes free on "
                                           f"that file system); earlier checkpoints are intact. Free some space, "
                                           "then continue with --resume") from None
        raise
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
        # Renamed away first: a prune killed midway leaves a hidden folder, never a partial step-N.
        trash = old.parent / f".{old.name}.trash-{os.getpid()}"
        os.replace(old, trash)
        shutil.rmtree(trash, ignore_errors=True)
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
    """Verify the checkpoint against its manifest, load module weights in place and return the
    trainer state (safe loaders only). Any damaged file raises :class:`CorruptCheckpointError`
    naming it, before a single weight is changed."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    verify_directory(path)
    weights = {}
    for name in modules:
        file = path / f"{name}.safetensors"
        if not file.is_file():
            raise CorruptCheckpointError(f"checkpoint {path} has no {file.name}")
        try:
            weights[name] = load_file(str(file), device=str(device))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CorruptCheckpointError(f"{file} cannot be read ({exc})") from None
    state_file = path / "trainer_state.pt"
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling damaged bytes can raise almost anything
        raise CorruptCheckpointError(f"{state_file} cannot be read ({type(exc).__name__}: {exc})") from None
    for name, module in modules.items():
        try:
            module.load_state_dict(weights[name])
        except RuntimeError as exc:
            raise CorruptCheckpointError(f"{path / (name + '.safetensors')} does not fit the model ({exc})") from None
    return state
