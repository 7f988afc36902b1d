"""Direct preference optimisation and its variants: ``lmstack dpo CONFIG.yaml``.

Data: preference pairs (``lmstack.train.align_data``, TRL's formats). A micro-batch is the
``batch_size`` chosen completions followed by their rejected ones, one right-padded forward
of ``2 x batch_size`` rows; each completion's log-likelihood is summed over its tokens
(``align_common.completion_logps``) and the loss of ``cfg.loss`` (a row of ``LOSSES``,
pure functions in ``align_loss``) is averaged over the pairs.

The reference policy: under LoRA/QLoRA (any PEFT method) it is the same model with its
adapters passed through, run without gradients each step, or once before training with
``precompute_ref``. Under full fine-tuning it is the starting weights, so their log-probs are
computed once before the first step and kept in the run folder (a resumed run reads them
back); a ``ref_model`` instead keeps a second model in memory. SimPO and ORPO use none.

Logged each step: the implicit rewards of chosen and rejected, their margin, the preference
accuracy (chosen reward above rejected, ties count half, so an untrained LoRA policy, all
rewards 0, scores chance), and the mean log-probs; the evaluation adds the same on the
held-out pairs (``val_reward_acc`` picks the best checkpoint). Plots: ``loss.png`` and
``rewards.png``. Deliberately left out: TRL's other loss types, loss mixtures, WPO
weighting, padding-free packing of pairs, and synced (moving) reference models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lmstack.errors import LMStackError
from lmstack.peft.core import describe_params
from lmstack.train.align_common import (cached_logps, collate, completion_logps, encode, load_policy,
                                        load_reference, pad_id, plot_metrics, reference_logps, save_final)
from lmstack.train.align_config import REFERENCE_FREE, DPOConfig
from lmstack.train.align_data import PrefExample, read_preference
from lmstack.train.align_loss import Rewards, dpo_loss, hinge_loss, ipo_loss, orpo_loss, robust_dpo_loss, simpo_loss
from lmstack.train.common import autocast
from lmstack.train.run import Run


@dataclass
class PairLogps:
    """Sequence log-probs and completion lengths of a batch of pairs, each ``(B,)``."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    n_chosen: torch.Tensor
    n_rejected: torch.Tensor


LOSSES: dict[str, Callable[[PairLogps, DPOConfig], Rewards]] = {
    "sigmoid": lambda p, c: dpo_loss(p.chosen, p.rejected, p.ref_chosen, p.ref_rejected, c.beta, c.label_smoothing),
    "robust": lambda p, c: robust_dpo_loss(p.chosen, p.rejected, p.ref_chosen, p.ref_rejected, c.beta,
                                           c.label_smoothing),
    "hinge": lambda p, c: hinge_loss(p.chosen, p.rejected, p.ref_chosen, p.ref_rejected, c.beta),
    "ipo": lambda p, c: ipo_loss(p.chosen, p.rejected, p.ref_chosen, p.ref_rejected, p.n_chosen, p.n_rejected, c.beta),
    "simpo": lambda p, c: simpo_loss(p.chosen, p.rejected, p.n_chosen, p.n_rejected, c.beta, c.simpo_gamma,
                                     c.label_smoothing),
    "orpo": lambda p, c: orpo_loss(p.chosen, p.rejected, p.n_chosen, p.n_rejected, c.orpo_lambda),
}

Pair = tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]  # (chosen, rejected) encodings


def encode_pairs(tok, rows: list[PrefExample], cfg: DPOConfig, field: str) -> list[Pair]:
    """Each pair's chosen and rejected encodings; a pair whose completions do not fit is left out."""
    out = []
    for r in rows:
        c = encode(tok, r.prompt, r.chosen, cfg.max_len, cfg.max_prompt_len)
        j = encode(tok, r.prompt, r.rejected, cfg.max_len, cfg.max_prompt_len)
        if c is not None and j is not None:
            out.append((c, j))
    if not out:
        raise LMStackError(f"{field}: no pair keeps a completion token within max_len {cfg.max_len} "
                           f"(max_prompt_len {cfg.max_prompt_len})")
    if len(out) < len(rows):
        print(f"dpo: {field}: {len(rows) - len(out)} of {len(rows)} pairs left out (no completion token fits max_len)")
    return out


def pair_stats(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, float]:
    """Sums over the pairs (divide by their count): rewards, margin and preference accuracy
    (ties count half)."""
    w, l_ = chosen_rewards.float(), rejected_rewards.float()
    acc = (w > l_).float() + 0.5 * (w == l_).float()
    return {"rewards_chosen": float(w.sum()), "rewards_rejected": float(l_.sum()),
            "margin": float((w - l_).sum()), "reward_acc": float(acc.sum())}


def dpo(cfg: DPOConfig, resume: bool = False) -> dict:
    method = cfg.peft.method
    run = Run.start(cfg, f"dpo {cfg.loss} ({method})", resume, trainable_only=method != "full")
    train_rows = read_preference(cfg.data, "data")  # read before the model loads: a bad line fails at once
    val_rows = read_preference(cfg.val_data, "val_data") if cfg.val_data else []
    model, tok = load_policy(cfg)
    if run.dist.main:
        print(f"dpo: {cfg.loss}, {method}, {describe_params(model)}")
    train = encode_pairs(tok, train_rows, cfg, "data")
    val = encode_pairs(tok, val_rows, cfg, "val_data") if val_rows else []
    pad, selective = pad_id(tok), not (run.dist.world > 1 and cfg.distributed == "fsdp")
    world, rank = run.dist.world, run.dist.rank
    rows, accum = cfg.batch_size * world, cfg.grad_accum or 1

    use_ref = cfg.loss not in REFERENCE_FREE
    ref_model = load_reference(cfg.ref_model, cfg) if use_ref and cfg.ref_model else None
    precomputed = {}
    if use_ref and ref_model is None and (method == "full" or cfg.precompute_ref):
        # The weights are still the starting ones here (run.resume has not loaded anything yet).
        def compute(items):
            return reference_logps(model.eval(), collate(items, pad), None, cfg.loss_chunk, selective)
        for name, pairs in (("train", train), ("val", val)):
            if pairs:
                items = [c for c, _ in pairs] + [j for _, j in pairs]
                both = cached_logps(run.dir / f"ref_logps_{name}.pt", items, compute, 2 * cfg.batch_size,
                                    reuse=resume, main=run.dist.main)
                precomputed[name] = both.view(2, len(pairs)).t()  # (pairs, 2): chosen, rejected
        model.train()

    def pair_logps(m, pairs: list[Pair], idx: list[int], split: str) -> PairLogps:
        b = collate([c for c, _ in pairs] + [j for _, j in pairs], pad)
        logps, n = completion_logps(m, b["input_ids"].to(cfg.device), b["completion_mask"].to(cfg.device),
                                    cfg.loss_chunk, selective)
        if not use_ref:
            ref = torch.zeros_like(logps)
        elif split in precomputed:
            ref = precomputed[split][idx].t().reshape(-1).to(logps)
        else:
            ref = reference_logps(m, {k: v.to(cfg.device) for k, v in b.items()}, ref_model, cfg.loss_chunk,
                                  selective).to(logps)
        k = len(pairs)
        return PairLogps(logps[:k], logps[k:], ref[:k], ref[k:], n[:k], n[k:])

    def evaluate(m) -> dict:
        sums = {"loss": 0.0, "rewards_chosen": 0.0, "rewards_rejected": 0.0, "margin": 0.0, "reward_acc": 0.0}
        count = 0
        for i in range(rank * cfg.batch_size, len(val), rows):
            idx = list(range(i, min(i + cfg.batch_size, len(val))))
            p = pair_logps(m, [val[j] for j in idx], idx, "val")
            losses, w, l_ = LOSSES[cfg.loss](p, cfg)
            for k, v in {"loss": float(losses.sum()), **pair_stats(w, l_)}.items():
                sums[k] += v
            count += len(idx)
        n = max(1.0, run.reduce_sum(count))
        return {f"val_{k}": run.reduce_sum(v) / n for k, v in sums.items()}

    run.resume(model)
    run.prepare(model, len(train), evaluate=evaluate if val else None, best_metric="val_reward_acc", best_mode="max",
                meta={"loss": cfg.loss})
    if val and not resume:  # the held-out accuracy before any update (chance for LoRA: all rewards are 0)
        model.eval()
        with torch.no_grad(), autocast(cfg.device, cfg.dtype):
            before = evaluate(run.model)
        model.train()
        run.metrics.log({"step": 0, **before})
        if run.dist.main:
            print(f"before: held-out preference accuracy {before['val_reward_acc']:.3f}")
    for _ in run.steps():
        sums, n_pairs, n_tok = {}, 0, 0
        for k in range(accum):
            idx = [i for _, i in run.order.take(rows)][rank * cfg.batch_size:(rank + 1) * cfg.batch_size]
            with run.micro_batch(last=k == accum - 1):
                p = pair_logps(run.model, [train[i] for i in idx], idx, "train")
                losses, w, l_ = LOSSES[cfg.loss](p, cfg)
                (losses.mean() / accum).backward()
            stats = {"loss": float(losses.detach().sum()), **pair_stats(w, l_),
                     "logps_chosen": float(p.chosen.detach().sum()), "logps_rejected": float(p.rejected.detach().sum())}
            for key, v in stats.items():
                sums[key] = sums.get(key, 0.0) + v
            n_pairs += len(idx)
            n_tok += int(p.n_chosen.sum() + p.n_rejected.sum())
        total = run.reduce_sum(n_pairs)
        mean = {key: run.reduce_sum(v) / total for key, v in sums.items()}
        run.end_step(mean.pop("loss"), tokens=n_tok, metrics=mean)

    final = run.final_model(lambda: load_policy(cfg)[0])
    if final is not None:
        save_final(final, tok, cfg, run, f"lmstack dpo ({cfg.loss})")
        plot_metrics(run.metrics.records(), run.dir / "rewards.png",
                     ["rewards_chosen", "rewards_rejected", "margin", "val_margin"], f"dpo {cfg.loss}: rewards")
    records = run.metrics.records()
    summary = run.finish(f"dpo {cfg.loss} ({method})")
    vals = [r["val_reward_acc"] for r in records if "val_reward_acc" in r]
    if vals:
        summary.update(val_reward_acc_before=vals[0] if not resume else None, val_reward_acc=vals[-1])
    return summary
