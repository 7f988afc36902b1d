"""Kahneman-Tversky optimisation on unpaired, labelled completions: ``lmstack kto CONFIG.yaml``.

Data: ``{"prompt", "completion", "label"}`` lines (``align_data.read_unpaired``). Each
example's completion is scored against the reference, ``r = log pi(y|x) - log pi_ref(y|x)``,
and compared with the reference point z_0, an estimate of KL(pi || pi_ref) on mismatched
pairs: every prompt is paired once, for the whole run, with another example's completion
(a seeded derangement of the data), and the batch's z_0 is the mean log-ratio of its
examples' mismatched pairs (``align_loss.kto_kl``, no gradient). Fixing the pairs per
example, rather than re-pairing within each batch as TRL does, is what lets a full
fine-tune compute every reference log-prob once before training. The reference follows
``lmstack.train.dpo``: adapters passed through (PEFT), precomputed (full, or
``precompute_ref``), or a ``ref_model``.

Logged each step: the loss, z_0 (``kl``), the mean rewards ``beta r`` of desirable and
undesirable examples and their difference, and the reward sign accuracy (desirable above 0,
undesirable below; ties half); the evaluation adds the same on held-out examples. Plots:
``loss.png``, ``rewards.png``. Deliberately left out: TRL's ``apo_zero_unpaired`` loss and
the automatic rebalancing of desirable/undesirable weights.
"""

from __future__ import annotations

import numpy as np
import torch

from lmstack.errors import LMStackError
from lmstack.peft.core import describe_params
from lmstack.train.align_common import (Encoded, cached_logps, collate, completion_logps, encode, load_policy,
                                        load_reference, pad_id, plot_metrics, reference_logps, save_final)
from lmstack.train.align_config import KTOConfig
from lmstack.train.align_data import read_unpaired
from lmstack.train.align_loss import kto_kl, kto_loss
from lmstack.train.common import autocast
from lmstack.train.run import Run


def mismatched(items: list[Encoded], seed: int, max_len: int) -> list[Encoded]:
    """For example i, its prompt with the completion of another example (a seeded derangement),
    cut to ``max_len``: the sequences z_0 is estimated on."""
    n = len(items)
    perm = np.random.default_rng([seed, 1]).permutation(n)
    partner = np.empty(n, dtype=np.int64)
    partner[perm] = np.roll(perm, -1)
    out = []
    for i in range(n):
        p, c = items[i][0], items[int(partner[i])][1]
        out.append((p, c[:max(1, max_len - len(p))]))
    return out


def kto(cfg: KTOConfig, resume: bool = False) -> dict:
    method = cfg.peft.method
    run = Run.start(cfg, f"kto ({method})", resume, trainable_only=method != "full")
    train_rows = read_unpaired(cfg.data, "data")
    val_rows = read_unpaired(cfg.val_data, "val_data") if cfg.val_data else []
    model, tok = load_policy(cfg)
    if run.dist.main:
        print(f"kto: {method}, {describe_params(model)}")

    def encode_all(rows, field):
        kept = [(e, r.label) for r in rows if (e := encode(tok, r.prompt, r.completion, cfg.max_len,
                                                             cfg.max_prompt_len)) is not None]
        if len(kept) < 2:
            raise LMStackError(f"{field}: {len(kept)} examples keep a completion token within max_len "
                               f"{cfg.max_len}; KTO needs at least 2")
        items, labels = [e for e, _ in kept], [lab for _, lab in kept]
        return items, torch.tensor(labels), mismatched(items, cfg.seed, cfg.max_len)

    data = {"train": encode_all(train_rows, "data")}
    if val_rows:
        data["val"] = encode_all(val_rows, "val_data")
    pad, selective = pad_id(tok), not (run.dist.world > 1 and cfg.distributed == "fsdp")
    world, rank = run.dist.world, run.dist.rank
    rows, accum = cfg.batch_size * world, cfg.grad_accum or 1
    ref_model = load_reference(cfg.ref_model, cfg) if cfg.ref_model else None
    precomputed = {}
    if ref_model is None and (method == "full" or cfg.precompute_ref):
        def compute(items):  # the starting weights: run.resume has not loaded anything yet
            return reference_logps(model.eval(), collate(items, pad), None, cfg.loss_chunk, selective)
        for split, (items, _, kl_items) in data.items():
            both = cached_logps(run.dir / f"ref_logps_{split}.pt", items + kl_items, compute, 2 * cfg.batch_size,
                                reuse=resume, main=run.dist.main)
            precomputed[split] = both.view(2, len(items)).t()  # (examples, 2): completion, mismatched
        model.train()

    def batch_terms(m, split: str, idx: list[int]):
        """(policy logps with gradient, reference logps, z_0, labels, completion tokens) of ``idx``."""
        items, labels, kl_items = data[split]
        b = collate([items[i] for i in idx], pad)
        kb = collate([kl_items[i] for i in idx], pad)
        dev = {k: v.to(cfg.device) for k, v in b.items()}
        kdev = {k: v.to(cfg.device) for k, v in kb.items()}
        logps, n = completion_logps(m, dev["input_ids"], dev["completion_mask"], cfg.loss_chunk, selective)
        with torch.no_grad():
            kl_logps = completion_logps(m, kdev["input_ids"], kdev["completion_mask"], cfg.loss_chunk, selective)[0]
        if split in precomputed:
            ref, ref_kl = precomputed[split][idx].to(logps).unbind(1)
        else:
            ref = reference_logps(m, dev, ref_model, cfg.loss_chunk, selective).to(logps)
            ref_kl = reference_logps(m, kdev, ref_model, cfg.loss_chunk, selective).to(logps)
        return logps, ref, kto_kl(kl_logps, ref_kl), labels[idx].to(cfg.device), n

    def stats(losses, rewards, labels, kl) -> dict[str, float]:
        """Sums over the examples (and counts) for the record."""
        r = rewards.float()
        right = torch.where(labels, (r > 0).float(), (r < 0).float()) + 0.5 * (r == 0).float()
        return {"loss": float(losses.detach().sum()), "kl": float(kl) * len(labels), "reward_acc": float(right.sum()),
                "rewards_chosen": float(r[labels].sum()), "n_chosen": float(labels.sum()),
                "rewards_rejected": float(r[~labels].sum()), "n_rejected": float((~labels).sum()), "n": len(labels)}

    def summarise(sums: dict[str, float], prefix: str = "") -> dict[str, float]:
        s = {k: run.reduce_sum(v) for k, v in sums.items()}
        out = {k: s[k] / max(1.0, s["n"]) for k in ("loss", "kl", "reward_acc")}
        out["rewards_chosen"] = s["rewards_chosen"] / max(1.0, s["n_chosen"])
        out["rewards_rejected"] = s["rewards_rejected"] / max(1.0, s["n_rejected"])
        out["margin"] = out["rewards_chosen"] - out["rewards_rejected"]
        return {prefix + k: v for k, v in out.items()}

    def add(sums, new):
        for k, v in new.items():
            sums[k] = sums.get(k, 0.0) + v

    def evaluate(m) -> dict:
        sums: dict[str, float] = {}
        n_val = len(data["val"][0])
        for i in range(rank * cfg.batch_size, n_val, rows):
            idx = list(range(i, min(i + cfg.batch_size, n_val)))
            logps, ref, kl, labels, _ = batch_terms(m, "val", idx)
            losses, rewards = kto_loss(logps, ref, labels, kl, cfg.beta, cfg.desirable_weight, cfg.undesirable_weight)
            add(sums, stats(losses, rewards, labels, kl))
        return summarise(sums, "val_")

    run.resume(model)
    run.prepare(model, len(data["train"][0]), evaluate=evaluate if val_rows else None, best_metric="val_loss")
    if val_rows and not resume:  # the held-out numbers before any update
        model.eval()
        with torch.no_grad(), autocast(cfg.device, cfg.dtype):
            run.metrics.log({"step": 0, **evaluate(run.model)})
        model.train()
    for _ in run.steps():
        sums: dict[str, float] = {}
        n_tok = 0
        for k in range(accum):
            idx = [i for _, i in run.order.take(rows)][rank * cfg.batch_size:(rank + 1) * cfg.batch_size]
            with run.micro_batch(last=k == accum - 1):
                logps, ref, kl, labels, n = batch_terms(run.model, "train", idx)
                losses, rewards = kto_loss(logps, ref, labels, kl, cfg.beta, cfg.desirable_weight,
                                           cfg.undesirable_weight)
                (losses.mean() / accum).backward()
            add(sums, stats(losses, rewards, labels, kl))
            n_tok += int(n.sum())
        rec = summarise(sums)
        run.end_step(rec.pop("loss"), tokens=n_tok, metrics=rec)

    final = run.final_model(lambda: load_policy(cfg)[0])
    if final is not None:
        save_final(final, tok, cfg, run, "lmstack kto")
        plot_metrics(run.metrics.records(), run.dir / "rewards.png",
                     ["rewards_chosen", "rewards_rejected", "kl", "val_kl"], "kto: rewards and KL estimate")
    return run.finish(f"kto ({method})")
