"""DPO family and KTO loops on tiny-llama: the first-step invariants (policy = reference),
base weights untouched, exact resume, the non-finite guard, the reference through disabled
adapters, full fine-tuning's precomputed reference, the CLI and the shipped recipes."""

import json
import math
from pathlib import Path

import pytest
import torch

from lmstack.errors import LMStackError
from lmstack.peft import PEFTConfig
from lmstack.train import dpo as dpo_mod
from lmstack.train.align_config import DPOConfig, KTOConfig
from lmstack.train.dpo import dpo
from lmstack.train.kto import kto

ROOT = Path(__file__).resolve().parents[1]


def _pairs(tmp_path, n=16):
    rows = []
    for i in range(n):
        a, b = i % 7 + 1, i % 5 + 2
        u = [{"role": "user", "content": f"{a}+{b}?"}]
        rows.append({"prompt": u, "chosen": [{"role": "assistant", "content": str(a + b)}],
                     "rejected": [{"role": "assistant", "content": f"{a + b + 1} or so"}]})
    p = tmp_path / "pref.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    q = tmp_path / "kto.jsonl"
    q.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"}) + "\n"
                         for r in rows for k in ("chosen", "rejected")))
    return str(p), str(q)


def _cfg(cls, tmp_path, data, **kw):
    base = dict(model="tiny-llama", data=data, val_data=data, out_dir=str(tmp_path / "run"), max_steps=3,
                batch_size=4, lr=1e-3, warmup_steps=0, progress=False, eval_interval=2, ckpt_interval=2,
                threads=2, peft=PEFTConfig(method="lora", r=4, alpha=8))
    base.update(kw)
    return cls(**base)


def _records(tmp_path):
    return [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


FIRST_LOSS = {"sigmoid": math.log(2), "robust": math.log(2), "hinge": 1.0, "ipo": 1 / (4 * 0.1 ** 2)}


@pytest.mark.parametrize("loss", ["sigmoid", "orpo"] + [pytest.param(x, marks=pytest.mark.slow)
                                                           for x in ("robust", "hinge", "ipo", "simpo")])
def test_each_loss_trains_and_starts_where_policy_equals_reference(tmp_path, loss):
    data, _ = _pairs(tmp_path)
    kw = {"label_smoothing": 0.1} if loss == "robust" else {}
    out = dpo(_cfg(DPOConfig, tmp_path, data, loss=loss, **kw))
    assert len(out["losses"]) == 3 and all(math.isfinite(x) for x in out["losses"])
    if loss in FIRST_LOSS:  # LoRA starts with B = 0: policy == reference, every reward 0
        assert out["losses"][0] == pytest.approx(FIRST_LOSS[loss], rel=1e-6)
    recs = _records(tmp_path)
    first = next(r for r in recs if r["step"] == 1)
    assert {"rewards_chosen", "rewards_rejected", "margin", "reward_acc", "logps_chosen"} <= set(first)
    if loss in FIRST_LOSS:
        assert first["rewards_chosen"] == 0 and first["reward_acc"] == 0.5
        assert recs[0]["step"] == 0 and recs[0]["val_reward_acc"] == 0.5  # before training: chance
    assert "val_reward_acc" in recs[-1] and (tmp_path / "run" / "adapter").is_dir()
    assert (tmp_path / "run" / "rewards.png").is_file() or not _has_matplotlib()


def _has_matplotlib():
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


@pytest.mark.slow
def test_dpo_learns_the_preference_and_leaves_the_base_untouched(tmp_path):
    from lmstack import LLM

    data, _ = _pairs(tmp_path)
    out = dpo(_cfg(DPOConfig, tmp_path, data, max_steps=12, eval_interval=12, lr=3e-3))
    assert out["losses"][-1] < out["losses"][0] - 0.05
    assert out["val_reward_acc"] > out["val_reward_acc_before"] == 0.5
    base = LLM.load("tiny-llama", seed=0).model.state_dict()
    tuned = LLM.load("tiny-llama", seed=0, adapter=tmp_path / "run" / "adapter").model
    frozen = {k: v for k, v in tuned.state_dict().items() if "lora_" not in k}
    assert frozen.keys() == base.keys() and all(torch.equal(frozen[k], base[k]) for k in base)


def test_reference_is_the_base_model_with_adapters_off():
    from lmstack import LLM
    from lmstack.peft import apply_peft
    from lmstack.peft.lora import LoRALinear
    from lmstack.tokenizer.byte_level import byte_level_tokenizer
    from lmstack.train.align_common import collate, completion_logps, encode, reference_logps

    tok = byte_level_tokenizer()
    b = collate([encode(tok, "2+2=", " 4", 64), encode(tok, "The sky is", " blue, mostly.", 64)], 0)
    base = LLM.load("tiny-llama", seed=0).model.eval()
    policy = LLM.load("tiny-llama", seed=0).model.eval()
    apply_peft(policy, PEFTConfig(method="lora", r=4, alpha=8))
    torch.manual_seed(1)
    for m in policy.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B, std=0.5)  # a trained adapter, far from zero
    with torch.no_grad():
        want = completion_logps(base, b["input_ids"], b["completion_mask"])[0]
        tuned = completion_logps(policy, b["input_ids"], b["completion_mask"])[0]
    ref = reference_logps(policy, b)
    assert torch.equal(ref, want)
    assert not torch.allclose(tuned, want)  # the adapters do change the policy


@pytest.mark.slow
def test_dpo_resume_is_exact(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from lmstack.train.common import MetricsLog

    data, _ = _pairs(tmp_path)
    full = dpo(_cfg(DPOConfig, tmp_path / "a", data, max_steps=6))
    orig = MetricsLog.log

    class Killed(BaseException):
        pass

    def log(self, rec):
        if rec.get("step") == 5 and "loss" in rec:
            raise Killed()
        orig(self, rec)

    monkeypatch.setattr(MetricsLog, "log", log)
    with pytest.raises(Killed):
        dpo(_cfg(DPOConfig, tmp_path / "b", data, max_steps=6))
    monkeypatch.undo()
    again = dpo(_cfg(DPOConfig, tmp_path / "b", data, max_steps=6), resume=True)  # from the step-4 checkpoint
    assert again["losses"] == full["losses"][4:]
    for f in sorted((tmp_path / "a" / "run" / "adapter").glob("*.safetensors")):
        a, b = load_file(str(f)), load_file(str(tmp_path / "b" / "run" / "adapter" / f.name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_full_fine_tuning_precomputes_the_reference_once_and_resumes_with_it(tmp_path, monkeypatch):
    from lmstack.train.common import MetricsLog

    data, _ = _pairs(tmp_path)
    full = _cfg(DPOConfig, tmp_path / "a", data, max_steps=4, lr=1e-4, peft=PEFTConfig(method="full"))
    out = dpo(full)
    assert out["losses"][0] == pytest.approx(math.log(2), rel=1e-6)  # policy == its own starting weights
    assert (tmp_path / "a" / "run" / "ref_logps_train.pt").is_file()
    assert (tmp_path / "a" / "run" / "final").is_dir()
    orig = MetricsLog.log

    class Killed(BaseException):
        pass

    def log(self, rec):
        if rec.get("step") == 3 and "loss" in rec:
            raise Killed()
        orig(self, rec)

    monkeypatch.setattr(MetricsLog, "log", log)
    with pytest.raises(Killed):
        dpo(_cfg(DPOConfig, tmp_path / "b", data, max_steps=4, lr=1e-4, peft=PEFTConfig(method="full")))
    monkeypatch.undo()
    computed = []
    real = dpo_mod.reference_logps
    monkeypatch.setattr(dpo_mod, "reference_logps", lambda *a, **k: computed.append(1) or real(*a, **k))
    again = dpo(_cfg(DPOConfig, tmp_path / "b", data, max_steps=4, lr=1e-4, peft=PEFTConfig(method="full")),
                resume=True)
    assert not computed  # the reference log-probs of the starting weights are read back, not recomputed
    assert again["losses"] == out["losses"][2:]


@pytest.mark.slow
def test_precomputed_reference_equals_the_live_one(tmp_path):
    data, _ = _pairs(tmp_path)
    live = dpo(_cfg(DPOConfig, tmp_path / "a", data))
    pre = dpo(_cfg(DPOConfig, tmp_path / "b", data, precompute_ref=True))
    assert pre["losses"] == pytest.approx(live["losses"], abs=1e-5)


def test_nonfinite_loss_stops_or_is_skipped(tmp_path, monkeypatch):
    data, _ = _pairs(tmp_path)
    real = dpo_mod.LOSSES["sigmoid"]
    calls = []

    def poisoned(p, c):
        losses, w, l_ = real(p, c)
        calls.append(1)
        return (losses * float("nan") if len(calls) == 2 else losses), w, l_

    monkeypatch.setitem(dpo_mod.LOSSES, "sigmoid", poisoned)
    with pytest.raises(LMStackError, match="non-finite loss"):
        dpo(_cfg(DPOConfig, tmp_path / "a", data, val_data=""))
    calls.clear()
    out = dpo(_cfg(DPOConfig, tmp_path / "b", data, val_data="", on_nonfinite="skip"))
    assert len(out["losses"]) == 2 and all(math.isfinite(x) for x in out["losses"])
    assert any("skipped" in r for r in _records(tmp_path / "b"))


def test_kto_starts_at_half_the_weights_and_trains(tmp_path):
    _, data = _pairs(tmp_path)
    out = kto(_cfg(KTOConfig, tmp_path, data, max_steps=2, desirable_weight=1.0, undesirable_weight=1.0))
    assert out["losses"][0] == pytest.approx(0.5, rel=1e-6)  # r = z_0 = 0: 1 - sigma(0) for every example
    assert all(math.isfinite(x) for x in out["losses"])
    recs = _records(tmp_path)
    assert {"kl", "rewards_chosen", "rewards_rejected", "margin", "reward_acc"} <= set(recs[1])
    assert recs[1]["kl"] == 0 and "val_kl" in recs[-1]
    assert (tmp_path / "run" / "adapter").is_dir()


def test_kto_mismatched_pairs_are_a_derangement():
    from lmstack.train.kto import mismatched

    items = [([i], [100 + i]) for i in range(9)]
    kl = mismatched(items, seed=0, max_len=8)
    assert [p for p, _ in kl] == [p for p, _ in items]
    partners = [c[0] - 100 for _, c in kl]
    assert sorted(partners) == list(range(9)) and all(j != i for i, j in enumerate(partners))


def test_config_errors_name_the_field():
    for kw, words in [({"loss": "ipo", "label_smoothing": 0.1}, "label_smoothing"), ({"beta": 0.0}, "beta"),
                      ({"loss": "robust", "label_smoothing": 0.5}, "label_smoothing"),
                      ({"ref_model": "x"}, "ref_model"), ({"max_prompt_len": 600}, "max_prompt_len")]:
        with pytest.raises(LMStackError, match=words):
            DPOConfig(**kw).check()
    with pytest.raises(LMStackError, match="batch_size"):
        KTOConfig(batch_size=1).check()


def test_cli_runs_dpo_and_kto(tmp_path, capsys):
    from lmstack.cli.main import main

    pref, unpaired = _pairs(tmp_path)
    common = ["--model", "tiny-llama", "--max-steps", "2", "--batch-size", "4", "--no-progress", "--threads", "2",
              "--eval-interval", "2"]
    assert main(["dpo", "--data", pref, "--val-data", pref, "--out-dir", str(tmp_path / "d"), "--loss", "ipo",
                 *common]) == 0
    assert "held-out preference accuracy: 0.500 ->" in capsys.readouterr().out
    assert main(["kto", "--data", unpaired, "--val-data", "", "--out-dir", str(tmp_path / "k"), *common]) == 0
    assert main(["dpo", "--data", str(tmp_path / "nope.jsonl"), "--out-dir", str(tmp_path / "x"), *common]) == 2


def test_shipped_align_recipes_load():
    from lmstack.config import load_config

    found = sorted((ROOT / "recipes" / "align").glob("dpo-*.yaml")) + sorted(
        (ROOT / "recipes" / "align").glob("kto-*.yaml"))
    for p in found:
        load_config({"dpo": DPOConfig, "kto": KTOConfig}[p.name.split("-")[0]], p).check()
    assert len(found) == 2
