"""The Run a training loop is written against: a stage-shaped toy loop with its own loss, its
own metrics and a higher-is-better best metric logs, evaluates, checkpoints and resumes."""

import json
from typing import Callable

import pytest
import torch
import torch.nn as nn

from lmstack.errors import LMStackError
from lmstack.train import checkpoint as ck
from lmstack.train.common import MetricsLog
from lmstack.train.config import LoopConfig
from lmstack.train.run import Run

X = torch.randn(48, 4, generator=torch.Generator().manual_seed(0))
Y = (X @ torch.tensor([1.0, -2.0, 0.5, 3.0]) > 0).float()


def _toy(cfg: LoopConfig, resume: bool = False) -> dict:
    """A logistic regression trained the way a stage trains (only its batching and its loss)."""
    run = Run.start(cfg, "toy", resume, trainable_only=True)
    model = nn.Linear(4, 1)
    model.bias.requires_grad_(False)  # a frozen part: checkpoints hold only the weight

    def evaluate(m) -> dict:
        logits = m(X).squeeze(-1)
        return {"val_loss": float(nn.functional.binary_cross_entropy_with_logits(logits, Y)),
                "val_acc": float(((logits > 0).float() == Y).float().mean())}

    run.resume(model)
    run.prepare(model, len(X), evaluate=evaluate, best_metric="val_acc", best_mode="max", meta={"toy": True})
    for _ in run.steps():
        loss_sum = 0.0
        for k in range(2):  # two micro-batches of 4
            idx = [i for _, i in run.order.take(4)]
            with run.micro_batch(last=k == 1):
                s = nn.functional.binary_cross_entropy_with_logits(run.model(X[idx]).squeeze(-1), Y[idx],
                                                                   reduction="sum")
                (s / 8).backward()
            loss_sum += s.item()
        run.end_step(loss_sum / 8, metrics={"positives": float(Y.sum())}, tokens=8)
    return run.finish()


def _cfg(tmp_path, **kw):
    base = dict(out_dir=str(tmp_path), max_steps=9, lr=0.1, min_lr=0.01, warmup_steps=1, weight_decay=0.0,
                eval_interval=3, ckpt_interval=3, keep_last=1, progress=False)
    base.update(kw)
    return LoopConfig(**base)


def _records(tmp_path):
    return [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_a_loop_logs_evaluates_and_checkpoints_through_the_run(tmp_path):
    r = _toy(_cfg(tmp_path))
    assert r["steps"] == 9 and len(r["losses"]) == 9 and r["losses"][-1] < r["losses"][0]
    recs = _records(tmp_path)
    assert [x["step"] for x in recs] == list(range(1, 10))
    assert all(x["positives"] == float(Y.sum()) and x["tokens_per_s"] > 0 for x in recs)
    assert [x["step"] for x in recs if "val_acc" in x] == [3, 6, 9]
    best = max(x["val_acc"] for x in recs if "val_acc" in x)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    states = [json.loads((tmp_path / "checkpoints" / k / "state.json").read_text()) for k in kept]
    assert states[-1]["metrics"]["best_val_acc"] == best and states[-1]["toy"] is True
    assert kept[-1] == "step-00000009"  # the last one, plus the best by the highest accuracy
    assert max(s["metrics"]["val_acc"] for s in states) == best
    tensors, _, _ = ck.load_checkpoint_state(tmp_path / "checkpoints" / kept[-1])
    assert list(tensors) == ["weight"]


def test_log_interval_writes_every_nth_step_plus_evaluations_and_the_last(tmp_path):
    r = _toy(_cfg(tmp_path, max_steps=10, log_interval=4, eval_interval=3, ckpt_interval=100))
    assert len(r["losses"]) == 10  # every step still counts
    assert [x["step"] for x in _records(tmp_path)] == [3, 4, 6, 8, 9, 10]


def test_resume_reproduces_the_uninterrupted_run(tmp_path, monkeypatch):
    full = _toy(_cfg(tmp_path / "full"))
    orig = MetricsLog.log

    class Killed(BaseException):
        pass

    def log(self, rec):
        if rec.get("step") == 5:
            raise Killed()
        orig(self, rec)

    monkeypatch.setattr(MetricsLog, "log", log)
    with pytest.raises(Killed):
        _toy(_cfg(tmp_path / "resumed"))
    monkeypatch.undo()
    again = _toy(_cfg(tmp_path / "resumed"), resume=True)  # from the step-3 checkpoint
    assert again["losses"] == full["losses"][3:]
    assert [x["step"] for x in _records(tmp_path / "resumed")] == list(range(1, 10))
    a = json.loads((tmp_path / "full" / "checkpoints" / "step-00000009" / "state.json").read_text())
    b = json.loads((tmp_path / "resumed" / "checkpoints" / "step-00000009" / "state.json").read_text())
    assert a["metrics"] == b["metrics"] and a["data"] == b["data"]


def test_a_loop_that_forgets_end_step_or_resume_is_told(tmp_path):
    run = Run.start(_cfg(tmp_path / "a"), "toy")
    model = nn.Linear(4, 1)
    run.resume(model)
    run.prepare(model, len(X))
    with pytest.raises(LMStackError, match="end_step"):
        for _ in run.steps():
            pass
    _toy(_cfg(tmp_path / "b", max_steps=3))
    run = Run.start(_cfg(tmp_path / "b", max_steps=3), "toy", resume=True)
    with pytest.raises(LMStackError, match="resume"):
        run.prepare(nn.Linear(4, 1), len(X))


def test_intervals_must_be_positive(tmp_path):
    from lmstack.errors import ConfigError

    with pytest.raises(ConfigError, match="LoopConfig.log_interval: got 0, expected > 0"):
        Run.start(_cfg(tmp_path, log_interval=0), "toy")


def test_retention_keeps_the_best_by_a_higher_is_better_metric(tmp_path):
    for step, acc in [(1, 0.5), (2, 0.9), (3, 0.6), (4, 0.7)]:
        ck.save_checkpoint(tmp_path, step, {"w": torch.zeros(2)}, {}, {"metrics": {"val_acc": acc}},
                           keep_last=1, best="val_acc", mode="max")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002", "step-00000004"]


@pytest.mark.parametrize("field,value,expected", [
    ("lr", 1e39, "got 1e+39, expected 0 < lr <= 1"),
    ("lr", float("nan"), "got nan, expected 0 < lr <= 1"),
    ("lr", 0.0, "got 0.0, expected 0 < lr <= 1"),
    ("min_lr", -1e-5, "got -1e-05, expected 0 <= min_lr <= lr (0.1)"),
    ("weight_decay", 1e39, "got 1e+39, expected in [0, 1]"),
    ("beta1", 1.0, "got 1.0, expected in [0, 1)"),
    ("beta2", -0.5, "got -0.5, expected in [0, 1)"),
    ("grad_clip", -1.0, "got -1.0, expected >= 0"),
    ("grad_clip", float("inf"), "got inf, expected >= 0"),
    ("warmup_steps", -1, "got -1, expected >= 0"),
    ("decay_fraction", 1.5, "got 1.5, expected in [0, 1]"),
    ("eval_batches", 0, "got 0, expected > 0"),
    ("max_skips_in_a_row", 0, "got 0, expected > 0"),
])
def test_options_out_of_range_are_named_before_anything_runs(tmp_path, field, value, expected):
    from lmstack.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        Run.start(_cfg(tmp_path, **{field: value}), "toy")
    assert str(info.value).startswith(f"LoopConfig.{field}: {expected}")


def _drive(cfg: LoopConfig, bad: Callable[[int], str] = lambda step: "") -> dict:
    """The toy's loop, with step ``s`` (1-based) made non-finite where ``bad(s)`` names what:
    "loss", "grad" or "both"."""
    run = Run.start(cfg, "toy")
    model = nn.Linear(4, 1)
    run.resume(model)
    run.prepare(model, len(X))
    for step in run.steps():
        what = bad(step + 1)
        idx = [i for _, i in run.order.take(8)]
        with run.micro_batch():
            s = nn.functional.binary_cross_entropy_with_logits(run.model(X[idx]).squeeze(-1), Y[idx])
            inf = float("inf") if what in ("grad", "both") else 0.0  # every weight's gradient becomes +inf
            (s + run.model.weight.sum() * inf).backward()
        run.end_step(float("nan") if what in ("loss", "both") else s.item())
    return run.finish()


@pytest.mark.parametrize("what,message", [
    ("loss", "non-finite loss (nan) at step 2;"),
    ("grad", "non-finite gradient norm (inf) at step 2;"),
    ("both", "non-finite loss (nan) and gradient norm (inf) at step 2;"),
])
def test_the_nonfinite_message_names_what_was_not_finite(tmp_path, what, message):
    with pytest.raises(LMStackError) as info:
        _drive(_cfg(tmp_path, ckpt_interval=1), lambda s: what if s == 2 else "")
    assert str(info.value).startswith(message)
    assert "Last good checkpoint: " + str(tmp_path / "checkpoints" / "step-00000001") in str(info.value)


def test_an_optimizer_overflow_stops_with_the_last_good_checkpoint(tmp_path, monkeypatch):
    real = torch.optim.AdamW.step
    calls = {"n": 0}

    def step(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 4:  # what AdamW raises when lr / bias correction leaves the float range
            raise RuntimeError("value cannot be converted to type float without overflow")
        return real(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    with pytest.raises(LMStackError, match="optimizer step overflowed at step 4") as info:
        _drive(_cfg(tmp_path, on_nonfinite="skip"))
    assert "Last good checkpoint: " + str(tmp_path / "checkpoints" / "step-00000003") in str(info.value)


def test_skip_mode_stops_after_max_skips_in_a_row(tmp_path, capsys):
    cfg = _cfg(tmp_path / "a", max_steps=20, on_nonfinite="skip", max_skips_in_a_row=3)
    with pytest.raises(LMStackError) as info:
        _drive(cfg, lambda s: "loss" if s >= 5 else "")
    msg = str(info.value)
    assert msg.startswith("3 steps in a row were skipped, the last for a non-finite loss (nan) at step 7")
    assert "Last good checkpoint: " + str(tmp_path / "a" / "checkpoints" / "step-00000003") in msg
    assert "toy: non-finite loss (nan) at step 5: update skipped (on_nonfinite: skip)" in capsys.readouterr().err
    skipped = [x["step"] for x in _records(tmp_path / "a") if "skipped" in x]
    assert skipped == [5, 6, 7]
    # skips that are not in a row never add up to the limit
    r = _drive(_cfg(tmp_path / "b", max_steps=9, on_nonfinite="skip", max_skips_in_a_row=2),
               lambda s: "loss" if s % 2 == 0 else "")
    assert r["steps"] == 9 and len(r["losses"]) == 5


def test_a_run_whose_every_step_was_skipped_is_an_error(tmp_path):
    with pytest.raises(LMStackError, match="all 4 steps of this run were skipped") as info:
        _drive(_cfg(tmp_path, max_steps=4, on_nonfinite="skip"), lambda s: "both")
    assert "Last good checkpoint: none yet" in str(info.value)


def test_threads_sets_the_cpu_thread_count_before_the_model_is_built(tmp_path):
    before = torch.get_num_threads()
    try:
        Run.start(LoopConfig(out_dir=str(tmp_path / "a"), threads=1, progress=False), "t")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(Exception, match="threads"):
        Run.start(LoopConfig(out_dir=str(tmp_path / "b"), threads=-1, progress=False), "t")
