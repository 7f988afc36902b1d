"""Pre-training loop: golden losses, bitwise resume, atomic checkpoints, NaN guard, retention, DDP."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lmstack.data.shards import FORMAT, VERSION, ShardWriter
from lmstack.errors import LMStackError
from lmstack.train import checkpoint as ck
from lmstack.train.common import EpochOrder, MetricsLog
from lmstack.train.config import PretrainConfig
from lmstack.train.pretrain import pretrain

ROOT = Path(__file__).resolve().parents[1]


def make_shards(folder, vocab_size=320, n_docs=60, seed=0, eos=0, shard_tokens=2000):
    """Documents of a simple learnable pattern: counting up modulo ``vocab_size``."""
    rng = np.random.default_rng(seed)
    shards = []
    for split, n in (("train", n_docs), ("val", max(4, n_docs // 10))):
        w = ShardWriter(folder, split, np.dtype("<u2"), eos, shard_tokens, on_shard=shards.append)
        for d in range(n):
            start, length = int(rng.integers(1, vocab_size)), int(rng.integers(20, 120))
            ids = (start + np.arange(length) * int(rng.integers(1, 4))) % (vocab_size - 1) + 1
            w.add(f"{split}-{d}", ids.tolist())
        w.flush()
    meta = {"format": FORMAT, "version": VERSION, "complete": True, "dtype": "<u2", "eos_token_id": eos,
            "vocab_size": vocab_size, "shards": shards}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"))


def _cfg(shards, out, **kw):
    base = dict(out_dir=str(out), data=str(shards), model="tiny-llama", batch_size=4, seq_len=32, max_steps=8,
                lr=3e-3, min_lr=3e-4, warmup_steps=2, eval_interval=4, eval_batches=2, ckpt_interval=2,
                keep_last=10, peak_flops=1e12, progress=False, sample_prompts=[])
    base.update(kw)
    return PretrainConfig(**base)


def _final_tensors(out):
    return load_file(str(out / "final" / "model.safetensors"))


def test_golden_first_losses(shards, tmp_path):
    r = pretrain(_cfg(shards, tmp_path, max_steps=5))
    # Seeded golden numbers (tiny-llama, make_shards(seed=0), seed 0): computed once and pinned.
    golden = [5.782327, 5.755291, 5.717705, 5.725896, 5.679721]
    assert r["losses"] == pytest.approx(golden, abs=2e-5)
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in recs if "loss" in x]
    assert [x["step"] for x in steps] == [1, 2, 3, 4, 5]
    assert all(x["tokens_per_s"] > 0 and 0 < x["mfu"] for x in steps)
    last = steps[-1]
    assert "val_loss" in last and last["val_ppl"] == pytest.approx(2.718281828459045 ** last["val_loss"], rel=1e-6)
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_grad_accum_matches_bigger_batch(shards, tmp_path):
    a = pretrain(_cfg(shards, tmp_path / "a", max_steps=3, batch_size=4))
    b = pretrain(_cfg(shards, tmp_path / "b", max_steps=3, batch_size=2, tokens_per_step=4 * 32))
    assert a["losses"] == pytest.approx(b["losses"], abs=1e-5)


def _cxx_compiler():
    return next((c for c in (os.environ.get("CXX"), "g++", "clang++", "c++") if c and shutil.which(c)), None)


@pytest.mark.slow
def test_compile_matches_eager(shards, tmp_path):
    if _cxx_compiler() is None:
        pytest.skip("torch.compile on CPU builds its generated kernels with a C++ compiler; found none "
                    "(set CXX or install g++/clang++)")
    eager = pretrain(_cfg(shards, tmp_path / "eager", max_steps=3))
    compiled = pretrain(_cfg(shards, tmp_path / "compiled", max_steps=3, compile=True))
    assert compiled["losses"] == pytest.approx(eager["losses"], abs=1e-5)
    a, b = _final_tensors(tmp_path / "eager"), _final_tensors(tmp_path / "compiled")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


@pytest.mark.slow
def test_compiled_run_checkpoints_the_model_keys(shards, tmp_path):
    if _cxx_compiler() is None:
        pytest.skip("torch.compile on CPU builds its generated kernels with a C++ compiler; found none "
                    "(set CXX or install g++/clang++)")
    pretrain(_cfg(shards, tmp_path, max_steps=2, compile=True))
    tensors, _, _ = ck.load_checkpoint_state(ck.latest_checkpoint(tmp_path / "checkpoints"))
    assert tensors.keys() == _final_tensors(tmp_path).keys()  # not the compiled wrapper's _orig_mod.* keys


class _Killed(BaseException):
    pass


def _kill_at(monkeypatch, kill_step):
    orig = MetricsLog.log

    def log(self, rec):
        if rec.get("step") == kill_step and "loss" in rec:
            raise _Killed()
        orig(self, rec)

    monkeypatch.setattr(MetricsLog, "log", log)


def _epoch_boundary_setup(shards):
    """(seq_len, batch_size, windows) such that an epoch is exactly 4 steps (step 4 ends epoch 0)."""
    from lmstack.data.shards import TokenShards

    n_tokens = TokenShards(shards, "train").num_tokens
    for L in range(48, 128):
        n = (n_tokens - L - 1) // L
        if n % 4 == 0:
            return L, n // 4, n
    raise AssertionError("no seq_len gives a 4-step epoch for this fixture")


@pytest.mark.slow
@pytest.mark.parametrize("where", ["mid_epoch", "epoch_boundary"])
def test_resume_is_bitwise_exact(shards, tmp_path, monkeypatch, where):
    kw = {}
    if where == "epoch_boundary":
        L, bs, n_windows = _epoch_boundary_setup(shards)
        kw = dict(seq_len=L, batch_size=bs, max_steps=7)
        kill, ckpt_step = 5, 4
    else:  # checkpoints every 3 steps: the kill at step 5 resumes from step 3, mid-epoch
        kw = dict(ckpt_interval=3, max_steps=7)
        kill, ckpt_step = 5, 3
    full = pretrain(_cfg(shards, tmp_path / "full", **kw))
    _kill_at(monkeypatch, kill)
    with pytest.raises(_Killed):
        pretrain(_cfg(shards, tmp_path / "resumed", **kw))
    monkeypatch.undo()
    latest = ck.latest_checkpoint(tmp_path / "resumed" / "checkpoints")
    state = json.loads((latest / "state.json").read_text())
    assert state["step"] == ckpt_step
    if where == "epoch_boundary":
        assert state["data"] == {"epoch": 0, "cursor": n_windows}
    else:
        assert 0 < state["data"]["cursor"] < 16 * 100
    again = pretrain(_cfg(shards, tmp_path / "resumed", **kw), resume=True)
    assert again["losses"] == full["losses"][ckpt_step:]  # bitwise: exact float equality
    a, b = _final_tensors(tmp_path / "full"), _final_tensors(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logged = [json.loads(x)["step"] for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(x)]
    assert logged == list(range(1, 8))


def test_nan_at_step_k_stops_and_never_writes_nonfinite(shards, tmp_path, monkeypatch):
    import lmstack.train.pretrain as pt

    real = pt.token_loss_sum
    calls = {"n": 0}

    def poisoned(*a, **kw):
        s, n = real(*a, **kw)
        calls["n"] += 1
        if calls["n"] >= 5:  # one micro-batch per step: step 5 onwards
            s = s * float("nan")
        return s, n

    monkeypatch.setattr(pt, "token_loss_sum", poisoned)
    with pytest.raises(LMStackError, match="non-finite loss .* at step 5"):
        pretrain(_cfg(shards, tmp_path, max_steps=8, eval_interval=100))
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["step-00000002", "step-00000004"]
    for p in (tmp_path / "checkpoints").iterdir():
        assert all(torch.isfinite(t).all() for t in load_file(str(p / "model.safetensors")).values())
    assert not (tmp_path / "final").exists()


def test_nan_skip_mode_skips_the_step(shards, tmp_path, monkeypatch):
    import lmstack.train.pretrain as pt

    real = pt.token_loss_sum
    calls = {"n": 0}

    def poisoned(*a, **kw):
        s, n = real(*a, **kw)
        calls["n"] += 1
        return (s * float("nan") if calls["n"] == 3 else s), n

    monkeypatch.setattr(pt, "token_loss_sum", poisoned)
    r = pretrain(_cfg(shards, tmp_path, max_steps=5, on_nonfinite="skip", eval_interval=100))
    assert len(r["losses"]) == 4
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("skipped" in x and x["step"] == 3 for x in recs)


def test_checkpoint_refuses_nonfinite(tmp_path):
    with pytest.raises(LMStackError, match="non-finite"):
        ck.save_checkpoint(tmp_path, 1, {"w": torch.tensor([1.0, float("inf")])}, {}, {})
    assert list(tmp_path.iterdir()) == []


def test_failed_save_leaves_previous_latest(tmp_path, monkeypatch):
    t = {"w": torch.arange(4.0)}
    ck.save_checkpoint(tmp_path, 1, t, {"optimizer": {}}, {"metrics": {}})
    calls = {"n": 0}
    real = os.fsync

    def boom(fd):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        real(fd)

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(tmp_path, 2, t, {"optimizer": {}}, {"metrics": {}})
    assert ck.latest_checkpoint(tmp_path).name == "step-00000001"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]


def test_damaged_and_partial_checkpoints_are_ignored(tmp_path):
    t = {"w": torch.arange(4.0)}
    ck.save_checkpoint(tmp_path, 1, t, {"optimizer": {}}, {"metrics": {}})
    ck.save_checkpoint(tmp_path, 2, t, {"optimizer": {}}, {"metrics": {}})
    (tmp_path / ".step-00000003.tmp-x").mkdir()  # what a kill during a save leaves
    (tmp_path / ".step-00000003.tmp-x" / "model.safetensors").write_bytes(b"partial")
    with open(tmp_path / "step-00000002" / "model.safetensors", "r+b") as f:  # bit rot in the newest
        f.seek(-1, 2)
        f.write(b"\x01")
    assert ck.latest_checkpoint(tmp_path).name == "step-00000001"
    assert not (tmp_path / ".step-00000003.tmp-x").exists()


def test_sigkill_during_saves_never_breaks_latest(tmp_path):
    script = textwrap.dedent(f"""
        import torch
        from lmstack.train.checkpoint import save_checkpoint
        t = {{"w": torch.randn(1 << 20)}}
        step = 0
        while True:
            step += 1
            save_checkpoint({str(tmp_path)!r}, step, t, {{"optimizer": {{}}}}, {{"metrics": {{}}}}, keep_last=2)
            print(step, flush=True)
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    for _ in range(3):  # kill after a few completed saves, i.e. during a later one
        p.stdout.readline()
    p.kill()
    p.wait()
    latest = ck.latest_checkpoint(tmp_path)
    assert latest is not None and ck.is_valid(latest)
    tensors, _, state = ck.load_checkpoint_state(latest)
    assert tensors["w"].numel() == 1 << 20 and state["step"] >= 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_retention_keeps_last_n_and_best(tmp_path):
    for step, v in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 2.5), (5, 2.6)]:
        ck.save_checkpoint(tmp_path, step, {"w": torch.zeros(2)}, {}, {"metrics": {"val_loss": v}}, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002", "step-00000004", "step-00000005"]


def test_epoch_order_is_a_permutation_per_epoch_and_resumable():
    o = EpochOrder(10, seed=3)
    first = o.take(7) + o.take(7)
    assert sorted(i for e, i in first[:10]) == list(range(10)) and {e for e, _ in first[10:]} == {1}
    o2 = EpochOrder(10, seed=3, **EpochOrder(10, 3, epoch=0, cursor=0).state())
    o2.take(7)
    o3 = EpochOrder(10, 3, **o2.state())
    assert o3.take(7) == first[7:]


def test_schedules():
    from lmstack.train.common import lr_at

    c = PretrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, c) == pytest.approx(0.1) and lr_at(9, c) == pytest.approx(1.0)
    assert lr_at(60, c) == pytest.approx(0.55) and lr_at(110, c) == pytest.approx(0.1)
    c.schedule = "wsd"
    assert lr_at(50, c) == 1.0 and lr_at(88, c) == 1.0 and lr_at(110, c) == pytest.approx(0.1)


def test_config_errors_are_for_people(shards, tmp_path):
    from lmstack.errors import ConfigError

    with pytest.raises(ConfigError, match="seq_len"):
        pretrain(_cfg(shards, tmp_path, seq_len=4096))
    with pytest.raises(ConfigError, match="tokens_per_step"):
        pretrain(_cfg(shards, tmp_path, tokens_per_step=1000))
    with pytest.raises(LMStackError, match="no complete checkpoint"):
        pretrain(_cfg(shards, tmp_path / "empty"), resume=True)
    ck.save_checkpoint(tmp_path / "used" / "checkpoints", 1, {"w": torch.zeros(1)}, {}, {})
    with pytest.raises(LMStackError, match="already holds checkpoints; pass --resume"):
        pretrain(_cfg(shards, tmp_path / "used"))


def test_shipped_recipes_load():
    from lmstack.config import load_config
    from lmstack.train.config import PretrainConfig, SFTConfig

    found = sorted((ROOT / "recipes" / "train").glob("*.yaml"))
    kinds = {"pretrain": PretrainConfig, "sft": SFTConfig}
    for p in found:
        load_config(kinds[p.name.split("-")[0]], p)
    assert len(found) == 5


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _torchrun(args, cwd, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _free_port(),
           "-m", "lmstack.cli.main", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_distributed_two_gloo_processes_match_single(shards, tmp_path, strategy):
    single = pretrain(_cfg(shards, tmp_path / "single", max_steps=4, batch_size=4))
    r = _torchrun(["pretrain", "--data", str(shards), "--model", "tiny-llama", "--batch-size", "2",
                   "--seq-len", "32", "--max-steps", "4", "--lr", "3e-3", "--min-lr", "3e-4", "--warmup-steps", "2",
                   "--eval-interval", "4", "--eval-batches", "2", "--ckpt-interval", "2", "--peak-flops", "1e12",
                   "--no-progress", "--distributed", strategy, "--out-dir", str(tmp_path / "ddp")], cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in recs if "loss" in x]
    assert losses == pytest.approx(single["losses"], abs=1e-4)
    a, b = _final_tensors(tmp_path / "single"), _final_tensors(tmp_path / "ddp")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    assert ck.latest_checkpoint(tmp_path / "ddp" / "checkpoints").name == "step-00000004"


def test_cli_pretrain_and_errors(shards, tmp_path, capsys):
    from lmstack.cli.main import main

    rc = main(["pretrain", str(ROOT / "recipes" / "train" / "pretrain-tiny.yaml"), "--data", str(shards),
               "--out-dir", str(tmp_path / "run"), "--max-steps", "2", "--seq-len", "32", "--batch-size", "2",
               "--peak-flops", "1e12", "--no-progress", "--eval-interval", "2", "--json"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 2
    assert main(["pretrain", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: fast\n")
    assert main(["sft", str(bad)]) == 2
    assert "SFTConfig.lr: got 'fast', expected a number" in capsys.readouterr().err


def test_a_missing_data_folder_names_it_and_the_command_that_makes_it(tmp_path, monkeypatch):
    from lmstack.errors import ConfigError

    monkeypatch.chdir(tmp_path)  # a checkout where the data demo has not run yet
    (tmp_path / "recipes" / "data").mkdir(parents=True)
    shutil.copy(ROOT / "recipes" / "data" / "offline-corpora.yaml", tmp_path / "recipes" / "data")
    cfg = PretrainConfig(**{**vars(_cfg(tmp_path, tmp_path / "out")), "data": "runs/data/offline-corpora"})
    with pytest.raises(ConfigError) as info:
        pretrain(cfg)
    assert str(info.value).startswith("PretrainConfig.data: runs/data/offline-corpora does not exist;")
    assert "Make them with `lmstack data prepare recipes/data/offline-corpora.yaml`" in str(info.value)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(ConfigError, match="elsewhere holds no meta.json.*`lmstack data prepare RECIPE.yaml`"):
        pretrain(_cfg(tmp_path / "elsewhere", tmp_path / "out"))


def test_the_shipped_tiny_recipe_says_where_its_data_comes_from():
    head = (ROOT / "recipes" / "train" / "pretrain-tiny.yaml").read_text().split("\ndata:")[0]
    assert "lmstack data prepare recipes/data/offline-corpora.yaml" in head


def test_every_step_skipped_writes_no_final_model(shards, tmp_path, monkeypatch):
    import lmstack.train.pretrain as pt

    real = pt.token_loss_sum

    def poisoned(*a, **kw):
        s, n = real(*a, **kw)
        return s * float("nan"), n

    monkeypatch.setattr(pt, "token_loss_sum", poisoned)
    with pytest.raises(LMStackError, match="all 4 steps of this run were skipped"):
        pretrain(_cfg(shards, tmp_path, max_steps=4, on_nonfinite="skip", eval_interval=100))
    assert not (tmp_path / "final").exists()
