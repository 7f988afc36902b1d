"""The GRPO objective and its group-normalised advantages, as pure functions.

Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath, sec. 4.1.2, eq. 3): for
each prompt ``q`` draw a group of ``G`` completions ``o_1..o_G`` from the old policy, score them
``r_1..r_G``, and use the group itself as the baseline:

    A_i = (r_i - mean(r)) / (std(r) + 1e-4)                         (outcome supervision)

(Dr. GRPO, Liu et al. 2025, drops the division: ``scale="none"``.) Every token of ``o_i``
shares ``A_i``; with the per-token ratio ``rho_t = pi_theta(o_t | q, o_<t) / pi_old(o_t | ...)``
the per-token loss is PPO's clipped surrogate plus a KL penalty to the reference policy,

    l_t = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) + beta * D_t,
    D_t = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1            (k3, Schulman 2020)

and the loss averages ``l_t`` over the completion tokens. How it averages is the one choice
the variants differ in (``NORMALISE``): ``grpo`` the mean of each completion's token mean
(the paper), ``bnpo`` one mean over all tokens of the batch, ``dr_grpo`` the token sum over
``completions x max_completion_len`` (a constant, so length carries no bias). The values are
those of TRL 1.16 ``GRPOTrainer._compute_loss`` for these losses (tested). The std is the
unbiased sample std, as there. Deliberately left out: sequence-level importance ratios (GSPO),
entropy masks and bonuses, and the other TRL loss types (cispo, sapo, vespo, luspo).
"""

from __future__ import annotations

from typing import Callable

import torch


def group_advantages(rewards: torch.Tensor, num_generations: int, scale: str = "group") -> torch.Tensor:
    """``A_i`` of eq. 3 for rewards ``(P * G,)`` laid out group by group; NaN rewards (no reward
    applied) are left out of their group's statistics and get ``A = 0``."""
    r = rewards.view(-1, num_generations)  # (P, G)
    valid = ~torch.isnan(r)
    n = valid.sum(1, keepdim=True).clamp(min=1)
    mean = torch.where(valid, r, 0.0).sum(1, keepdim=True) / n
    var = torch.where(valid, (r - mean) ** 2, 0.0).sum(1, keepdim=True) / (n - 1).clamp(min=1)
    adv = r - mean
    if scale == "group":
        adv = adv / (var.sqrt() + 1e-4)
    return torch.nan_to_num(adv, nan=0.0).view(-1)


def _per_sequence_mean(per_token: torch.Tensor, mask: torch.Tensor, max_completion_len: int) -> torch.Tensor:
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


def _token_mean(per_token: torch.Tensor, mask: torch.Tensor, max_completion_len: int) -> torch.Tensor:
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def _constant_normaliser(per_token: torch.Tensor, mask: torch.Tensor, max_completion_len: int) -> torch.Tensor:
    return (per_token * mask).sum() / (per_token.size(0) * max_completion_len)


NORMALISE: dict[str, Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]] = {
    "grpo": _per_sequence_mean,
    "bnpo": _token_mean,
    "dr_grpo": _constant_normaliser,
}


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              epsilon_low: float = 0.2, epsilon_high: float = 0.2, beta: float = 0.0,
              ref_logps: torch.Tensor | None = None, loss_type: str = "grpo",
              max_completion_len: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of eq. 3 (as a quantity to minimise) over a batch of completions.

    ``logps``, ``old_logps``, ``ref_logps``: ``(B, T)`` log-probs of the completion tokens under
    ``pi_theta``, ``pi_old`` and ``pi_ref``; ``advantages``: ``(B,)``; ``mask``: ``(B, T)``, 1 on
    completion tokens. Returns the loss and, detached, the token-mean ``kl`` and the fraction of
    tokens whose ratio is clipped (``clip_low``, ``clip_high``).
    """
    mask = mask.to(logps.dtype)
    A = advantages[:, None]  # (B, 1): every token of a completion shares it
    ratio = torch.exp(logps - old_logps)  # rho_t
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * A, clipped * A)
    stats: dict[str, torch.Tensor] = {}
    if beta != 0.0:
        d = ref_logps - logps
        kl = torch.exp(d) - d - 1  # k3: unbiased, always >= 0
        per_token = per_token + beta * kl
        stats["kl"] = _token_mean(kl.detach(), mask, 0)
    loss = NORMALISE[loss_type](per_token, mask, max_completion_len)
    with torch.no_grad():
        stats["clip_low"] = _token_mean(((ratio < 1 - epsilon_low) & (A < 0)).to(mask.dtype), mask, 0)
        stats["clip_high"] = _token_mean(((ratio > 1 + epsilon_high) & (A > 0)).to(mask.dtype), mask, 0)
    return loss, stats
