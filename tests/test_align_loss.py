"""Preference losses: parity with TRL 1.16's own loss code on the same log-probs, and the
invariants of each method (DPO is log 2 when policy equals reference, and so on)."""

import math
import types
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from trl import DPOTrainer, KTOTrainer, RewardTrainer
from trl.experimental.cpo import CPOTrainer
from trl.experimental.orpo import ORPOTrainer

from lmstack.train.align_loss import (bradley_terry_loss, dpo_loss, hinge_loss, ipo_loss, kto_kl, kto_loss,
                                      orpo_loss, robust_dpo_loss, simpo_loss)

B, T = 6, 12
CPU = torch.device("cpu")


def _accelerator():
    return types.SimpleNamespace(device=CPU, gather=lambda x: x, gather_for_metrics=lambda x: x)


def _stub(**attrs):
    """A stand-in ``self`` for a TRL trainer method: the attributes its loss code reads."""
    base = dict(model=types.SimpleNamespace(training=True), accelerator=_accelerator(), aux_loss_enabled=False,
                _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
                args=types.SimpleNamespace())
    return types.SimpleNamespace(**{**base, **attrs})


class _FakeLM:
    """Answers TRL's ``model(..., labels=..., fused_lm_head=True)`` with given per-token log-probs."""

    def __init__(self, per_token: dict):
        self.per_token = per_token  # id(input_ids) -> (rows, T - 1)

    def __call__(self, input_ids, labels=None, **kw):
        lp = self.per_token[id(input_ids)]
        z = torch.zeros_like(lp)
        return types.SimpleNamespace(log_probs=lp, entropy=z, mean_logits=z, is_top1=z.bool())


def _completion_batch(rows, seed):
    """Right-padded rows with a prompt of 2-4 tokens and a completion of 1-7, per-token
    log-probs on the completion (zero elsewhere, as TRL's fused head returns them)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(rows, T, dtype=torch.long)
    for r in range(rows):
        p = int(torch.randint(2, 5, (1,), generator=g))
        c = int(torch.randint(1, 8, (1,), generator=g))
        mask[r, p:p + c] = 1
    per_token = -torch.rand(rows, T - 1, generator=g, dtype=torch.float64) * 3 * mask[:, 1:]
    ids = torch.randint(0, 50, (rows, T), generator=g)
    return ids, mask, per_token


def _trl_dpo(loss_type, beta, label_smoothing, seed=0):
    """TRL's DPOTrainer._compute_loss on a random batch with precomputed reference log-probs;
    returns (its loss, its metrics, the inputs in lmstack's terms)."""
    ids, mask, per_token = _completion_batch(2 * B, seed)
    g = torch.Generator().manual_seed(seed + 1)
    ref = -torch.rand(2 * B, generator=g, dtype=torch.float64) * 10
    stub = _stub(precompute_ref_logps=True, ld_alpha=None, f_divergence_type="reverse_kl", loss_types=[loss_type],
                 loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing, use_weighting=False)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": mask,
              "ref_chosen_logps": ref[:B], "ref_rejected_logps": ref[B:]}
    loss = DPOTrainer._compute_loss(stub, _FakeLM({id(ids): per_token}), inputs, False)
    logps, n = per_token.sum(1), mask.sum(1)
    ours = dict(policy_chosen_logps=logps[:B], policy_rejected_logps=logps[B:], ref_chosen_logps=ref[:B],
                ref_rejected_logps=ref[B:])
    return loss, stub._metrics["train"], ours, n


@pytest.mark.parametrize("loss_type, fn, label_smoothing", [
    ("sigmoid", dpo_loss, 0.0), ("robust", robust_dpo_loss, 0.2), ("robust", robust_dpo_loss, 0.0),
    ("hinge", hinge_loss, 0.0), ("ipo", ipo_loss, 0.0)])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_family_matches_trl(loss_type, fn, label_smoothing, beta):
    loss, metrics, ours, n = _trl_dpo(loss_type, beta, label_smoothing)
    kw = {"label_smoothing": label_smoothing} if loss_type in ("sigmoid", "robust") else {}
    if loss_type == "ipo":
        kw = {"chosen_lengths": n[:B], "rejected_lengths": n[B:]}
    losses, chosen, rejected = fn(**ours, beta=beta, **kw)
    assert abs(float(losses.mean()) - float(loss)) < 1e-6
    assert abs(float(chosen.mean()) - metrics["rewards/chosen"][0]) < 1e-6
    assert abs(float(rejected.mean()) - metrics["rewards/rejected"][0]) < 1e-6
    assert abs(float((chosen > rejected).double().mean()) - metrics["rewards/accuracies"][0]) < 1e-6


def _cpo(loss_type, beta, label_smoothing, gamma=0.0):
    return _stub(alpha=0.0, loss_type=loss_type, beta=beta, label_smoothing=label_smoothing, simpo_gamma=gamma)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_label_smoothed_sigmoid_matches_trls_conservative_form(eps):
    """TRL 1.16 keeps cDPO's label-smoothed sigmoid in its CPO trainer (on log-ratios, no
    reference there); fed the log-ratios, it is DPO's loss with label smoothing."""
    _, _, ours, _ = _trl_dpo("sigmoid", 0.1, 0.0)
    ratio_w = ours["policy_chosen_logps"] - ours["ref_chosen_logps"]
    ratio_l = ours["policy_rejected_logps"] - ours["ref_rejected_logps"]
    want, _, _ = CPOTrainer.cpo_loss(_cpo("sigmoid", 0.1, eps), ratio_w, ratio_l)
    got, _, _ = dpo_loss(**ours, beta=0.1, label_smoothing=eps)
    assert torch.allclose(got, want, atol=1e-9, rtol=0)


@pytest.mark.parametrize("beta, gamma, eps", [(2.0, 0.5, 0.0), (2.5, 1.4, 0.0), (2.0, 0.5, 0.1)])
def test_simpo_matches_trl(beta, gamma, eps):
    _, mask, per_token = _completion_batch(2 * B, 3)
    n = mask.sum(1)
    logps = per_token.sum(1)
    avg = logps / n  # TRL's CPO trainer feeds SimPO the per-token averages
    want, want_w, want_l = CPOTrainer.cpo_loss(_cpo("simpo", beta, eps, gamma), avg[:B], avg[B:])
    got, got_w, got_l = simpo_loss(logps[:B], logps[B:], n[:B], n[B:], beta=beta, gamma=gamma, label_smoothing=eps)
    for a, b in ((got, want), (got_w, want_w), (got_l, want_l)):
        assert torch.allclose(a, b, atol=1e-9, rtol=0)


@pytest.mark.parametrize("lam", [0.1, 1.0])
def test_orpo_odds_ratio_matches_trl(lam):
    _, mask, per_token = _completion_batch(2 * B, 4)
    n = mask.sum(1)
    logps = per_token.sum(1) * 0.4  # keep mean log-probs in (-1.2, 0): both branches of log(1 - e^x)
    avg = logps / n
    ratio, want_w, want_l, _, _ = ORPOTrainer.odds_ratio_loss(_stub(beta=lam), avg[:B].float(), avg[B:].float())
    got, got_w, got_l = orpo_loss(logps[:B].float(), logps[B:].float(), n[:B], n[B:], lam=lam)
    # TRL's term is + lambda log sigma(log odds) (it subtracts it from the NLL); ours adds the NLL
    assert torch.allclose(got - (-avg[:B].float()), -ratio, atol=1e-6, rtol=0)
    assert torch.allclose(got_w, want_w, atol=1e-6) and torch.allclose(got_l, want_l, atol=1e-6)


@pytest.mark.parametrize("beta, w_d, w_u", [(0.1, 1.0, 1.0), (0.5, 1.33, 0.75)])
def test_kto_matches_trl(beta, w_d, w_u):
    ids, mask, per_token = _completion_batch(B, 5)
    kl_ids, kl_mask, kl_per_token = _completion_batch(B, 6)
    kl_ids = kl_ids[:, :T - 1].contiguous()  # another width: TRL pads the mismatched pairs on their own
    kl_mask, kl_per_token = kl_mask[:, :T - 1], kl_per_token[:, :T - 2]
    g = torch.Generator().manual_seed(7)
    ref = -torch.rand(B, generator=g, dtype=torch.float64) * 10
    ref_kl = kl_per_token.sum(1) - torch.rand(B, generator=g, dtype=torch.float64)  # a positive KL estimate
    label = torch.tensor([True, False, True, True, False, False])
    stub = _stub(calculate_KL=True, precompute_ref_logps=True, loss_type="kto", beta=beta,
                 desirable_weight=w_d, undesirable_weight=w_u)
    stub._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, stub)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": mask,
             "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(kl_ids), "KL_completion_mask": kl_mask,
             "label": label, "ref_logps": ref, "ref_KL_logps": ref_kl}
    loss = KTOTrainer._compute_loss(stub, _FakeLM({id(ids): per_token, id(kl_ids): kl_per_token}), batch, False)
    m = stub._metrics["train"]
    kl = kto_kl(kl_per_token.sum(1), ref_kl)
    assert float(kl) > 0 and abs(float(kl) - m["kl"][0]) < 1e-6
    losses, rewards = kto_loss(per_token.sum(1), ref, label, kl, beta=beta, desirable_weight=w_d,
                               undesirable_weight=w_u)
    assert abs(float(losses.mean()) - float(loss)) < 1e-6
    assert abs(float(rewards[label].mean()) - m["rewards/chosen"][0]) < 1e-6
    assert abs(float(rewards[~label].mean()) - m["rewards/rejected"][0]) < 1e-6
    # the KL estimate is clamped at zero: a policy closer than the reference gives z_0 = 0
    assert float(kto_kl(ref_kl - 1, ref_kl)) == 0.0


@pytest.mark.parametrize("margin", [None, torch.tensor([0.0, 0.5, 1.0, 2.0])])
def test_bradley_terry_matches_trls_reward_trainer(margin):
    g = torch.Generator().manual_seed(8)
    scores = torch.randn(8, 1, generator=g, dtype=torch.float64)
    stub = _stub(args=types.SimpleNamespace(center_rewards_coefficient=None))
    inputs = {"input_ids": torch.zeros(8, 3, dtype=torch.long), "attention_mask": torch.ones(8, 3)}
    if margin is not None:
        inputs["margin"] = margin.double()
    model = lambda **kw: types.SimpleNamespace(logits=scores)  # noqa: E731
    want = RewardTrainer.compute_loss(stub, model, inputs)
    got = bradley_terry_loss(scores[:4, 0], scores[4:, 0], 0.0 if margin is None else margin.double())
    assert abs(float(got.mean()) - float(want)) < 1e-9


# -- invariants -------------------------------------------------------------------------------


def test_policy_equal_to_reference():
    lp = -torch.rand(B, dtype=torch.float64) * 20
    lq = -torch.rand(B, dtype=torch.float64) * 20
    n = torch.full((B,), 5)
    for eps in (0.0, 0.1):
        losses, w, l_ = dpo_loss(lp, lq, lp, lq, beta=0.3, label_smoothing=eps)
        assert torch.allclose(losses, torch.full((B,), math.log(2), dtype=torch.float64))
        assert (w == 0).all() and (l_ == 0).all()
    assert torch.allclose(hinge_loss(lp, lq, lp, lq, beta=0.3)[0], torch.ones(B, dtype=torch.float64))
    assert torch.allclose(ipo_loss(lp, lq, lp, lq, n, n, beta=0.25)[0], torch.full((B,), 4.0, dtype=torch.float64))
    # robust DPO at h = 0 is ((1-eps) - eps) log 2 / (1 - 2 eps) = log 2 as well
    assert torch.allclose(robust_dpo_loss(lp, lq, lp, lq, 0.3, 0.2)[0], torch.full((B,), math.log(2), dtype=torch.float64))
    # KTO at r = z_0 = 0 is half of each weight
    losses, r = kto_loss(lp, lp, torch.tensor([True, False] * 3), torch.tensor(0.0), 0.1, 2.0, 1.0)
    assert torch.allclose(losses, torch.tensor([1.0, 0.5] * 3, dtype=torch.float64)) and (r == 0).all()


def test_gradients_push_chosen_up_and_rejected_down():
    for fn, kw in ((dpo_loss, {}), (robust_dpo_loss, {"label_smoothing": 0.2}), (hinge_loss, {})):
        pw = torch.full((B,), -5.0, requires_grad=True)
        pl = torch.full((B,), -5.0, requires_grad=True)
        fn(pw, pl, torch.full((B,), -5.0), torch.full((B,), -5.0), beta=0.1, **kw)[0].sum().backward()
        assert (pw.grad < 0).all() and (pl.grad > 0).all(), fn.__name__
    pw = torch.full((B,), -5.0, requires_grad=True)
    pl = torch.full((B,), -5.0, requires_grad=True)
    n = torch.full((B,), 5)
    (simpo_loss(pw, pl, n, n)[0].sum() + orpo_loss(pw, pl, n, n)[0].sum()).backward()
    assert (pw.grad < 0).all() and (pl.grad > 0).all()


def test_dpo_saturates_and_the_margin_shifts_bradley_terry():
    big = torch.tensor([100.0])
    losses, _, _ = dpo_loss(big, -big, torch.zeros(1), torch.zeros(1), beta=1.0)
    assert float(losses) < 1e-30 and torch.isfinite(losses).all()
    assert torch.allclose(bradley_terry_loss(torch.tensor([2.0]), torch.tensor([1.0]), 1.0),
                          torch.tensor([math.log(2)]))
    assert torch.allclose(bradley_terry_loss(torch.tensor([0.3]), torch.tensor([-0.2])),
                          -F.logsigmoid(torch.tensor([0.5])))
