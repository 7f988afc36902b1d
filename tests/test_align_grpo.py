"""GRPO: rollouts through the engine over the live weights, the loss against TRL, the loop
(a tiny model trains, resume is exact, a NaN reward stops the run before any checkpoint)."""

from __future__ import annotations

import json
import math
import sys
import types

import pytest
import torch

from lmstack.errors import LMStackError
from lmstack.infer.llm import LLM
from lmstack.infer.sampling import SamplingParams
from lmstack.peft import apply_peft
from lmstack.peft.config import PEFTConfig
from lmstack.train.grpo_config import GRPOConfig
from lmstack.train.grpo_loss import group_advantages, grpo_loss
from lmstack.train.rewards import RewardSpec
from lmstack.train.rollout import sample


def _tiny():
    llm = LLM.load("tiny-llama", seed=0)
    return llm


PROMPTS = ["ab", "hello", "1+1="]


# -- rollouts ---------------------------------------------------------------------------------


def test_greedy_rollout_equals_llm_generate():
    llm = _tiny()
    ids = [llm.encode(p) for p in PROMPTS]
    roll = sample(llm.model, llm.tokenizer, ids, 2, SamplingParams(max_new_tokens=12, temperature=0.0))
    from lmstack.infer.generate import generate_ids

    want = generate_ids(llm.model, [p for p in ids for _ in range(2)], SamplingParams(max_new_tokens=12),
                        llm.tokenizer)
    assert roll.completion_ids == want
    assert roll.tokens == sum(map(len, want)) and roll.tokens_per_s > 0


def test_sampled_rollout_equals_llm_generate_with_the_same_seeds():
    llm = _tiny()
    ids = [llm.encode(p) for p in PROMPTS]
    p = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9)
    roll = sample(llm.model, llm.tokenizer, ids, 3, p, seed=7)
    from lmstack.infer.generate import stream_generate

    rows = [q for q in ids for _ in range(3)]
    want = [[] for _ in rows]
    for ev in stream_generate(llm.model, llm.tokenizer, rows, SamplingParams(max_new_tokens=10, temperature=1.0,
                                                                            top_p=0.9, seed=7)):
        if ev.token_id is not None:
            want[ev.row].append(ev.token_id)
    assert roll.completion_ids == want
    assert len({tuple(c) for c in roll.completion_ids[:3]}) > 1  # a group holds different samples
    again = sample(llm.model, llm.tokenizer, ids, 3, p, seed=7)
    assert again.completion_ids == roll.completion_ids


def test_rollout_reads_the_live_lora_weights_and_keeps_the_mode():
    llm = _tiny()
    apply_peft(llm.model, PEFTConfig(method="lora", r=4))
    llm.model.train()
    ids = [llm.encode(p) for p in PROMPTS]
    p = SamplingParams(max_new_tokens=12, temperature=0.0)
    first = sample(llm.model, llm.tokenizer, ids, 1, p).completion_ids
    assert llm.model.training  # restored after sampling
    with torch.no_grad():
        for name, t in llm.model.named_parameters():
            if "lora_B" in name:
                t.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    second = sample(llm.model, llm.tokenizer, ids, 1, p).completion_ids
    assert second != first  # the adapter changed, so the samples did: no stale copy
    from lmstack.infer.generate import generate_ids

    llm.model.eval()
    assert second == generate_ids(llm.model, ids, p, llm.tokenizer)


# -- the objective ----------------------------------------------------------------------------


def test_group_advantages_are_normalised_within_each_group():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    a = group_advantages(r, 4)
    assert torch.allclose(a[:4], (r[:4] - 0.5) / (r[:4].std() + 1e-4))
    assert torch.equal(a[4:], torch.zeros(4))  # a group without spread teaches nothing
    assert torch.allclose(group_advantages(r, 4, "none")[:4], r[:4] - 0.5)
    nan = group_advantages(torch.tensor([1.0, float("nan"), 0.0, 0.0]), 4)
    assert nan[1] == 0 and torch.isfinite(nan).all()


def _trl_compute_loss(loss_type, logps, old, ref, adv, mask, eps_low, eps_high, beta, max_len):
    """TRL 1.16's ``GRPOTrainer._compute_loss`` itself, called on a minimal stand-in for the
    trainer whose log-prob method returns the given ``logps``."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    class Acc:
        num_processes = 1
        sync_gradients = True

        def gather(self, x):
            return x

        gather_for_metrics = gather

        def reduce(self, x, reduction="sum"):
            return x

    from collections import defaultdict

    me = types.SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=beta, loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=False,
        model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=False, aux_loss_enabled=False, accelerator=Acc(), max_completion_length=max_len,
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None), _metrics=defaultdict(lambda: defaultdict(list)),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None))
    B, T = logps.shape
    inputs = {"prompt_ids": torch.ones(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.ones(B, T, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref}
    loss = GRPOTrainer._compute_loss(me, None, inputs)
    return loss, me._metrics["train"]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_matches_trl(loss_type, beta):
    pytest.importorskip("trl")
    g = torch.Generator().manual_seed(3)
    B, T = 6, 9
    logps = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logps + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3  # ratios on both sides of the clip
    ref = logps + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(B):
        mask[b, 3 + b:] = 0  # completions of different lengths
    want, trl_metrics = _trl_compute_loss(loss_type, logps, old, ref, adv, mask, 0.2, 0.28, beta, T)
    got, stats = grpo_loss(logps, old, adv, mask, 0.2, 0.28, beta, ref, loss_type, T)
    assert abs(float(got) - float(want)) < 1e-6
    assert abs(float(stats["clip_low"]) - trl_metrics["clip_ratio/low_mean"][0]) < 1e-6
    assert abs(float(stats["clip_high"]) - trl_metrics["clip_ratio/high_mean"][0]) < 1e-6
    if beta:
        assert abs(float(stats["kl"]) - trl_metrics["kl"][0]) < 1e-6


def test_on_policy_loss_is_minus_the_mean_advantage_and_kl_is_zero_at_the_reference():
    logps = -torch.rand(4, 5, dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, 0.5, 2.0], dtype=torch.float64)
    mask = torch.ones(4, 5)
    loss, stats = grpo_loss(logps, logps, adv, mask, beta=0.1, ref_logps=logps)
    assert abs(float(loss) + float(adv.mean())) < 1e-12
    assert float(stats["kl"]) == 0.0 and float(stats["clip_low"]) == 0.0


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
def test_micro_batch_shares_add_up_to_the_batch_loss(loss_type):
    from lmstack.train.grpo import _share

    g = torch.Generator().manual_seed(5)
    B, T = 8, 6
    logps = (-torch.rand(B, T, generator=g, dtype=torch.float64)).requires_grad_()
    old = logps.detach() + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=g) > 0.3).long()
    mask[:, 0] = 1
    whole, _ = grpo_loss(logps, old, adv, mask, loss_type=loss_type, max_completion_len=T)
    (grad_whole,) = torch.autograd.grad(whole, logps)
    parts = sum(grpo_loss(logps[a:a + 3], old[a:a + 3], adv[a:a + 3], mask[a:a + 3], loss_type=loss_type,
                          max_completion_len=T)[0] * _share(loss_type, mask[a:a + 3], B, int(mask.sum()))
                for a in range(0, B, 3))
    (grad_parts,) = torch.autograd.grad(parts, logps)
    assert abs(float(parts.detach()) - float(whole.detach())) < 1e-12
    assert torch.allclose(grad_parts, grad_whole, atol=1e-12)


# -- the loop ---------------------------------------------------------------------------------


def _data(tmp_path):
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(1, 4) for b in range(1, 3)]
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def _cfg(tmp_path, name="run", **kw):
    data = _data(tmp_path)
    base = dict(model="tiny-llama", data=str(data), val_data=str(data), out_dir=str(tmp_path / name),
                batch_size=2, num_generations=4, max_prompt_len=16, max_completion_len=8, max_steps=4,
                ckpt_interval=2, lr=1e-2, progress=False, logp_batch=4, measure=False,
                peft=PEFTConfig(method="lora", r=4), rewards=[RewardSpec("tests.test_align_grpo:_ends_in_digit")])
    base.update(kw)
    return GRPOConfig(**base)


def _ends_in_digit(prompts, completions, **_):
    """A dense toy reward: the share of digits in the completion."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def _nan_after_two_calls(prompts, completions, **_):
    _nan_after_two_calls.calls += 1
    return [math.nan if _nan_after_two_calls.calls > 2 else 0.5] * len(completions)


def test_grpo_trains_every_lora_tensor_and_logs_its_metrics(tmp_path):
    from lmstack.train.grpo import grpo

    cfg = _cfg(tmp_path, beta=0.05, num_iterations=2, max_steps=4)
    out = grpo(cfg)
    assert out["steps"] == 4 and all(math.isfinite(x) for x in out["losses"])
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = recs[-1]
    for key in ("reward", "reward/tests.test_align_grpo:_ends_in_digit", "kl", "clip_fraction", "completion_len",
                "gen_tokens_per_s", "val_accuracy"):
        assert key in last, key
    assert [r["generation"] for r in recs if "generation" in r] == [0, 0, 1, 1]
    tuned = LLM.load("tiny-llama", seed=0, adapter=tmp_path / "run" / "adapter")
    base = _tiny()
    apply_peft(base.model, PEFTConfig(method="lora", r=4))
    for (name, a), (_, b) in zip(tuned.model.named_parameters(), base.model.named_parameters()):
        if "lora_" in name:
            assert not torch.equal(a, b), f"{name} did not train"


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    from lmstack.train.checkpoint import latest_checkpoint
    from lmstack.train.grpo import grpo

    full = grpo(_cfg(tmp_path, "full"))
    grpo(_cfg(tmp_path, "part", max_steps=2))
    cfg = _cfg(tmp_path, "part")
    assert latest_checkpoint(tmp_path / "part" / "checkpoints") is not None
    resumed = grpo(cfg, resume=True)
    assert resumed["losses"] == full["losses"][2:]


def test_a_nan_reward_stops_the_run_naming_the_function_before_any_checkpoint(tmp_path):
    from lmstack.train.grpo import grpo

    _nan_after_two_calls.calls = 0
    name = "tests.test_align_grpo:_nan_after_two_calls"
    cfg = _cfg(tmp_path, rewards=[RewardSpec(name)], ckpt_interval=2, max_steps=6)
    with pytest.raises(LMStackError, match=r"_nan_after_two_calls.*nan"):
        grpo(cfg)
    steps = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith("step"))
    assert steps == ["step-00000002"]  # the third batch's NaN reward: no step 3, no checkpoint after it


def test_config_checks_and_cli_reward_names():
    with pytest.raises(LMStackError, match="num_generations"):
        GRPOConfig(num_generations=1).check()
    with pytest.raises(LMStackError, match="ckpt_interval"):
        GRPOConfig(num_iterations=2, ckpt_interval=5).check()
    with pytest.raises(LMStackError, match="beta"):
        GRPOConfig(beta=0.1, peft=PEFTConfig(method="full")).check()
    cfg = GRPOConfig(rewards=["exact_match", "pkg.mod:fn"])
    assert [r.name for r in cfg.rewards] == ["exact_match", "pkg.mod:fn"]


def test_every_shipped_grpo_recipe_loads():
    from pathlib import Path

    from lmstack.config import load_config

    found = sorted((Path(__file__).parents[1] / "recipes" / "align").glob("grpo-*.yaml"))
    assert [p.name for p in found] == ["grpo-smollm2.yaml"]
    for path in found:
        cfg = load_config(GRPOConfig, path)
        cfg.check()
        assert cfg.num_generations == 8 and [r.name for r in cfg.rewards] == ["exact_match", "json_schema",
                                                                               "unit_tests"]


sys.modules.setdefault("tests.test_align_grpo", sys.modules[__name__])
