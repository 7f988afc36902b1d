"""PPO against a trained reward model (RLHF): ``lmstack ppo CONFIG.yaml``.

One cycle (Ouyang et al. 2022 sec. 3.5, with the per-token KL penalty of Ziegler et al. 2019):

1. rollout: one completion per prompt, sampled by ``lmstack.train.rollout`` (the serving
   engine over the live LoRA weights);
2. the reward model scores each (prompt, completion); with no grad, the policy gives each
   completion token's log-probability ``log pi_old`` and value ``V`` (a ``ScalarHead`` on
   the same hidden state), and the reference (the same weights with the adapters disabled)
   gives ``log pi_ref``;
3. per-token rewards ``r_t = -beta (log pi_old - log pi_ref)``, plus the score on the last
   token; advantages by GAE (``gae``), returns ``A + V``, advantages whitened over the batch;
4. ``ppo_epochs`` passes of ``mini_batches`` optimizer steps each, minimising the clipped
   policy loss plus ``vf_coef`` times the clipped value loss (Schulman et al. 2017 eqs. 7, 9).

Log-probabilities are of the temperature-scaled distribution the samples were drawn from.
A ``Run`` step is one optimizer step, so a cycle spans ``ppo_epochs x mini_batches`` steps;
``max_steps`` and ``ckpt_interval`` are multiples of it so a checkpoint never falls inside a
cycle, whose rollout it could not hold. Evaluation samples the held-out prompts with a fixed
seed and reports the mean reward-model score and the mean KL to the reference (nats per
completion, the k1 estimate). Deliberately left out: a separate value network, adaptive KL
control, reward whitening, and more than one completion per prompt.
"""

from __future__ import annotations

import json

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmstack.peft.core import describe_params, peft_disabled
from lmstack.train.align_common import collate, load_policy, pad_id, plot_metrics, save_final
from lmstack.train.align_data import read_prompts
from lmstack.train.reward_model import RewardModel, ScalarHead
from lmstack.train.rm_config import PPOConfig
from lmstack.train.run import Run

# -- the pure parts ---------------------------------------------------------------------------


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Generalised advantage estimates (Schulman et al. 2016, eqs. 11-16), ``(B, T)``:
    ``A_t = sum_l (gamma lam)^l delta_{t+l}`` with ``delta_t = r_t + gamma V_{t+1} - V_t``.

    Rows are right-padded: ``rewards`` and ``values`` must be 0 past a row's last token, which
    then bootstraps from ``V = 0`` (the episode ends there)."""
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    running = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in range(T - 1, -1, -1):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        adv[:, t] = running
    return adv


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                cliprange: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), per token, to minimise:
    ``max(-A rho, -A clip(rho, 1 - eps, 1 + eps))`` with ``rho = pi / pi_old``; and whether
    the clipped term was the larger (for the clip fraction)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).float()


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               cliprange_value: float) -> torch.Tensor:
    """The clipped value loss (as in OpenAI baselines' PPO2), per token:
    ``0.5 max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)``."""
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)


def kl_rewards(logp: torch.Tensor, ref_logp: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor,
               kl_coef: float) -> torch.Tensor:
    """Per-token rewards ``(B, T)``: ``-beta (log pi - log pi_ref)`` on every completion token
    and the sequence's score added on its last one (Ziegler et al. 2019, eq. 2)."""
    rewards = -kl_coef * (logp - ref_logp) * mask
    last = mask.long().cumsum(1).argmax(1)  # (B,) index of each row's last completion token
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` normalised to mean 0 and variance 1 over the masked entries (0 elsewhere)."""
    n = mask.sum()
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / torch.clamp(n - 1, min=1)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / torch.clamp(mask.sum(), min=1)


# -- the policy with its value head -----------------------------------------------------------


class PolicyWithValue(nn.Module):
    """The policy (``core``, with its adapters) and a value head on its final hidden states."""

    def __init__(self, core: nn.Module):
        super().__init__()
        self.core = core
        self.value_head = ScalarHead(core.config.n_embd).to(core.device)

    def forward(self, input_ids: torch.Tensor, completion_mask: torch.Tensor,
                temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log pi(y_t | ...) (B, T), V(s_t) (B, T))`` at each completion token ``t`` (0 elsewhere),
        where ``s_t`` is the sequence before token ``t``. Logits exist for completion tokens only."""
        B, T = input_ids.shape
        keep = completion_mask[:, 1:]  # position t - 1 predicts token t
        h = self.core(input_ids[:, :-1], return_hidden=True, keep=keep)[0]  # (N, C)
        project = getattr(self.core.tok_emb, "project", None)  # a quantised table projects without a dense copy
        logits = project(h) if project is not None else F.linear(h, self.core.output_weight)  # (N, vocab)
        logp = torch.log_softmax(logits.float() / temperature, dim=-1)
        logp = logp.gather(-1, input_ids[:, 1:][keep][:, None])[:, 0]  # (N,)
        out_logp = torch.zeros(B, T, device=h.device)
        out_v = torch.zeros(B, T, device=h.device)
        out_logp[:, 1:][keep] = logp
        out_v[:, 1:][keep] = self.value_head(h)
        return out_logp, out_v


def prompt_ids(tok, prompt, max_prompt_len: int) -> list[int]:
    """Token ids of a prompt ready for its completion (chat template with the generation
    prompt for messages), keeping the last ``max_prompt_len``."""
    if isinstance(prompt, list):
        ids = tok.hf.encode(tok.apply_chat_template(prompt, add_generation_prompt=True), add_special_tokens=False).ids
    else:
        ids = tok.encode(prompt, add_special_tokens=True)
    return list(ids)[-max_prompt_len:]


def _unique_prompts(path: str, name: str) -> list:
    seen, out = set(), []
    for ex in read_prompts(path, name):
        key = json.dumps(ex.prompt, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(ex.prompt)
    return out


@torch.no_grad()
def rollout_batch(policy: PolicyWithValue, rm: RewardModel, tok, prompts: list, ids: list[list[int]],
                  cfg: PPOConfig, seed: int) -> dict:
    """Sample one completion per prompt and score it: everything a PPO cycle trains on."""
    from lmstack.infer.sampling import SamplingParams
    from lmstack.train.rollout import sample

    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k)
    roll = sample(policy.core, tok, ids, 1, params, seed=seed)
    completions = [[{"role": "assistant", "content": t}] if isinstance(p, list) else t
                   for p, t in zip(prompts, roll.texts)]
    scores = torch.tensor(rm.score(prompts, completions), dtype=torch.float32)
    if cfg.missing_eos_penalty:
        scores -= cfg.missing_eos_penalty * torch.tensor([r == "length" for r in roll.finish_reasons]).float()
    b = collate([(p, c) for p, c in zip(ids, roll.completion_ids)], pad_id(tok))
    x, mask = b["input_ids"].to(cfg.device), b["completion_mask"].to(cfg.device)
    logp, values = policy(x, mask, cfg.temperature)
    with peft_disabled(policy.core):
        ref_logp, _ = policy(x, mask, cfg.temperature)
    m = mask.float()
    return {"input_ids": x, "mask": mask, "logp": logp, "ref_logp": ref_logp, "values": values * m,
            "scores": scores.to(cfg.device), "kl": ((logp - ref_logp) * m).sum(1), "length": m.sum(1),
            "texts": roll.texts, "tokens": roll.tokens, "tokens_per_s": roll.tokens_per_s}


def ppo(cfg: PPOConfig, resume: bool = False) -> dict:
    run = Run.start(cfg, f"ppo ({cfg.peft.method})", resume, trainable_only=True)
    prompts = _unique_prompts(cfg.data, "data")
    val_prompts = _unique_prompts(cfg.val_data, "val_data") if cfg.val_data else []
    if cfg.eval_samples:
        val_prompts = val_prompts[:cfg.eval_samples]
    rm = RewardModel.load(cfg.reward_model, device=cfg.device)
    for p in rm.parameters():
        p.requires_grad_(False)
    core, tok = load_policy(cfg)
    policy = PolicyWithValue(core)
    if run.dist.main:
        print(f"ppo: {cfg.peft.method}, {describe_params(policy)}; {len(prompts)} prompts, reward model "
              f"{cfg.reward_model}")
    ids = [prompt_ids(tok, p, cfg.max_prompt_len) for p in prompts]
    val_ids = [prompt_ids(tok, p, cfg.max_prompt_len) for p in val_prompts]
    world, rank = run.dist.world, run.dist.rank
    updates = cfg.ppo_epochs * cfg.mini_batches  # optimizer steps per rollout

    def evaluate(model) -> dict:
        part = range(rank, len(val_ids), world)
        roll = rollout_batch(run.core, rm, tok, [val_prompts[i] for i in part], [val_ids[i] for i in part], cfg,
                             seed=cfg.seed + 7919 + rank * 100003)
        n = run.reduce_sum(len(part))
        return {"val_score": run.reduce_sum(float(roll["scores"].sum())) / n,
                "val_kl": run.reduce_sum(float(roll["kl"].sum())) / n,
                "val_length": run.reduce_sum(float(roll["length"].sum())) / n}

    run.resume(policy)
    run.prepare(policy, len(ids), evaluate=evaluate if val_ids else None, best_metric="val_score", best_mode="max",
                meta={"stage": "ppo"})
    before = None
    if val_ids and not resume:
        ev = evaluate(run.core)
        run.metrics.log({"step": 0, **ev})
        before = {"score": ev["val_score"], "kl": ev["val_kl"], "length": ev["val_length"]}
        if run.dist.main:
            print(f"before: held-out reward-model score {before['score']:.3f}, KL {before['kl']:.3f}")
    batch = None
    for step in run.steps():
        k = step % updates
        if k == 0:  # a new cycle: sample, score, and compute advantages (the steps below reuse them)
            chosen = [i for _, i in run.order.take(cfg.batch_size * world)][rank * cfg.batch_size:
                                                                              (rank + 1) * cfg.batch_size]
            batch = rollout_batch(run.core, rm, tok, [prompts[i] for i in chosen], [ids[i] for i in chosen], cfg,
                                  seed=cfg.seed + 1_000_003 * (step // updates + 1) + rank * 100003)
            m = batch["mask"].float()
            rewards = kl_rewards(batch["logp"], batch["ref_logp"], batch["scores"], m, cfg.kl_coef)
            adv = gae(rewards, batch["values"], cfg.gamma, cfg.lam)
            batch["returns"] = adv + batch["values"]
            batch["advantages"] = whiten(adv, m) if cfg.whiten_advantages else adv * m
        rows = torch.arange(cfg.batch_size).chunk(cfg.mini_batches)[k % cfg.mini_batches]
        mb = {key: batch[key][rows] for key in ("input_ids", "mask", "logp", "values", "returns", "advantages")}
        m = mb["mask"].float()
        with run.micro_batch():
            logp, values = run.model(mb["input_ids"], mb["mask"], cfg.temperature)
            pg, clipped = policy_loss(logp, mb["logp"], mb["advantages"], cfg.cliprange)
            vf = value_loss(values, mb["values"], mb["returns"], cfg.cliprange_value)
            pg_loss, vf_loss = masked_mean(pg, m), masked_mean(vf, m)
            (pg_loss + cfg.vf_coef * vf_loss).backward()
        stats = torch.stack([pg_loss.detach(), vf_loss.detach(), masked_mean(clipped, m),
                             masked_mean(0.5 * (logp.detach() - mb["logp"]) ** 2, m)])
        stats = [run.reduce_sum(float(s)) / world for s in stats]
        metrics = {"pg_loss": stats[0], "vf_loss": stats[1], "clipfrac": stats[2], "approx_kl": stats[3],
                   "score": run.reduce_sum(float(batch["scores"].mean())) / world,
                   "kl": run.reduce_sum(float(batch["kl"].mean())) / world,
                   "completion_length": float(batch["length"].mean())}
        if k == 0:
            metrics["rollout_tokens_per_s"] = batch["tokens_per_s"]
        run.end_step(stats[0] + cfg.vf_coef * stats[1], metrics=metrics,
                     tokens=int(mb["input_ids"].numel()) + (batch["tokens"] if k == 0 else 0))

    final = run.final_model(lambda: PolicyWithValue(load_policy(cfg)[0]))
    after = None
    if final is not None:
        records = run.metrics.records()
        evals = [r for r in records if "val_score" in r and r["step"] == run.step]
        if evals:
            after = {"score": evals[-1]["val_score"], "kl": evals[-1]["val_kl"], "length": evals[-1]["val_length"]}
        plot_metrics(records, run.dir / "reward.png", ["score", "val_score"], "ppo: reward-model score")
        plot_metrics(records, run.dir / "kl.png", ["kl", "val_kl"], "ppo: KL to the reference (nats/completion)")
        save_final(final.core, tok, cfg, run, "lmstack ppo")
    summary = run.finish(f"ppo {cfg.peft.method}")
    if before is not None and after is not None:
        summary.update(before=before, after=after)
    return summary
