"""Training checkpoints you can trust: atomic, verified, retained, resumable.

A run folder keeps ``checkpoints/step-00000120/`` folders, each holding

* ``model.safetensors``: the trained tensors (all of them, or only the PEFT ones),
* ``train_state.pt``: optimizer state and torch RNG states (read back with
  ``torch.load(weights_only=True)``, which never runs pickled code),
* ``state.json``: step, data position, python/numpy RNG states, metrics, the run config,
* ``manifest.json``: the sha256 and size of each file above, written last.

A save builds the folder under a hidden temporary name, fsyncs every file and the folder,
then renames it into place, so a kill at any moment leaves either no new checkpoint or a
complete one. A folder counts only when its manifest exists and every hash matches; temp
folders and damaged checkpoints are ignored and cleaned up. Retention runs only after the new
checkpoint is committed, and keeps the last ``keep_last`` plus the best by validation loss.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from lmstack.errors import LMStackError

PREFIX = "step-"
MANIFEST = "manifest.json"
FILES = ("model.safetensors", "train_state.pt", "state.json")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
                    train_state: dict[str, Any], state: dict[str, Any], keep_last: int = 2) -> Path:
    """Write ``step-{step:08d}`` atomically, then apply retention. Returns the folder."""
    from safetensors.torch import save_file

    _check_finite(model_tensors, "model")
    _check_finite(_optimizer_tensors(train_state.get("optimizer", {})), "optimizer")
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"{PREFIX}{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=ckpt_dir, prefix=f".{final.name}.tmp-"))
    try:
        save_file({k: v.contiguous() for k, v in model_tensors.items()}, str(tmp / "model.safetensors"))
        torch.save(train_state, tmp / "train_state.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=1))
        for name in FILES:
            _fsync_file(tmp / name)
        manifest = {"step": step, "files": {n: {"sha256": _sha256(tmp / n), "bytes": (tmp / n).stat().st_size}
                                            for n in FILES}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _fsync_file(tmp / MANIFEST)
        _fsync_dir(tmp)
        if final.exists():  # a re-save of the same step (after a resume): swap it out
            old = ckpt_dir / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(ckpt_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    apply_retention(ckpt_dir, keep_last)
    return final


def is_valid(folder: Path) -> bool:
    """True when the manifest exists and every listed file has its recorded size and sha256."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        for name, info in manifest["files"].items():
            p = folder / name
            if p.stat().st_size != info["bytes"] or _sha256(p) != info["sha256"]:
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


def _val_loss(p: Path) -> float:
    try:
        v = json.loads((p / "state.json").read_text()).get("metrics", {}).get("val_loss")
    except (OSError, ValueError):
        return float("inf")
    return float(v) if v is not None else float("inf")


def apply_retention(ckpt_dir: Path, keep_last: int) -> list[str]:
    """Keep the last ``keep_last`` valid checkpoints and the best by val loss; delete the rest.

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
    scored = [p for p in valid if _val_loss(p) < float("inf")]
    if scored:
        keep.add(min(scored, key=_val_loss))
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
