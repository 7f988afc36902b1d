"""Training checkpoints you can trust: atomic, verified, retained, resumable.

A run folder keeps ``checkpoints/step-00000120/`` folders, each holding

* ``model.safetensors``: the trained tensors (all of them, or only the PEFT ones),
* ``train_state.pt``: optimizer state and torch RNG states (read back with
  ``torch.load(weights_only=True)``, which never runs pickled code),
* ``state.json``: step, data position, python/numpy RNG states, metrics, the run config,
* ``manifest.json``: the sha256 and size of each file above, written last.

A save builds the folder under a hidden temporary name (``lmstack.files.atomic_dir``), fsyncs
every file and the folder, renames it into place and fsyncs the parent, so a kill at any
moment leaves either no new checkpoint or a complete one. A folder counts only when its
manifest exists and every hash matches; temp folders and damaged checkpoints are ignored and
cleaned up. Retention runs only after the new checkpoint is committed, and keeps the last
``keep_last`` plus the best by the run's best metric (validation loss unless the stage names
another).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from lmstack.errors import LMStackError
from lmstack.files import atomic_dir, file_sha256

PREFIX = "step-"
MANIFEST = "manifest.json"
FILES = ("model.safetensors", "train_state.pt", "state.json")


def _check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    for k, v in tensors.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise LMStackError(f"refusing to write a checkpoint: {what} tensor {k!r} has non-finite values")


def _optimizer_tensors(opt_state: dict) -> dict[str, torch.Tensor]:
    out = {}
    for pid, st in opt_state.get("state", {}).items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                out[f"{pid}.{k}"] = v
    return out


def save_checkpoint(ckpt_dir: str | os.PathLike, step: int, model_tensors: dict[str, torch.Tensor],
                    train_state: dict[str, Any], state: dict[str, Any], keep_last: int = 2,
                    best: str = "val_loss", mode: Literal["min", "max"] = "min") -> Path:
    """Write ``step-{step:08d}`` atomically, then apply retention (keeping the best checkpoint
    by ``state["metrics"][best]``, lowest or highest by ``mode``). Returns the folder."""
    from safetensors.torch import save_file

    _check_finite(model_tensors, "model")
    _check_finite(_optimizer_tensors(train_state.get("optimizer", {})), "optimizer")
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"{PREFIX}{step:08d}"
    with atomic_dir(final) as tmp:  # a re-save of the same step (after a resume) swaps the old one out
        save_file({k: v.contiguous() for k, v in model_tensors.items()}, str(tmp / "model.safetensors"))
        torch.save(train_state, tmp / "train_state.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=1))
        manifest = {"step": step, "files": {n: {"sha256": file_sha256(tmp / n), "bytes": (tmp / n).stat().st_size}
                                            for n in FILES}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    apply_retention(ckpt_dir, keep_last, best, mode)
    return final


def is_valid(folder: Path) -> bool:
    """True when the manifest exists and every listed file has its recorded size and sha256."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        for name, info in manifest["files"].items():
            p = folder / name
            if p.stat().st_size != info["bytes"] or file_sha256(p) != info["sha256"]:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _committed(ckpt_dir: Path) -> list[Path]:
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
             and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def clean_partial(ckpt_dir: Path) -> list[str]:
    """Remove temp folders that a killed save left behind. Returns their names."""
    removed = []
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
    return removed


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Optional[Path]:
    """The newest checkpoint that verifies; partial and damaged ones are skipped."""
    ckpt_dir = Path(ckpt_dir)
    clean_partial(ckpt_dir)
    for p in reversed(_committed(ckpt_dir)):
        if is_valid(p):
            return p
    return None


def ensure_fresh(ckpt_dir: Path) -> None:
    """A new run must not write into a folder that holds another run's checkpoints."""
    if latest_checkpoint(ckpt_dir) is not None:
        raise LMStackError(f"{ckpt_dir} already holds checkpoints; pass --resume to continue that run, "
                           "or choose another out_dir")


def _score(p: Path, best: str, mode: str) -> float:
    """The checkpoint's ``best`` metric as a loss (lower is better); inf when it has none."""
    try:
        v = json.loads((p / "state.json").read_text()).get("metrics", {}).get(best)
    except (OSError, ValueError):
        return float("inf")
    if v is None:
        return float("inf")
    return float(v) if mode == "min" else -float(v)


def apply_retention(ckpt_dir: Path, keep_last: int, best: str = "val_loss", mode: str = "min") -> list[str]:
    """Keep the last ``keep_last`` valid checkpoints and the best by the ``best`` metric
    (``mode`` min or max); delete the rest.

    Called only after a new checkpoint is committed, so the newest good one always survives.
    Damaged folders older than the newest valid one are removed too.
    """
    if keep_last <= 0:
        return []
    all_ = _committed(ckpt_dir)
    valid = [p for p in all_ if is_valid(p)]
    if not valid:
        return []
    keep = set(valid[-keep_last:])
    scored = [p for p in valid if _score(p, best, mode) < float("inf")]
    if scored:
        keep.add(min(scored, key=lambda p: _score(p, best, mode)))
    newest = valid[-1]
    removed = []
    for p in all_:
        if p not in keep and int(p.name[len(PREFIX):]) <= int(newest.name[len(PREFIX):]):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed


def load_checkpoint_state(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(model tensors, train_state, state) of a verified checkpoint folder."""
    from safetensors.torch import load_file

    if not is_valid(folder):
        raise LMStackError(f"{folder}: checkpoint does not verify against its manifest")
    tensors = load_file(str(folder / "model.safetensors"))
    train_state = torch.load(folder / "train_state.pt", weights_only=True)
    state = json.loads((folder / "state.json").read_text())
    return tensors, train_state, state
