"""Group Relative Policy Optimization on verifiable rewards: ``lmstack grpo CONFIG.yaml``.

Each generation batch: take ``batch_size`` prompts, sample ``num_generations`` (G) completions
of each through the serving engine over the live weights (``lmstack.train.rollout``), score
them with the configured rewards (``lmstack.train.rewards``), turn the scores into
group-normalised advantages, record the completions' log-probs under the sampling policy
(``pi_old``) and, with ``beta > 0``, under the reference (the same model with its adapters
passed through, ``peft_disabled``), then make ``num_iterations`` optimizer steps on the
clipped objective of ``lmstack.train.grpo_loss``. One optimizer step is one step of the run
(its checkpoints, log and schedule); a generation batch spans ``num_iterations`` of them, so
checkpoints fall on batch boundaries and a resumed run samples what the uninterrupted one did
(completion ``k`` of the batch at step ``s`` is seeded from ``(seed, s, k)``).

The data is TRL's prompt-only format (a ``prompt`` column, plain or conversational); every
other column reaches the rewards. Held-out accuracy is measured greedily before training and at
every evaluation: a prompt counts when every reward that applies to it gives at least 1.
Deliberately left out: generation in a separate process or on other weights (vLLM), reward
models that train online, and entropy bonuses.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lmstack.infer.sampling import SamplingParams
from lmstack.peft.core import describe_params, peft_disabled
from lmstack.train.align_common import load_policy, plot_metrics, save_final
from lmstack.train.align_data import is_conversational, read_prompts
from lmstack.train.grpo_config import GRPOConfig
from lmstack.train.grpo_loss import NORMALISE, group_advantages, grpo_loss
from lmstack.train.rewards import Rewards
from lmstack.train.rollout import Rollout, sample
from lmstack.train.run import Run

_SEED_STRIDE = 1_000_003  # keeps the per-step seed ranges of neighbouring steps apart


def encode_prompt(tok, prompt, max_prompt_len: int) -> list[int]:
    """Token ids of a prompt (a chat rendered with the generation prompt), its last
    ``max_prompt_len`` kept."""
    ids = (tok.encode_chat(prompt, add_generation_prompt=True) if is_conversational(prompt)
           else tok.encode(prompt, add_special_tokens=True))
    return ids[-max_prompt_len:]


def _chunk_logps(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(F.linear(h, weight).float(), -1).gather(-1, targets[:, None])[:, 0]


def token_logps(model, input_ids: torch.Tensor, completion_mask: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """``log pi(y_t | x, y_<t)`` of every completion token, ``(B, T)`` laid out like
    ``input_ids[:, 1:]`` (0 elsewhere). Only completion positions reach the output projection,
    ``chunk`` tokens at a time and recomputed in backward, so the ``(N, vocab)`` log-softmax
    of a whole batch never lives at once."""
    inputs, targets, keep = input_ids[:, :-1], input_ids[:, 1:], completion_mask[:, 1:].bool()
    h = model(inputs, return_hidden=True, keep=keep)[0]  # (N, C), row-major over the kept positions
    t = targets[keep]
    core = model.module if hasattr(model, "module") else model
    w = core.output_weight
    parts = [checkpoint(_chunk_logps, hc, w, tc, use_reentrant=False) if torch.is_grad_enabled()
             else _chunk_logps(hc, w, tc) for hc, tc in zip(h.split(chunk), t.split(chunk))]
    out = torch.zeros(keep.shape, dtype=torch.float32, device=h.device)
    out[keep] = torch.cat(parts)
    return out


def _batch(roll: Rollout, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``prompt + completion`` rows ``(B, T)`` and their completion mask."""
    G = roll.num_generations
    rows = [roll.prompt_ids[k // G] + c for k, c in enumerate(roll.completion_ids)]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for k, r in enumerate(rows):
        ids[k, :len(r)] = torch.tensor(r)
        mask[k, len(roll.prompt_ids[k // G]):len(r)] = 1
    return ids, mask


def _reward_inputs(examples, roll: Rollout):
    """TRL's reward arguments for a rollout: prompts, completions and the other columns, one
    entry per completion."""
    G = roll.num_generations
    prompts = [examples[k // G].prompt for k in range(len(roll.texts))]
    completions = [[{"role": "assistant", "content": t}] if is_conversational(p) else t
                   for p, t in zip(prompts, roll.texts)]
    keys = sorted({k for ex in examples for k in ex.extra})
    columns = {k: [examples[i // G].extra.get(k) for i in range(len(roll.texts))] for k in keys}
    columns["completion_ids"] = roll.completion_ids
    return prompts, completions, columns


def measure(model, tok, examples, encoded, rewards: Rewards, cfg: GRPOConfig) -> dict:
    """Greedy held-out accuracy (every applicable reward >= 1), overall and per ``kind``."""
    roll = sample(model, tok, encoded, 1, SamplingParams(max_new_tokens=cfg.max_completion_len, temperature=0.0),
                  seed=cfg.seed)
    prompts, completions, columns = _reward_inputs(examples, roll)
    total, per = rewards(prompts, completions, columns)
    ok = [all(v[k] is None or v[k] >= 1.0 for v in per.values()) and any(v[k] is not None for v in per.values())
          for k in range(len(examples))]
    out = {"accuracy": sum(ok) / len(ok), "reward": _nanmean(total), "n": len(ok),
           "gen_tokens_per_s": roll.tokens_per_s}
    kinds = defaultdict(list)
    for ex, good in zip(examples, ok):
        if "kind" in ex.extra:
            kinds[str(ex.extra["kind"])].append(good)
    out.update({f"accuracy_{k}": sum(v) / len(v) for k, v in sorted(kinds.items())})
    return out


def _nanmean(xs) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def grpo(cfg: GRPOConfig, resume: bool = False) -> dict:
    method = cfg.peft.method
    run = Run.start(cfg, f"grpo ({method})", resume, trainable_only=method != "full")
    # Data and reward functions are checked before the model loads: a typo fails at once.
    train = read_prompts(cfg.data, "data")
    val = read_prompts(cfg.val_data, "val_data") if cfg.val_data else []
    if cfg.val_max_prompts:
        val = val[:cfg.val_max_prompts]
    rewards = Rewards(cfg.rewards)
    model, tok = load_policy(cfg)
    if run.dist.main:
        print(f"grpo: {method}, {describe_params(model)}")
    enc = [encode_prompt(tok, ex.prompt, cfg.max_prompt_len) for ex in train]
    val_enc = [encode_prompt(tok, ex.prompt, cfg.max_prompt_len) for ex in val]
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    G, mu = cfg.num_generations, cfg.num_iterations
    params = SamplingParams(max_new_tokens=cfg.max_completion_len, temperature=cfg.temperature, top_p=cfg.top_p)
    eps_high = cfg.epsilon_high or cfg.epsilon

    def evaluate(model) -> dict:
        return {f"val_{k}": v for k, v in measure(run.core, tok, val, val_enc, rewards, cfg).items()}

    run.resume(model)
    before = None
    if cfg.measure and val and run.dist.main and not resume:
        before = measure(model, tok, val, val_enc, rewards, cfg)
        print(f"before: held-out accuracy {before['accuracy']:.3f} ({before['n']} prompts)")
    run.prepare(model, len(train), evaluate=evaluate if val else None, best_metric="val_accuracy", best_mode="max",
                meta={"stage": "grpo"})
    if before is not None:
        run.metrics.log({"step": 0, "measure_before": before})
    buf = None  # the current generation batch, reused for num_iterations steps
    for step in run.steps():
        if step % mu == 0 or buf is None:
            idx = [i for _, i in run.order.take(cfg.batch_size)]
            roll = sample(run.core, tok, [enc[i] for i in idx], G, params, seed=cfg.seed * _SEED_STRIDE + step * 4096)
            prompts, completions, columns = _reward_inputs([train[i] for i in idx], roll)
            total, per = rewards(prompts, completions, columns)  # raises, naming the function, on a bad value
            r = torch.tensor(total, dtype=torch.float32)
            adv = group_advantages(r, G, cfg.scale_rewards)
            ids, mask = _batch(roll, pad)
            with torch.no_grad():
                run.model.eval()
                old = _logps_in_batches(run.model, ids, mask, cfg.logp_batch) if mu > 1 else None
                ref = None
                if cfg.beta > 0:
                    with peft_disabled(run.core):
                        ref = _logps_in_batches(run.model, ids, mask, cfg.logp_batch)
                run.model.train()
            groups = r.view(-1, G)
            info = {"reward": _nanmean(total), "reward_std": _nanmean(groups.std(1).tolist()),
                    **{f"reward/{n}": _nanmean(v) for n, v in per.items() if any(x is not None for x in v)},
                    "completion_len": roll.tokens / len(roll.completion_ids),
                    "gen_tokens_per_s": roll.tokens_per_s, "gen_s": roll.seconds,
                    "zero_std_groups": float((groups.std(1) < 1e-6).float().mean())}
            buf = (ids, mask, adv, old, ref)
        ids, mask, adv, old, ref = buf
        n_seq, n_tok = ids.shape[0], int(mask[:, 1:].sum())
        loss_sum, kl_sum, clip_sum = 0.0, 0.0, 0.0
        starts = list(range(0, n_seq, cfg.logp_batch))
        for j, a in enumerate(starts):
            b = slice(a, a + cfg.logp_batch)
            m = mask[b, 1:].to(cfg.device)
            with run.micro_batch(last=j == len(starts) - 1):
                logps = token_logps(run.model, ids[b].to(cfg.device), mask[b].to(cfg.device))
                loss, stats = grpo_loss(logps, logps.detach() if old is None else old[b], adv[b].to(logps.device), m,
                                        cfg.epsilon, eps_high, cfg.beta, None if ref is None else ref[b],
                                        cfg.loss_type, cfg.max_completion_len)
                share = _share(cfg.loss_type, m, n_seq, n_tok)  # this micro-batch's part of the batch loss
                (loss * share).backward()
            k = float(m.sum()) / max(n_tok, 1)
            loss_sum += loss.item() * share
            kl_sum += float(stats.get("kl", 0.0)) * k
            clip_sum += float(stats["clip_low"] + stats["clip_high"]) * k
        metrics = {**info, "clip_fraction": clip_sum, "generation": step // mu}
        if cfg.beta > 0:
            metrics["kl"] = kl_sum
        run.end_step(loss_sum, metrics=metrics, tokens=int(mask.sum()))

    final = run.final_model(lambda: load_policy(cfg)[0])
    summary = run.finish(f"grpo {method}")
    if final is not None:
        save_final(final, tok, cfg, run, "lmstack grpo")
        records = [json.loads(line) for line in (run.dir / "metrics.jsonl").read_text().splitlines() if line]
        plot_metrics(records, run.dir / "reward.png", ["reward", "val_accuracy"], "grpo reward")
        if cfg.beta > 0:
            plot_metrics(records, run.dir / "kl.png", ["kl"], "grpo KL to the reference")
        after = next((rec for rec in reversed(records) if "val_accuracy" in rec), None)
        if before is not None:
            summary["before"] = before
        if after is not None:
            summary["after"] = {k[len("val_"):]: v for k, v in after.items() if k.startswith("val_")}
            print(f"after: held-out accuracy {after['val_accuracy']:.3f}")
    return summary


def _share(loss_type: str, mask: torch.Tensor, n_seq: int, n_tok: int) -> float:
    """The weight of a micro-batch's loss in the batch's: the normalisers of ``NORMALISE``
    make per-micro-batch losses whose weighted sum is the whole batch's loss."""
    assert loss_type in NORMALISE
    if loss_type == "bnpo":
        return float(mask.sum()) / max(n_tok, 1)
    return mask.shape[0] / n_seq


def _logps_in_batches(model, ids: torch.Tensor, mask: torch.Tensor, batch: int) -> torch.Tensor:
    dev = next(model.parameters()).device
    return torch.cat([token_logps(model, ids[i:i + batch].to(dev), mask[i:i + batch].to(dev)).cpu()
                      for i in range(0, ids.shape[0], batch)]).to(dev)

