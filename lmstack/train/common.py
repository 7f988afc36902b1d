"""Pure helpers the training loops share: schedules, optimizer groups, losses, batch order,
RNG states, MFU, metrics logging, distributed setup and state dicts.

Each stage (``pretrain.py``, ``sft.py``) is one flat loop; the state they share (model,
optimizer, checkpoints, log, progress) lives in ``lmstack.train.run.Run``, built on these.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmstack.errors import LMStackError
from lmstack.files import atomic_write, atomic_write_text
from lmstack.quant.linear import QuantEmbedding
from lmstack.train.config import LoopConfig
from lmstack.train.loss import linear_cross_entropy

IGNORE = -100


# -- schedules ------------------------------------------------------------------------------


def lr_at(step: int, cfg: LoopConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine
    (Loshchilov & Hutter 2017) or warmup-stable-decay (Hu et al. 2024, MiniCPM sec. 4)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        decay_start = int(cfg.max_steps * (1 - cfg.decay_fraction))
        if step < decay_start:
            return cfg.lr
        frac = (step - decay_start) / max(1, cfg.max_steps - decay_start)
        return cfg.lr - (cfg.lr - cfg.min_lr) * min(frac, 1.0)
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * frac)) * (cfg.lr - cfg.min_lr)


def make_optimizer(model: nn.Module, cfg: LoopConfig) -> torch.optim.AdamW:
    """AdamW with two groups: matrices decay, vectors (biases, norms, LoRA-free scalars) do not."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise LMStackError("the model has no trainable parameters")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=False)


# -- loss -----------------------------------------------------------------------------------


def token_loss_sum(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                   selective: bool = True, loss_chunk: int = 4096, **forward_kw) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropies over targets != IGNORE, and their count.

    ``selective`` computes logits only at positions that carry a target: with an
    assistant-only mask most of the (B, T, vocab) projection and softmax is skipped, and so
    is the last block's MLP at the other positions (``Transformer.forward(keep=...)``; FSDP
    needs the projection inside the wrapped forward, so it passes ``selective=False``).
    There, ``loss_chunk > 0`` fuses the projection and the loss over vocabulary chunks
    (``lmstack.train.loss``) so the (N, vocab) logits never exist, and a quantised tied
    embedding is read chunk by chunk instead of dequantised whole; ``loss_chunk=0`` projects
    in one matmul. The softmax runs in fp32.
    """
    keep = targets != IGNORE
    n = int(keep.sum())
    if not selective:
        logits = model(inputs, **forward_kw)[keep]  # (N, vocab)
        return F.cross_entropy(logits.float(), targets[keep], reduction="sum"), n
    if n < keep.numel():  # the last block's MLP and the final norm run on the target rows only
        h = model(inputs, return_hidden=True, keep=keep, **forward_kw)[0]  # (N, C)
    else:
        h = model(inputs, return_hidden=True, **forward_kw).flatten(0, 1)  # (N, C)
    core = model.module if hasattr(model, "module") else model
    table = core.tok_emb if core.config.tie_embeddings else None
    if loss_chunk > 0 and isinstance(table, QuantEmbedding):
        return linear_cross_entropy(h, None, targets[keep], loss_chunk, table.rows, table.num_embeddings), n
    if loss_chunk > 0:
        return linear_cross_entropy(h, core.output_weight, targets[keep], loss_chunk), n
    logits = F.linear(h, core.output_weight)  # (N, vocab)
    return F.cross_entropy(logits.float(), targets[keep], reduction="sum"), n


# -- batch order ----------------------------------------------------------------------------


class EpochOrder:
    """Deterministic order over ``n`` items: epoch ``e`` is a permutation seeded by (seed, e).

    The position is two integers, so a checkpoint stores it and a resumed run continues with
    the very same batches. ``take(k)`` crosses epoch boundaries without dropping items.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True, epoch: int = 0, cursor: int = 0):
        if n <= 0:
            raise LMStackError("the training data has no examples")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.cursor = epoch, cursor
        self._perm: Optional[np.ndarray] = None

    def _order(self) -> np.ndarray:
        if self._perm is None:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._perm = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        return self._perm

    def take(self, k: int) -> list[tuple[int, int]]:
        """The next ``k`` items as (epoch, index) pairs."""
        out: list[tuple[int, int]] = []
        while len(out) < k:
            if self.cursor >= self.n:
                self.epoch, self.cursor, self._perm = self.epoch + 1, 0, None
            j = min(self.n, self.cursor + k - len(out))
            out.extend((self.epoch, int(i)) for i in self._order()[self.cursor:j])
            self.cursor = j
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}


# -- RNG state ------------------------------------------------------------------------------


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> tuple[dict, dict]:
    """(JSON part, tensor part) of the python, numpy and torch RNG states."""
    py = random.getstate()
    npst = np.random.get_state()
    js = {"python": [py[0], list(py[1]), py[2]],
          "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    return js, tensors


def set_rng_state(js: dict, tensors: dict) -> None:
    py = js["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = js["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


# -- throughput -----------------------------------------------------------------------------


def flops_per_token(cfg, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 N plus attention, 12 L C T (PaLM, Chowdhery et al. 2022, app. B)."""
    n_emb = cfg.vocab_size * cfg.n_embd
    return 6 * (n_params - n_emb) + 6 * n_emb + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len


_GPU_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


def peak_flops(device: str, dtype: torch.dtype) -> float:
    """Dense bf16 peak for known GPUs; on a CPU, the measured throughput of a large matmul."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        for k, v in _GPU_PEAK.items():
            if k in name:
                return v if dtype == torch.bfloat16 else v / 2
        return 0.0
    a = torch.randn(1024, 1024, dtype=dtype)
    b = torch.randn(1024, 1024, dtype=dtype)
    a @ b
    t, n = time.perf_counter(), 0
    while time.perf_counter() - t < 0.3:
        a @ b
        n += 1
    return 2 * 1024 ** 3 * n / (time.perf_counter() - t)


# -- metrics --------------------------------------------------------------------------------


class MetricsLog:
    """Appends one JSON object per record to ``metrics.jsonl``; mirrors to TensorBoard when
    installed; ``plot()`` draws the loss curves to ``loss.png`` when matplotlib is installed."""

    def __init__(self, run_dir: Path, enabled: bool = True, resume_step: Optional[int] = None):
        self.path = run_dir / "metrics.jsonl"
        self.run_dir, self.enabled = run_dir, enabled
        self.tb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():  # drop what the killed run logged past its checkpoint
            keep = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= resume_step]
            atomic_write_text(self.path, "".join(ln + "\n" for ln in keep))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        if importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(ln) for ln in self.path.read_text().splitlines() if ln]

    def plot(self, title: str = "") -> Optional[Path]:
        if not self.enabled or importlib.util.find_spec("matplotlib") is None:
            return None
        return plot_losses(self.records(), self.run_dir / "loss.png", title)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def plot_losses(records: list[dict], out: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = [(r["step"], r["loss"]) for r in records if "loss" in r]
    va = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if tr:
        ax.plot(*zip(*tr), label="train loss", lw=1)
    if va:
        ax.plot(*zip(*va), "o-", label="val loss", ms=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return out


# -- distributed ----------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on GPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    d = Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if device.startswith("cuda"):
        torch.cuda.set_device(d.local_rank)
    return d


def wrap_model(model: nn.Module, dist_: Dist, strategy: str, device: str) -> nn.Module:
    if dist_.world <= 1:
        return model
    if strategy in ("auto", "ddp"):
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [dist_.local_rank] if device.startswith("cuda") else None
        return DDP(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def all_reduce_sum(x: float, dist_: Dist) -> float:
    if dist_.world <= 1:
        return x
    import torch.distributed as dist

    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def full_state_dict(model: nn.Module, dist_: Dist, trainable_only: bool) -> dict[str, torch.Tensor]:
    """Unsharded CPU state dict (collective under FSDP: every rank must call it)."""
    if dist_.world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        sd = model.state_dict()
    core = model.module if hasattr(model, "module") else model
    if trainable_only:
        names = {n for n, p in core.named_parameters() if p.requires_grad}
        sd = {k: v for k, v in sd.items() if k in names}
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def autocast(device: str, dtype: str):
    if dtype == "bfloat16":
        return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
    return contextlib.nullcontext()


def grad_norm_and_clip(params: list[torch.Tensor], max_norm: float) -> float:
    """Global grad norm (before clipping); clips in place when ``max_norm > 0``."""
    grads = [p for p in params if p.grad is not None]
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(grads, max_norm))
    return float(torch.nn.utils.clip_grad_norm_(grads, float("inf")))


# -- optimizer and model state for checkpoints -----------------------------------------------


def optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, dist_: Dist) -> dict:
    if dist_.world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return opt.state_dict()


def load_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, sd: dict, dist_: Dist) -> None:
    if dist_.world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, opt, sd, options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(sd)


def load_model_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], trainable_only: bool) -> None:
    own = dict(model.named_parameters()) if trainable_only else model.state_dict()
    want = {k for k, p in model.named_parameters() if p.requires_grad} if trainable_only else set(own)
    missing, unexpected = sorted(want - set(tensors)), sorted(set(tensors) - want)
    if missing or unexpected:
        raise LMStackError(f"checkpoint does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for k in want:
            own[k].copy_(tensors[k])
