"""PPO (``lmstack ppo``): GAE against a reference written differently, the clipped losses, and a
few steps on a tiny random model (KL 0 at the start, exact resume, bad configs)."""

import json
import math

import pytest
import torch

from lmstack.config import config_from_dict
from lmstack.errors import ConfigError
from lmstack.infer.llm import LLM
from lmstack.train.ppo import gae, kl_rewards, policy_loss, ppo, value_loss, whiten
from lmstack.train.reward_model import RewardModel
from lmstack.train.rm_config import PPOConfig


def _gae_reference(rewards, values, lengths, gamma, lam):
    """Each row alone, from the definition: A_t = sum_l (gamma lam)^l delta_{t+l}, V after the end = 0."""
    out = torch.zeros_like(rewards, dtype=torch.float64)
    for b, n in enumerate(lengths):
        r, v = rewards[b, :n].double().tolist(), values[b, :n].double().tolist() + [0.0]
        deltas = [r[t] + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            out[b, t] = sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t))
    return out


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_the_definition(gamma, lam):
    torch.manual_seed(0)
    lengths = [7, 3, 1, 5]
    mask = torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]
    rewards = torch.randn(4, 7) * mask
    values = torch.randn(4, 7) * mask
    got = gae(rewards, values, gamma, lam)
    want = _gae_reference(rewards, values, lengths, gamma, lam)
    assert torch.allclose(got.double() * mask, want, atol=1e-6)
    assert (got * ~mask).abs().max() == 0  # nothing leaks into the padding
    if lam == 1.0 and gamma == 1.0:  # Monte Carlo: returns-to-go minus the value
        rtg = rewards.flip(1).cumsum(1).flip(1)
        assert torch.allclose(got, (rtg - values) * mask, atol=1e-5)


def test_clipped_losses_and_kl_rewards():
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    old = torch.zeros(4)
    new = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5]))
    loss, clipped = policy_loss(new, old, adv, 0.2)
    # A > 0 caps the gain at 1 + eps; A < 0 keeps the larger (unclipped) penalty, and symmetrically below
    assert loss.tolist() == pytest.approx([-1.2, 1.5, -0.5, 0.8], abs=1e-6)
    assert clipped.tolist() == [1.0, 0.0, 0.0, 1.0]
    same, _ = policy_loss(old, old, adv, 0.2)
    assert same.tolist() == pytest.approx((-adv).tolist())
    v = value_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([2.0, 1.0]), 0.5)
    assert v.tolist() == pytest.approx([0.5 * 1.5 ** 2, 0.5], abs=1e-6)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    logp, ref = torch.full((2, 4), -1.0) * mask, torch.full((2, 4), -1.5) * mask
    r = kl_rewards(logp, ref, torch.tensor([2.0, -1.0]), mask, 0.1)
    assert torch.allclose(r, torch.tensor([[-0.05, -0.05, 1.95, 0.0], [-1.05, 0.0, 0.0, 0.0]]), atol=1e-6)
    w = whiten(torch.tensor([[1.0, 2.0, 3.0, 9.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    assert w[0, :3].mean().item() == pytest.approx(0.0, abs=1e-6) and w[0, 3] == 0


def _setup(tmp_path):
    tmp_path.mkdir(parents=True, exist_ok=True)
    llm = LLM.load("tiny-llama", seed=1)
    rm = RewardModel(llm.model, llm.tokenizer, base="tiny-llama", max_len=128)
    torch.manual_seed(0)
    torch.nn.init.normal_(rm.head.weight, std=1.0)
    rm.save(tmp_path / "rm")
    rows = [{"prompt": [{"role": "user", "content": f"{i}+{i % 3}="}], "answer": str(i + i % 3)} for i in range(12)]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows + rows[:3]))  # repeated prompts are kept once
    return tmp_path / "rm", data


def _cfg(tmp_path, **kw):
    rm, data = _setup(tmp_path)
    base = dict(model="tiny-llama", reward_model=str(rm), data=str(data), val_data=str(data), eval_samples=4,
                out_dir=str(tmp_path / "run"), batch_size=4, max_steps=4, ppo_epochs=2, mini_batches=1,
                max_new_tokens=6, lr=1e-2, min_lr=1e-3, warmup_steps=1, eval_interval=2, ckpt_interval=2,
                keep_last=10, progress=False, kl_coef=0.1)
    base.update(kw)
    return config_from_dict(PPOConfig, {**base, "peft": {"method": "lora", "r": 4, "alpha": 8}})


def test_ppo_runs_with_kl_zero_at_the_start(tmp_path):
    out = ppo(_cfg(tmp_path))
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "pg_loss" in r]
    assert len(steps) == 4 and all(math.isfinite(r["loss"]) for r in steps)
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the adapters start at zero: policy == reference
    assert recs[0]["step"] == 0 and recs[0]["val_kl"] == pytest.approx(0.0, abs=1e-6)
    assert steps[0]["clipfrac"] == 0.0  # first update of a cycle: ratio exactly 1
    assert steps[2]["kl"] != 0.0  # the second cycle samples from the updated policy
    assert [r["step"] for r in recs if "val_score" in r] == [0, 2, 4]
    assert {"before", "after"} <= set(out) and out["before"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert (tmp_path / "run" / "adapter").is_dir()


@pytest.mark.slow
def test_ppo_resume_reproduces_the_uninterrupted_run(tmp_path):
    full = ppo(_cfg(tmp_path / "a"))
    ppo(_cfg(tmp_path / "b", max_steps=2))
    resumed = ppo(_cfg(tmp_path / "b"), resume=True)
    assert resumed["losses"] == pytest.approx(full["losses"][2:], abs=1e-5)


def test_ppo_config_errors_name_the_field(tmp_path):
    for kw, field in ((dict(max_steps=5), "max_steps"), (dict(ckpt_interval=3), "ckpt_interval"),
                      (dict(temperature=0.0), "temperature"), (dict(mini_batches=8), "mini_batches"),
                      (dict(lam=1.5), "lam"), (dict(reward_model=""), "reward_model")):
        with pytest.raises(ConfigError, match=field):
            _cfg(tmp_path, **kw).check()
    cfg = _cfg(tmp_path)
    cfg.peft.method = "full"
    with pytest.raises(ConfigError, match="peft.method"):
        cfg.check()
