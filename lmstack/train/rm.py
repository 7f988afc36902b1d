"""Reward-model training on preference pairs: ``lmstack rm CONFIG.yaml``.

The model is ``RewardModel`` (the core + a scalar head on the last token). Each pair's
chosen and rejected answers run in one batch of ``2B`` right-padded rows; the loss is the
Bradley-Terry negative log-likelihood of the preference, with an optional margin and an
optional centring term (TRL's ``center_rewards_coefficient``). Validation reports the loss,
the accuracy (the share of held-out pairs where the chosen answer scores higher; a tie
counts as wrong) and the mean margin ``r_chosen - r_rejected``. The trained model is saved
to ``<out_dir>/reward_model`` (see ``reward_model.py``), which ``RewardModel.load`` reads.
Full fine-tuning, LoRA or QLoRA; the head always trains.
Deliberately left out: per-pair margins read from the data, and ensembles of reward models.
"""

from __future__ import annotations

import math

import torch

from lmstack.errors import LMStackError
from lmstack.peft.core import apply_peft, base_loader, describe_params
from lmstack.train.align_common import collate, encode, pad_id, plot_metrics
from lmstack.train.align_data import read_preference
from lmstack.train.align_loss import bradley_terry_loss
from lmstack.train.reward_model import RewardModel
from lmstack.train.rm_config import RMConfig
from lmstack.train.run import Run

# (chosen, rejected), each (prompt ids, completion ids)
Pair = tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]


def encode_pairs(tok, pairs, cfg: RMConfig, name: str) -> list[Pair]:
    """Token ids of each pair; a pair whose chosen or rejected answer loses every token to
    ``max_len`` is dropped (and counted on stdout)."""
    out = []
    for ex in pairs:
        c = encode(tok, ex.prompt, ex.chosen, cfg.max_len, cfg.max_prompt_len)
        r = encode(tok, ex.prompt, ex.rejected, cfg.max_len, cfg.max_prompt_len)
        if c is not None and r is not None:
            out.append((c, r))
    if not out:
        raise LMStackError(f"{name}: no pair keeps a completion token within max_len {cfg.max_len}")
    if len(out) < len(pairs):
        print(f"rm: {name}: {len(pairs) - len(out)} of {len(pairs)} pairs dropped (no completion token "
              f"within max_len {cfg.max_len})")
    return out


def pair_batch(pairs: list[Pair], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` (2B, T): the chosen answers, then the rejected ones; ``lengths`` (2B,)."""
    items = [c for c, _ in pairs] + [r for _, r in pairs]
    return collate(items, pad)["input_ids"], torch.tensor([len(p) + len(c) for p, c in items])


def pair_rewards(model, pairs: list[Pair], pad: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r_chosen (B,), r_rejected (B,))``."""
    ids, lengths = pair_batch(pairs, pad)
    r = model(ids.to(device), lengths.to(device))  # (2B,)
    return r[:len(pairs)], r[len(pairs):]


def _load_base(cfg: RMConfig):
    from lmstack.infer.llm import LLM

    llm = LLM.load(cfg.model or None, device=cfg.device, seed=cfg.seed, convert=base_loader(cfg.peft))
    if llm.tokenizer is None:
        raise LMStackError(f"model {cfg.model!r} has no tokenizer; a reward model needs one to read text")
    return llm.model, llm.tokenizer


def _reward_model(cfg: RMConfig) -> RewardModel:
    core, tok = _load_base(cfg)
    apply_peft(core, cfg.peft)
    return RewardModel(core, tok, base=cfg.model, max_len=cfg.max_len, max_prompt_len=cfg.max_prompt_len)


def rm(cfg: RMConfig, resume: bool = False) -> dict:
    method = cfg.peft.method
    run = Run.start(cfg, f"rm ({method})", resume, trainable_only=method != "full")
    # The data is read before the model loads: a wrong path or a bad line fails at once.
    train_pairs = read_preference(cfg.data, "data")
    val_pairs = read_preference(cfg.val_data, "val_data") if cfg.val_data else []
    model = _reward_model(cfg)
    model.core.gradient_checkpointing = cfg.gradient_checkpointing
    tok = model.tokenizer
    if run.dist.main:
        print(f"rm: {method}, {describe_params(model)}")
    train = encode_pairs(tok, train_pairs, cfg, "data")
    val = encode_pairs(tok, val_pairs, cfg, "val_data") if val_pairs else []
    pad = pad_id(tok)
    world, rank = run.dist.world, run.dist.rank
    rows = cfg.batch_size * world
    accum = cfg.grad_accum or 1
    if cfg.epochs > 0:
        cfg.max_steps = max(1, math.ceil(cfg.epochs * len(train) / (rows * accum)))
        if run.dist.main:
            print(f"rm: epochs {cfg.epochs} = {cfg.max_steps} optimizer steps of {rows * accum} pairs")

    def evaluate(model) -> dict:
        loss, right, margin, n = 0.0, 0.0, 0.0, 0
        for i in range(rank * cfg.batch_size, len(val), rows):
            rc, rj = pair_rewards(model, val[i:i + cfg.batch_size], pad, cfg.device)
            loss += float(bradley_terry_loss(rc, rj, cfg.margin).sum())
            right += float((rc > rj).sum())
            margin += float((rc - rj).sum())
            n += len(rc)
        n = max(1.0, run.reduce_sum(n))
        return {"val_loss": run.reduce_sum(loss) / n, "val_accuracy": run.reduce_sum(right) / n,
                "val_margin": run.reduce_sum(margin) / n}

    run.resume(model)
    run.prepare(model, len(train), evaluate=evaluate if val else None, best_metric="val_accuracy", best_mode="max",
                meta={"stage": "rm"})
    for _ in run.steps():
        micro_batches = [[i for _, i in run.order.take(rows)] for _ in range(accum)]
        n_step = rows * accum  # pairs in the whole global step
        loss_sum, right, margin, r_mean, n_tok = 0.0, 0.0, 0.0, 0.0, 0
        for k, mb in enumerate(micro_batches):
            part = [train[i] for i in mb[rank * cfg.batch_size:(rank + 1) * cfg.batch_size]]
            with run.micro_batch(last=k == len(micro_batches) - 1):
                rc, rj = pair_rewards(run.model, part, pad, cfg.device)
                losses = bradley_terry_loss(rc, rj, cfg.margin)  # (B,)
                if cfg.center_coef:
                    losses = losses + cfg.center_coef * (rc + rj) ** 2
                (losses.sum() * (world / n_step)).backward()
            rc, rj = rc.detach(), rj.detach()
            loss_sum += float(losses.detach().sum())
            right += float((rc > rj).sum())
            margin += float((rc - rj).sum())
            r_mean += float((rc + rj).sum()) / 2
            n_tok += sum(len(p) + len(c) for pair in part for p, c in pair)
        metrics = {"accuracy": run.reduce_sum(right) / n_step, "margin": run.reduce_sum(margin) / n_step,
                   "reward_mean": run.reduce_sum(r_mean) / n_step}
        run.end_step(run.reduce_sum(loss_sum) / n_step, tokens=n_tok, metrics=metrics)

    final = run.final_model(lambda: _reward_model(cfg))
    if final is not None:
        final.save(run.dir / "reward_model", metadata={"steps": run.step, "data": cfg.data, "seed": cfg.seed})
    records = run.metrics.records() if run.dist.main else []
    plot_metrics(records, run.dir / "reward.png", ["accuracy", "val_accuracy", "margin", "val_margin"],
                 f"rm {method}: pair accuracy and margin r_chosen - r_rejected")
    summary = run.finish(f"rm {method}")
    evals = [r for r in records if "val_accuracy" in r]
    if evals:
        summary.update(val_accuracy=evals[-1]["val_accuracy"], val_margin=evals[-1]["val_margin"])
    return summary
