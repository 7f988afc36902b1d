"""Preference losses as pure functions in the papers' notation.

Inputs are per-sequence log-likelihoods ``log pi(y | x)`` summed over completion tokens,
shape ``(B,)``: ``policy_*`` under the policy being trained, ``ref_*`` under the frozen
reference; the length-normalised losses also take the completion lengths ``|y|``. Each
returns per-example losses ``(B,)`` (the loop averages them) and, where the method defines
one, the implicit rewards of the chosen and rejected completions (detached, for logging).

With ``h = log pi(y_w|x)/pi_ref(y_w|x) - log pi(y_l|x)/pi_ref(y_l|x)`` (``y_w`` chosen,
``y_l`` rejected), the DPO family differs only in the function of ``h`` it minimises:

    sigmoid   -log sigma(beta h)                       Rafailov et al. 2023, eq. 7
              label smoothing eps (cDPO): -(1-eps) log sigma(beta h) - eps log sigma(-beta h)
    robust    the unbiased estimate under label noise eps   Chowdhury et al. 2024 (rDPO)
    hinge     max(0, 1 - beta h)                        Zhao et al. 2023 (SLiC-HF)
    ipo       (h / |y| - 1 / (2 beta))^2                Azar et al. 2023, eq. 17

SimPO and ORPO need no reference model; KTO scores single completions against a batch
estimate of the policy/reference KL. Bradley-Terry is the reward-model loss. The formulas
and defaults match TRL 1.16 (``tests/test_align_loss.py`` checks each against TRL's code);
where TRL differs from the paper it is said at the function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Rewards = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (losses, chosen_rewards, rejected_rewards)


def _dpo_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """The implicit rewards ``beta log pi/pi_ref`` of chosen and rejected (Rafailov et al. 2023, eq. 5)."""
    chosen = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected = beta * (policy_rejected_logps - ref_rejected_logps)
    return chosen, rejected


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1,
             label_smoothing: float = 0.0) -> Rewards:
    """DPO, Rafailov et al. 2023 eq. 7: ``-log sigma(beta h)``.

    ``label_smoothing`` eps > 0 is conservative DPO (Mitchell 2023, "A note on DPO with noisy
    preferences"): the label is right with probability 1 - eps, so the loss is the cross-entropy
    against ``(1 - eps, eps)``. TRL 1.16 keeps this form in its CPO/TPO trainers; its
    ``DPOTrainer`` ``sigmoid`` is the eps = 0 case.
    """
    chosen, rejected = _dpo_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                    ref_rejected_logps, beta)
    z = chosen - rejected  # beta h
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return losses, chosen.detach(), rejected.detach()


def robust_dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                    ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1,
                    label_smoothing: float = 0.0) -> Rewards:
    """Robust DPO, Chowdhury et al. 2024 ("Provably Robust DPO", the rDPO loss): with labels flipped at
    rate eps < 1/2, ``((1-eps) l(beta h) - eps l(-beta h)) / (1 - 2 eps)``, ``l(z) = -log sigma(z)``,
    is an unbiased estimate of the clean loss (unlike cDPO, which only smooths it)."""
    chosen, rejected = _dpo_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                    ref_rejected_logps, beta)
    z = chosen - rejected
    eps = label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    return losses, chosen.detach(), rejected.detach()


def hinge_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
               ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1) -> Rewards:
    """SLiC-HF's rank calibration loss (Zhao et al. 2023) on the reference log-ratio, margin 1/beta:
    ``max(0, 1 - beta h)``."""
    chosen, rejected = _dpo_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                    ref_rejected_logps, beta)
    return torch.relu(1 - (chosen - rejected)), chosen.detach(), rejected.detach()


def ipo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, chosen_lengths: torch.Tensor,
             rejected_lengths: torch.Tensor, beta: float = 0.1) -> Rewards:
    """IPO, Azar et al. 2023 eq. 17, with beta the paper's tau: ``(h - 1/(2 tau))^2``.

    Each log-ratio is divided by its completion length first (TRL does so, agreed with the
    authors: the paper's results use the per-token form), so beta means the same at any length.
    The rewards logged are the unnormalised ``beta log pi/pi_ref``, as for DPO.
    """
    chosen, rejected = _dpo_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                    ref_rejected_logps, beta)
    h = ((policy_chosen_logps - ref_chosen_logps) / chosen_lengths.clamp(min=1)
         - (policy_rejected_logps - ref_rejected_logps) / rejected_lengths.clamp(min=1))
    return (h - 1 / (2 * beta)) ** 2, chosen.detach(), rejected.detach()


def simpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
               chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor, beta: float = 2.0,
               gamma: float = 0.5, label_smoothing: float = 0.0) -> Rewards:
    """SimPO, Meng et al. 2024 eq. 6: no reference, the reward is the length-normalised
    ``beta/|y| log pi(y|x)`` and the chosen must win by a margin gamma:
    ``-log sigma(r_w - r_l - gamma)`` (with eps label smoothing as in cDPO, as TRL's CPO trainer)."""
    chosen = beta * policy_chosen_logps / chosen_lengths.clamp(min=1)
    rejected = beta * policy_rejected_logps / rejected_lengths.clamp(min=1)
    z = chosen - rejected - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return losses, chosen.detach(), rejected.detach()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for x < 0, stable at both ends (Maechler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
              chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor, lam: float = 0.1) -> Rewards:
    """ORPO, Hong et al. 2024 eqs. 2, 6-7: ``L_SFT + lambda L_OR`` with
    ``L_OR = -log sigma(log odds(y_w|x) - log odds(y_l|x))``, ``odds(y|x) = P/(1 - P)``,
    ``P = exp(log pi(y|x) / |y|)`` (the per-token mean likelihood, as in the paper's code).

    ``L_SFT`` here is each chosen completion's mean token NLL. TRL's ORPO trainer instead takes
    one token-mean over the whole batch's chosen sequences, prompt tokens included; the odds-ratio
    term is the same. Rewards logged: ``lambda log P``, as TRL.
    """
    mean_w = policy_chosen_logps.float() / chosen_lengths.clamp(min=1)
    mean_l = policy_rejected_logps.float() / rejected_lengths.clamp(min=1)
    log_odds = (mean_w - mean_l) - (_log1mexp(mean_w) - _log1mexp(mean_l))
    losses = -mean_w - lam * F.logsigmoid(log_odds)
    return losses, (lam * mean_w).detach(), (lam * mean_l).detach()


def kto_kl(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z_0 = KL(pi || pi_ref), Ethayarajh et al. 2024 sec. 4.1: estimated
    on mismatched (prompt, completion) pairs of the batch as ``mean(log pi - log pi_ref)``, clamped
    at 0 and detached (no gradient flows through the reference point)."""
    return (policy_kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor,
             beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO, Ethayarajh et al. 2024 eqs. 7-8: with ``r = log pi(y|x)/pi_ref(y|x)``, a desirable
    completion costs ``lambda_D (1 - sigma(beta (r - z_0)))``, an undesirable one
    ``lambda_U (1 - sigma(beta (z_0 - r)))``. (The paper's value ``lambda_y - v`` differs by the
    constant ``lambda_y``.) ``desirable`` is a bool ``(B,)``; ``kl`` is ``kto_kl``'s z_0.
    Returns per-example losses and rewards ``beta r``."""
    r = policy_logps - ref_logps
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (r - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - r))))
    return losses, (beta * r).detach()


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor,
                       margin: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Reward-model loss under the Bradley-Terry model (Bradley & Terry 1952; Ouyang et al. 2022
    eq. 1): ``-log sigma(r(x, y_w) - r(x, y_l) - m)``, with the optional margin ``m`` of Llama 2
    (Touvron et al. 2023, eq. 2). Per-example losses ``(B,)``."""
    return -F.logsigmoid(chosen_scores - rejected_scores - margin)
