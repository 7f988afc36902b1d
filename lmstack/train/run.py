"""One training run: the state every stage's loop shares, so that a loop keeps only its
batching and its loss.

A stage reads top to bottom::

    run = Run.start(cfg, "dpo", resume, trainable_only=True)  # processes, out_dir check, seeds
    policy = ...                                   # built under the seed, unwrapped
    run.resume(policy)                             # a resumed run: weights, step, data position
    run.prepare(policy, len(pairs), evaluate=evaluate, best_metric="val_reward_acc", best_mode="max")
    for _ in run.steps():                          # sets the step's learning rate
        for k, mb in enumerate(micro_batches):
            with run.micro_batch(last=k == len(micro_batches) - 1):
                loss = ...; loss.backward()
        run.end_step(loss_value, metrics={"reward_acc": acc}, tokens=n)
    final = run.final_model(build)                 # whole on rank 0, also under FSDP
    return run.finish("dpo")

``end_step`` does, in this order: global-norm clipping, the non-finite check (stop, or skip
the update, up to ``max_skips_in_a_row`` skips in a row), the optimizer step (an overflow
in it stops the run), the step record, evaluation every ``eval_interval`` steps and
at the last, best-metric tracking, the record to ``metrics.jsonl`` every ``log_interval``
steps (and at every evaluation, skip and the last step), the progress bar, and a checkpoint
every ``ckpt_interval`` steps and at the last. The schedule (``lr_at``) is set by ``steps()``.

What a checkpoint holds is the run's own state: the trained tensors (all, or only the
trainable ones), the optimizer, the RNG states, the data position ``(epoch, cursor)`` of
``run.order``, the loss and the best metric, the config, and the stage's ``meta``.

Deliberately left out: callbacks and hooks (a stage that needs more writes it in its loop),
more than one optimizer per run, and fp16 loss scaling (bf16 needs none).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional

import torch
import torch.nn as nn

from lmstack.config import config_to_dict
from lmstack.errors import LMStackError
from lmstack.train.checkpoint import ensure_fresh, latest_checkpoint, load_checkpoint_state, save_checkpoint
from lmstack.train.common import (Dist, EpochOrder, MetricsLog, all_reduce_sum, autocast, full_state_dict,
                                  grad_norm_and_clip, init_distributed, load_model_tensors, load_optimizer_state,
                                  lr_at, make_optimizer, optimizer_state, peak_flops, rng_state, seed_all,
                                  set_rng_state, wrap_model)
from lmstack.train.config import LoopConfig

Evaluate = Callable[[nn.Module], dict[str, float]]


class Run:
    """Model, optimizer, processes, checkpoints, metrics log, progress bar and best metric of
    one training run. Build it with ``Run.start``; see the module docstring for the order."""

    def __init__(self, cfg: LoopConfig, name: str, dist: Dist, resuming: bool, trainable_only: bool):
        self.cfg, self.name, self.dist = cfg, name, dist
        self.resuming, self.trainable_only = resuming, trainable_only
        self.dir = Path(cfg.out_dir)
        self.ckpts = self.dir / "checkpoints"
        self.step = 0
        self.losses: list[float] = []
        self.lr = cfg.lr
        self._checkpoint: Optional[Path] = None  # the one to resume from
        self._resumed: Optional[tuple[dict, dict]] = None  # (state, train_state) read from it
        self._resume_done = False
        self._t0 = 0.0
        self._skips_in_a_row = 0
        self.bar = None

    # -- set-up ---------------------------------------------------------------------------

    @classmethod
    def start(cls, cfg: LoopConfig, name: str, resume: bool = False, trainable_only: bool = False) -> "Run":
        """Check ``cfg``, join the process group under torchrun, refuse an ``out_dir`` that holds
        another run's checkpoints (unless resuming) and seed every RNG. Call it before the model
        is built, so the model's initialisation follows the seed. ``trainable_only``: checkpoints
        hold only the tensors that train (PEFT adapters), not the frozen base."""
        cfg.check()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        run = cls(cfg, name, init_distributed(cfg.device), resume, trainable_only)
        run._checkpoint = latest_checkpoint(run.ckpts) if resume else None
        if resume and run._checkpoint is None:
            raise LMStackError(f"--resume: no complete checkpoint under {run.ckpts}")
        if not resume:
            ensure_fresh(run.ckpts)
        seed_all(cfg.seed)
        return run

    def resume(self, model: nn.Module) -> bool:
        """When the run resumes: load the newest checkpoint that verifies into ``model`` (still
        unwrapped) and move the step and data position to where it stopped; the optimizer and
        RNG states follow in ``prepare``. A fresh run: nothing. Returns whether it resumed."""
        self._resume_done = True
        if not self.resuming:
            return False
        tensors, train_state, state = load_checkpoint_state(self._checkpoint)
        load_model_tensors(model, tensors, self.trainable_only)
        self.step = state["step"]
        self._resumed = state, train_state
        if self.dist.main:
            print(f"{self.name}: resuming from step {self.step} ({self._checkpoint})")
        return True

    def prepare(self, model: nn.Module, n_examples: int, evaluate: Optional[Evaluate] = None,
                best_metric: str = "val_loss", best_mode: Literal["min", "max"] = "min",
                meta: Optional[dict[str, Any]] = None, flops_per_token: float = 0.0) -> None:
        """Wrap ``model`` for DDP/FSDP, build its AdamW, restore the optimizer and RNG states of
        a resumed run, compile if ``cfg.compile``, and open the metrics log.

        ``n_examples``: the size of the data ``run.order`` walks. ``evaluate(model)`` returns
        a dict of metrics (it runs in eval mode, without gradients, under autocast); its
        ``best_metric`` is tracked (``best_mode`` min or max) and retention keeps the best
        checkpoint by it. ``meta`` goes into every checkpoint's state.json beside the config.
        ``flops_per_token`` > 0 adds MFU to each record.
        """
        cfg = self.cfg
        if self.resuming and not self._resume_done:
            raise LMStackError("Run.prepare: call run.resume(model) first, so a resumed run loads its weights")
        state, train_state = self._resumed or ({}, {})
        self.order = EpochOrder(n_examples, cfg.seed, **state.get("data", {}))
        self.evaluate, self.best_metric, self.best_mode = evaluate, best_metric, best_mode
        worst = float("inf") if best_mode == "min" else float("-inf")
        self.best = state.get("metrics", {}).get(f"best_{best_metric}", worst)
        self.meta = {"config": config_to_dict(cfg), **(meta or {})}
        self.flops_per_token = flops_per_token
        self.peak = 0.0
        if flops_per_token:  # measured on a CPU with a matmul: before the RNG states are restored
            self.peak = cfg.peak_flops or peak_flops(cfg.device, torch.bfloat16 if cfg.dtype == "bfloat16"
                                                     else torch.float32)
        self.model = wrap_model(model, self.dist, cfg.distributed, cfg.device)
        self.core = self.model.module if hasattr(self.model, "module") else self.model
        self.fsdp = self.dist.world > 1 and cfg.distributed == "fsdp"
        self.opt = make_optimizer(self.model, cfg)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self._wrapped = self.model  # state dicts come from here: compile would prefix their keys
        if state:
            load_optimizer_state(self.model, self.opt, train_state["optimizer"], self.dist)
            set_rng_state(state["rng"], train_state["rng"])
        if cfg.compile:  # input shapes that vary (SFT's chat batches) each compile once, at first sight
            self.model = torch.compile(self.model)
        self.metrics = MetricsLog(self.dir, enabled=self.dist.main, resume_step=self.step if self.resuming else None)
        self.model.train()

    # -- the loop -------------------------------------------------------------------------

    def steps(self) -> Iterator[int]:
        """Yield each optimizer step's index (0-based) until ``max_steps``, its learning rate
        set; the loop body ends each one with ``end_step``. The progress bar lives meanwhile."""
        if self.dist.main and self.cfg.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=self.cfg.max_steps, initial=self.step, desc=self.name, dynamic_ncols=True)
        while self.step < self.cfg.max_steps:
            self._t0 = time.perf_counter()
            self.lr = lr_at(self.step, self.cfg)
            for g in self.opt.param_groups:
                g["lr"] = self.lr
            before = self.step
            yield self.step
            if self.step == before:
                raise LMStackError("a training loop must call run.end_step() once per step")
        self._close_bar()

    @contextlib.contextmanager
    def micro_batch(self, last: bool = True) -> Iterator[None]:
        """Context for one micro-batch's forward and backward: autocast, and under DDP no
        gradient all-reduce until the ``last`` micro-batch of the step."""
        sync = last or self.dist.world == 1 or self.fsdp
        with (contextlib.nullcontext() if sync else self.model.no_sync()), autocast(self.cfg.device, self.cfg.dtype):
            yield

    def reduce_sum(self, x: float) -> float:
        """``x`` summed over the processes (itself in one process)."""
        return all_reduce_sum(x, self.dist)

    def end_step(self, loss: float, metrics: Optional[dict[str, Any]] = None, tokens: int = 0) -> Optional[dict]:
        """Finish the step whose gradients are accumulated: clip, check, update, record,
        evaluate, log, checkpoint. ``loss``: the step's loss over all processes; ``metrics``:
        the stage's own values for the record; ``tokens``: what this process ran (for
        tokens/s and MFU). Returns the record, or None for a skipped non-finite step."""
        cfg = self.cfg
        gnorm = grad_norm_and_clip(self.params, cfg.grad_clip)
        bad = [f"{what} ({v})" for what, v in (("loss", loss), ("gradient norm", gnorm)) if not math.isfinite(v)]
        if bad:
            return self._skip(f"non-finite {' and '.join(bad)} at step {self.step + 1}")
        try:
            self.opt.step()
        except RuntimeError as e:  # a step size or decay factor beyond the parameters' float range
            if "overflow" not in str(e):
                raise
            # The optimizer may have updated some tensors before it failed: skipping could only
            # continue from a state no checkpoint holds, so this always stops.
            self._stop(f"the optimizer step overflowed at step {self.step + 1} ({e}); stopping, whatever "
                       "on_nonfinite says, since the update may be half applied", "Lower lr")
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self._skips_in_a_row = 0
        dt = time.perf_counter() - self._t0
        tps = self.reduce_sum(tokens) / dt
        rec = {"step": self.step, "loss": loss, "lr": self.lr, "grad_norm": gnorm, "tokens_per_s": tps,
               "step_time_s": dt}
        if self.flops_per_token:
            rec["mfu"] = tps * self.flops_per_token / (self.peak * self.dist.world) if self.peak else None
        rec.update(epoch=self.order.epoch, **(metrics or {}))
        self.losses.append(loss)
        last = self.step == cfg.max_steps
        evaluated = self.evaluate is not None and (self.step % cfg.eval_interval == 0 or last)
        if evaluated:
            rec.update(self._evaluate())
            if self.best_metric in rec:
                pick = min if self.best_mode == "min" else max
                self.best = pick(self.best, rec[self.best_metric])
        if self.bar is not None:
            self.bar.update(1)
        if self.step % cfg.log_interval == 0 or evaluated or last:
            self.metrics.log(rec)
            if self.bar is not None:
                self.bar.set_postfix(self._postfix(rec))
        if self.step % cfg.ckpt_interval == 0 or last:
            self.save(rec)
        return rec

    def _skip(self, msg: str) -> None:
        """The non-finite guard: stop (``on_nonfinite: stop``), or drop this update and go on,
        up to ``max_skips_in_a_row`` skipped steps in a row."""
        cfg = self.cfg
        if cfg.on_nonfinite == "stop":
            self._stop(f"{msg}; stopping (on_nonfinite: stop)")
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self._skips_in_a_row += 1
        self.metrics.log({"step": self.step, "skipped": msg})
        if self.bar is not None:
            self.bar.update(1)
        if self.dist.main:
            self._say(f"{self.name}: {msg}: update skipped (on_nonfinite: skip)")
        if self._skips_in_a_row >= cfg.max_skips_in_a_row:
            self._stop(f"{self._skips_in_a_row} steps in a row were skipped, the last for a {msg} "
                       f"(max_skips_in_a_row: {cfg.max_skips_in_a_row}); stopping", "Lower lr or check the data")
        if self.step == cfg.max_steps and not self.losses:
            self._stop(f"all {self._skips_in_a_row} steps of this run were skipped, the last for a {msg}; nothing "
                       "was trained, so no final model is written", "Lower lr or check the data")

    def _stop(self, msg: str, hint: str = "Lower lr, check the data, or set on_nonfinite: skip") -> None:
        self._close_bar()
        raise LMStackError(f"{msg}. Last good checkpoint: {latest_checkpoint(self.ckpts) or 'none yet'}. {hint}")

    def _say(self, line: str) -> None:
        """A line on stderr that does not break the progress bar."""
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr)

    def _evaluate(self) -> dict[str, float]:
        self.model.eval()
        with torch.no_grad(), autocast(self.cfg.device, self.cfg.dtype):
            out = self.evaluate(self.model)
        self.model.train()
        return out

    @staticmethod
    def _postfix(rec: dict) -> dict[str, str]:
        post = {"loss": f"{rec['loss']:.3f}", "tok_s": f"{rec['tokens_per_s']:,.0f}"}
        if "mfu" in rec:
            post["mfu"] = f"{rec['mfu'] or 0:.1%}"
        return post

    # -- checkpoints and the end ----------------------------------------------------------

    def save(self, rec: dict) -> None:
        """Checkpoint the current step with the loss (and best metric) of its record ``rec``.
        Collective: every process calls it; rank 0 writes."""
        tensors = full_state_dict(self._wrapped, self.dist, self.trainable_only)
        opt_sd = optimizer_state(self._wrapped, self.opt, self.dist)
        if self.dist.main:
            js, rt = rng_state()
            metrics = {"loss": rec["loss"], f"best_{self.best_metric}": self.best}
            if self.best_metric in rec:
                metrics[self.best_metric] = rec[self.best_metric]
            save_checkpoint(self.ckpts, self.step, tensors, {"optimizer": opt_sd, "rng": rt},
                            {"data": self.order.state(), "rng": js, "metrics": metrics, **self.meta},
                            keep_last=self.cfg.keep_last, best=self.best_metric, mode=self.best_mode)
        if self.dist.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def final_model(self, build: Callable[[], nn.Module]) -> Optional[nn.Module]:
        """The trained model, whole, on rank 0 (None on the others): the unwrapped model, or
        under FSDP a fresh ``build()`` loaded with the gathered tensors (collective)."""
        if not self.fsdp:
            return self.core if self.dist.main else None
        tensors = full_state_dict(self._wrapped, self.dist, self.trainable_only)
        if not self.dist.main:
            return None
        final = build()
        load_model_tensors(final, tensors, self.trainable_only)
        return final

    def finish(self, title: str = "") -> dict[str, Any]:
        """Close the bar and the log, draw ``loss.png`` (rank 0) and return the summary:
        run_dir, steps, the loss of every step, and the plot's path on rank 0."""
        self._close_bar()
        summary: dict[str, Any] = {"run_dir": str(self.dir), "steps": self.step, "losses": self.losses}
        if self.dist.main:
            summary["plot"] = str(self.metrics.plot(title or self.name) or "")
        self.metrics.close()
        return summary

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
