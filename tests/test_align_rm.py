"""Reward model (``lmstack rm``) and the built-in preference data: invariants on a tiny random model."""

import json
import math
from importlib import resources

import pytest
import torch

from lmstack.config import config_from_dict
from lmstack.errors import ConfigError, LMStackError
from lmstack.infer.llm import LLM
from lmstack.train.align_loss import bradley_terry_loss
from lmstack.train.reward_model import RewardModel
from lmstack.train.rm import rm
from lmstack.train.rm_config import RMConfig


def _pairs(n=16):
    """Plain-text pairs whose chosen answer is the right sum and the rejected one a wrong one."""
    rows = []
    for i in range(n):
        a, b = i % 7, (i * 3) % 5
        rows.append({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1 + i % 3)})
    return rows


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(tmp_path, **kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = _write(tmp_path / "pairs.jsonl", _pairs())
    base = dict(model="tiny-llama", data=str(data), val_data=str(data), out_dir=str(tmp_path / "run"),
                batch_size=4, max_steps=4, lr=1e-2, min_lr=1e-3, warmup_steps=1, eval_interval=2,
                ckpt_interval=2, keep_last=10, progress=False, max_len=64)
    peft = kw.pop("peft", {"method": "lora", "r": 4, "alpha": 8})
    base.update(kw)
    return config_from_dict(RMConfig, {**base, "peft": peft})


def _tiny(seed=0) -> RewardModel:
    llm = LLM.load("tiny-llama", seed=seed)
    return RewardModel(llm.model, llm.tokenizer, base="tiny-llama", max_len=256)


def test_zero_head_gives_equal_rewards_and_loss_log2():
    model = _tiny()
    p = _pairs(4)
    rc = torch.tensor(model.score([x["prompt"] for x in p], [x["chosen"] for x in p]))
    rj = torch.tensor(model.score([x["prompt"] for x in p], [x["rejected"] for x in p]))
    assert rc.abs().max() == 0 and rj.abs().max() == 0
    assert bradley_terry_loss(rc, rj).tolist() == pytest.approx([math.log(2)] * 4, abs=1e-7)


def test_reward_reads_the_last_real_token_and_ignores_padding():
    torch.manual_seed(0)
    model = _tiny()
    torch.nn.init.normal_(model.head.weight, std=0.5)
    ids = torch.randint(3, 200, (3, 9))
    lengths = torch.tensor([9, 4, 6])
    r = model(ids, lengths)
    h = model.core(ids, return_hidden=True)  # (B, T, C)
    want = model.head(h[torch.arange(3), lengths - 1])
    assert torch.allclose(r, want, atol=1e-5)
    # A row scored alone (no padding) gets the same reward as inside the padded batch.
    alone = model(ids[1:2, :4], torch.tensor([4]))
    assert alone.item() == pytest.approx(r[1].item(), abs=1e-5)
    with pytest.raises(LMStackError, match="lengths"):
        model(ids, torch.tensor([9, 0, 6]))


def test_a_step_lowers_the_loss_on_a_fixed_batch():
    from lmstack.peft.config import PEFTConfig
    from lmstack.peft.core import apply_peft
    from lmstack.train.align_common import encode
    from lmstack.train.rm import pair_rewards

    model = _tiny()
    apply_peft(model.core, PEFTConfig(method="lora", r=4, alpha=8))
    tok = model.tokenizer
    pairs = [(encode(tok, x["prompt"], x["chosen"], 64), encode(tok, x["prompt"], x["rejected"], 64))
             for x in _pairs(8)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        rc, rj = pair_rewards(model, pairs, 0, "cpu")
        loss = bradley_terry_loss(rc, rj).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


@pytest.mark.parametrize("method", ["full", "lora"])
def test_save_load_round_trip_gives_identical_scores(tmp_path, method):
    from lmstack.peft.config import PEFTConfig
    from lmstack.peft.core import apply_peft

    model = _tiny()
    apply_peft(model.core, PEFTConfig(method=method, r=4, alpha=8))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    p = _pairs(6)
    prompts = [x["prompt"] for x in p] + [[{"role": "user", "content": "hi"}]]
    completions = [x["chosen"] for x in p] + ["hello"]  # a chat prompt answered in plain text is wrapped
    before = model.score(prompts, completions, batch_size=4)
    model.save(tmp_path / "rm")
    assert (tmp_path / "rm" / ("model" if method == "full" else "adapter")).is_dir()
    after = RewardModel.load(tmp_path / "rm").score(prompts, completions)
    assert after == pytest.approx(before, abs=1e-6)
    assert len(set(before)) > 1


def test_rm_trains_reports_accuracy_and_saves(tmp_path):
    out = rm(_cfg(tmp_path, max_steps=6, eval_interval=3))
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # zero head: every pair starts tied
    assert {"accuracy", "margin", "reward_mean"} <= set(steps[0])
    assert [r["step"] for r in recs if "val_accuracy" in r] == [3, 6]
    assert 0.0 <= out["val_accuracy"] <= 1.0
    assert out["losses"][-1] < math.log(2)
    loaded = RewardModel.load(tmp_path / "run" / "reward_model")
    p = _pairs()
    rc = loaded.score([x["prompt"] for x in p], [x["chosen"] for x in p])
    rj = loaded.score([x["prompt"] for x in p], [x["rejected"] for x in p])
    acc = sum(a > b for a, b in zip(rc, rj)) / len(p)
    assert acc == pytest.approx(out["val_accuracy"], abs=1e-9)  # the saved model is the evaluated one


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, method):
    peft = {"method": method, "r": 4, "alpha": 8}
    full = rm(_cfg(tmp_path / "a", peft=peft))
    rm(_cfg(tmp_path / "b", peft=peft, max_steps=2))
    resumed = rm(_cfg(tmp_path / "b", peft=peft), resume=True)
    assert resumed["losses"] == pytest.approx(full["losses"][2:], abs=1e-6)
    p = _pairs(5)
    a = RewardModel.load(tmp_path / "a" / "run" / "reward_model").score([x["prompt"] for x in p],
                                                                          [x["chosen"] for x in p])
    b = RewardModel.load(tmp_path / "b" / "run" / "reward_model").score([x["prompt"] for x in p],
                                                                          [x["chosen"] for x in p])
    assert a == pytest.approx(b, abs=1e-6)


def test_margin_shifts_the_loss():
    rc, rj = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.5])
    assert bradley_terry_loss(rc, rj, 0.5).tolist() == pytest.approx(
        [-math.log(1 / (1 + math.exp(-0.5))), -math.log(1 / (1 + math.exp(1.0)))], abs=1e-6)


def test_bad_input_is_named(tmp_path):
    rows = _pairs(3)
    del rows[1]["rejected"]
    cfg = _cfg(tmp_path)
    cfg.data = str(_write(tmp_path / "bad.jsonl", rows))
    with pytest.raises(LMStackError, match=r"bad.jsonl:2.*rejected"):
        rm(cfg)
    assert not (tmp_path / "run" / "reward_model").exists()
    for field, value in (("margin", -1.0), ("max_prompt_len", 64), ("center_coef", float("nan"))):
        with pytest.raises(ConfigError, match=field):
            _cfg(tmp_path, **{field: value}).check()
    with pytest.raises(ConfigError, match="peft.method"):
        _cfg(tmp_path, peft={"method": "prefix"}).check()
    model = _tiny()
    with pytest.raises(LMStackError, match="2 prompts and 1 completions"):
        model.score(["a", "b"], ["c"])
    with pytest.raises(LMStackError, match="not a reward model folder"):
        RewardModel.load(tmp_path)


# -- the built-in preference data -----------------------------------------------------------


def _builtin(name):
    f = resources.files("lmstack.train.datasets") / f"{name}.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()], len(f.read_bytes())


def test_builtin_preference_files_are_held_out_small_and_length_balanced():
    from lmstack.train.align_data import read_preference, read_unpaired
    from lmstack.train.datasets.build_preferences import length_stats, unpaired

    for split, n_prompts in (("train", 400), ("val", 100)):
        pairs, size = _builtin(f"pref-{split}")
        kto, kto_size = _builtin(f"kto-{split}")
        assert size < 300_000 and kto_size < 350_000
        assert len(pairs) == 2 * n_prompts and len({json.dumps(p["prompt"]) for p in pairs}) == n_prompts
        assert all(p["chosen"] != p["rejected"] for p in pairs)
        stats = length_stats(pairs)
        assert 0.4 <= stats["shorter_wins_accuracy"] <= 0.6, stats  # length alone tells little
        assert len(stats["kinds"]) == 5
        assert kto == unpaired(pairs)  # the KTO file is derived from the pairs
        assert len(read_preference(f"builtin:pref-{split}")) == len(pairs)
        assert len(read_unpaired(f"builtin:kto-{split}", "data")) == len(kto)
    train, _ = _builtin("pref-train")
    val, _ = _builtin("pref-val")
    assert not {json.dumps(p["prompt"]) for p in train} & {json.dumps(p["prompt"]) for p in val}


# -- the reward model as a judge in `lmstack eval` ------------------------------------------


class _Echo:
    """An evaluated model whose answer is a fixed word per call position (no weights)."""

    name, identity, batch_size = "echo", "echo", 4

    def generate(self, prompt, max_new_tokens, temperature):
        return "Paris" if len(prompt) % 2 else "I am not sure."

    chat = generate


@pytest.mark.parametrize("chat", [False, True])
def test_reward_model_judge_scores_answers_and_references(tmp_path, chat):
    from lmstack.eval.items import references
    from lmstack.eval.reward_judge import RewardJudge, load_judge
    from lmstack.eval.tasks import TaskConfig, load_items, run_task

    model = _tiny()
    torch.manual_seed(0)
    torch.nn.init.normal_(model.head.weight, std=0.5)
    model.save(tmp_path / "rm")
    judge = load_judge(str(tmp_path / "rm"))
    assert isinstance(judge, RewardJudge)
    task = TaskConfig(name="t", kind="reward_model", dataset="qa", limit=4, chat=chat, prompt="Q: {question}\nA:")
    res = run_task(task, _Echo(), judge, n_resamples=0, progress=False)
    items = load_items(task)
    prompts = [f"Q: {it.question}\nA:" for it in items]
    answers = [_Echo().generate(p, 0, 0) for p in prompts]
    refs = [references(it)[0] for it in items]
    if chat:
        wrap = lambda xs, role: [[{"role": role, "content": x}] for x in xs]
        mine = judge.rm.score(wrap(prompts, "user"), wrap(answers, "assistant"))
        theirs = judge.rm.score(wrap(prompts, "user"), wrap(refs, "assistant"))
    else:
        mine, theirs = judge.rm.score(prompts, answers), judge.rm.score(prompts, refs)
    assert res.metrics["reward_score"].value == pytest.approx(sum(mine) / 4, abs=1e-6)
    assert res.metrics["reference_reward"].value == pytest.approx(sum(theirs) / 4, abs=1e-6)
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(mine, theirs)) / 4
    assert res.metrics["reward_win_rate"].value == pytest.approx(wins)
    assert len(set(mine)) > 1


def test_reward_model_kind_refuses_a_plain_judge():
    from lmstack.eval.tasks import TaskConfig, run_task

    task = TaskConfig(name="t", kind="reward_model", dataset="qa", limit=2)
    with pytest.raises(ConfigError, match="needs a reward model as its judge"):
        run_task(task, _Echo(), _Echo(), n_resamples=0, progress=False)
