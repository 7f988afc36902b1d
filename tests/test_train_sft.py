"""SFT: assistant-only masks, packing, golden losses, resume, the shipped instruction set."""

import io
import json
import os
import shutil
import sys

import pytest
import torch

from lmstack.errors import LMStackError
from lmstack.tokenizer.byte_level import byte_level_tokenizer
from lmstack.train.common import IGNORE, token_loss_sum
from lmstack.train.config import SFTConfig
from lmstack.train.chat_data import collate, encode_example, read_jsonl
from lmstack.train.sft import sft

CHAT = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]}


def _masked_text(tok, ex):
    ids, mask = encode_example(tok, ex, 10_000)
    return tok.decode([i for i, m in zip(ids, mask) if m])


def test_mask_covers_assistant_tokens_only():
    tok = byte_level_tokenizer()
    ids, mask = encode_example(tok, CHAT, 10_000)
    assert tok.decode(ids) == tok.apply_chat_template(CHAT["messages"], add_generation_prompt=False)
    assert _masked_text(tok, CHAT) == "Hello!<|im_end|>4<|im_end|>"
    # every masked token lies inside an assistant turn, every unmasked one outside its content
    im_end = tok.token_to_id("<|im_end|>")
    assert sum(m and i == im_end for i, m in zip(ids, mask)) == 2


def test_prompt_completion_mask():
    tok = byte_level_tokenizer()
    ids, mask = encode_example(tok, {"prompt": "Q: 1+1=", "completion": " 2"}, 100)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == " 2<|endoftext|>"
    assert mask[:len("Q: 1+1=")] == [False] * len("Q: 1+1=")


def test_bad_examples_are_named():
    tok = byte_level_tokenizer()
    with pytest.raises(LMStackError, match="no assistant message"):
        encode_example(tok, {"messages": [{"role": "user", "content": "x"}]}, 10)
    with pytest.raises(LMStackError, match="neither 'messages'"):
        encode_example(tok, {"text": "x"}, 10)


@pytest.mark.slow
def test_smollm2_template_mask(smollm2):
    tok = smollm2.tokenizer
    assert _masked_text(tok, CHAT) == "Hello!<|im_end|>4<|im_end|>"


def test_padding_targets_and_packing_loss_equal_padding():
    torch.manual_seed(0)
    from lmstack.model import Transformer, preset

    model = Transformer(preset("tiny-llama")).eval()
    tok = byte_level_tokenizer()
    exs = [encode_example(tok, {"messages": [{"role": "user", "content": "q" * n},
                                             {"role": "assistant", "content": "a" * (n + 1)}]}, 128)
           for n in (3, 9, 5, 2)]
    pad = collate(exs, 0)
    assert pad["inputs"].shape == (4, max(len(i) for i, _ in exs) - 1)
    assert int((pad["targets"] != IGNORE).sum()) == sum(sum(m[1:]) for _, m in exs)
    packed = collate(exs, 0, packing=True, max_len=127)
    assert packed["inputs"].shape[0] == 1 and int(packed["doc_ids"].max()) == 3
    assert int((packed["targets"] != IGNORE).sum()) == int((pad["targets"] != IGNORE).sum())
    with torch.no_grad():
        s1, n1 = token_loss_sum(model, pad["inputs"], pad["targets"])
        s2, n2 = token_loss_sum(model, packed["inputs"], packed["targets"], doc_ids=packed["doc_ids"])
        s3, _ = token_loss_sum(model, packed["inputs"], packed["targets"])  # without the mask: leaks across examples
    assert n1 == n2
    torch.testing.assert_close(s2, s1, rtol=1e-5, atol=1e-4)
    assert abs(float(s3 - s1)) > 1e-3


def _write(tmp_path, n=24):
    rows = []
    for i in range(n):
        a, b = i % 7, (i * 3) % 5
        rows.append({"messages": [{"role": "user", "content": f"{a}+{b}?"},
                                  {"role": "assistant", "content": str(a + b)}]})
    p = tmp_path / "train.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def _cfg(tmp_path, data, **kw):
    base = dict(model="tiny-llama", data=str(data), val_data=str(data), out_dir=str(tmp_path / "run"),
                batch_size=4, max_steps=5, lr=1e-2, min_lr=1e-3, warmup_steps=1, eval_interval=5,
                ckpt_interval=2, keep_last=10, progress=False)
    peft = kw.pop("peft", {"method": "lora", "r": 4, "alpha": 8})
    base.update(kw)
    from lmstack.config import config_from_dict

    return config_from_dict(SFTConfig, {**base, "peft": peft})


def _weights(folder):
    """The tensors of the one safetensors file in ``folder``: an adapter (in either of its
    formats, PEFT's or lmstack's) or a model."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    assert len(files) == 1, files
    return load_file(str(files[0]))


@pytest.mark.parametrize("method,golden", [
    # Seeded golden numbers (tiny-llama preset, seed 0, the 24 sums above): computed once and pinned.
    ("lora", [5.87534, 5.759593, 5.410911, 5.266366, 5.396395]),
    ("full", [5.87534, 5.251425, 4.44276, 3.884768, 4.118227]),
])
def test_sft_golden_first_losses(tmp_path, method, golden):
    r = sft(_cfg(tmp_path, _write(tmp_path), peft={"method": method, "r": 4, "alpha": 8}))
    assert r["losses"] == pytest.approx(golden, abs=2e-5)
    out = tmp_path / "run" / ("adapter" if method == "lora" else "final")
    assert out.is_dir()


def test_export_merged_writes_a_final_model_equal_to_base_plus_adapter(tmp_path):
    from lmstack.infer.llm import LLM

    sft(_cfg(tmp_path, _write(tmp_path), export_merged=True))
    run = tmp_path / "run"
    assert (run / "adapter").is_dir() and (run / "final").is_dir()
    merged = LLM.load(run / "final")
    tuned = LLM.load("tiny-llama", seed=0, adapter=run / "adapter")  # the base the run started from
    base = LLM.load("tiny-llama", seed=0)
    # the merged folder is a plain model: the base's keys, no LoRA tensors
    assert _weights(run / "final").keys() == base.model.state_dict().keys()
    ids = [tuned.tokenizer.encode("3+4?"), tuned.tokenizer.encode("6+1?")]
    want, got = tuned.logits(ids), merged.logits(ids)
    assert (want - base.logits(ids)).abs().max() > 1e-2  # the adapter learned something to merge
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_tokens_per_step_accumulates_to_the_same_update_as_one_batch(tmp_path):
    from lmstack.train.chat_data import encode_dataset

    data = _write(tmp_path)
    counts = [sum(m[1:]) for _, m in encode_dataset(byte_level_tokenizer(), read_jsonl(str(data)), 512)]
    assert set(counts) <= {2, 3}  # so 2 examples hold at most 6 target tokens and 4 hold at least 8
    one = sft(_cfg(tmp_path / "one", data, batch_size=4, max_steps=4))
    two = sft(_cfg(tmp_path / "two", data, batch_size=2, max_steps=4, tokens_per_step=7))
    recs = [json.loads(x) for x in (tmp_path / "two" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["micro_batches"] for r in recs if "loss" in r] == [2, 2, 2, 2]
    assert two["losses"] == pytest.approx(one["losses"], abs=1e-5)
    a, b = _weights(tmp_path / "one" / "run" / "adapter"), _weights(tmp_path / "two" / "run" / "adapter")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def test_step_items_take_micro_batches_until_the_token_target():
    from lmstack.train.common import EpochOrder
    from lmstack.train.sft import _step_items, _steps_for_epochs

    counts = [5, 1, 1, 1, 4, 2, 9, 1]
    order = EpochOrder(len(counts), 0, shuffle=False)
    assert _step_items(order, counts, 2, 1, 6) == [[0, 1]]  # 6 tokens: one micro-batch is enough
    assert _step_items(order, counts, 2, 1, 6) == [[2, 3], [4, 5]]  # 2, then 8
    assert _step_items(order, counts, 2, 1, 6) == [[6, 7]]
    assert _step_items(order, counts, 2, 3, 0) == [[0, 1], [2, 3], [4, 5]]  # next epoch, fixed accumulation
    assert _steps_for_epochs(1.0, counts, 0, 2, 2, 0) == 2
    assert _steps_for_epochs(1.0, [1] * 8, 0, 2, 1, 4) == 2


def test_grad_accum_and_tokens_per_step_together_is_an_error(tmp_path):
    from lmstack.errors import ConfigError

    with pytest.raises(ConfigError, match="only one of them"):
        sft(_cfg(tmp_path, _write(tmp_path), grad_accum=2, tokens_per_step=100))


@pytest.mark.slow
def test_compile_matches_eager(tmp_path):
    if not any(shutil.which(c) for c in (os.environ.get("CXX") or "g++", "clang++", "c++")):
        pytest.skip("torch.compile on CPU builds its generated kernels with a C++ compiler; found none "
                    "(set CXX or install g++/clang++)")
    from torch._dynamo.utils import counters

    data = _write(tmp_path)
    eager = sft(_cfg(tmp_path / "eager", data, max_steps=3))
    counters.clear()
    compiled = sft(_cfg(tmp_path / "compiled", data, max_steps=3, compile=True))
    assert counters["stats"]["unique_graphs"] > 0  # the steps really ran through compiled graphs
    assert compiled["losses"] == pytest.approx(eager["losses"], abs=1e-5)


@pytest.mark.slow
def test_sft_resume_is_bitwise_exact(tmp_path, monkeypatch):
    from lmstack.train.common import MetricsLog

    data = _write(tmp_path)
    full = sft(_cfg(tmp_path / "a", data, max_steps=9))  # 24 examples / 4 = 6 steps per epoch
    orig = MetricsLog.log

    class Killed(BaseException):
        pass

    def log(self, rec):
        if rec.get("step") == 7 and "loss" in rec:
            raise Killed()
        orig(self, rec)

    monkeypatch.setattr(MetricsLog, "log", log)
    with pytest.raises(Killed):
        sft(_cfg(tmp_path / "b", data, max_steps=9))
    monkeypatch.undo()
    again = sft(_cfg(tmp_path / "b", data, max_steps=9), resume=True)  # from step 6: the epoch boundary
    assert again["losses"] == full["losses"][6:]
    a, b = _weights(tmp_path / "a" / "run" / "adapter"), _weights(tmp_path / "b" / "run" / "adapter")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_builtin_instruction_set():
    train, val = read_jsonl("builtin:instruct-train"), read_jsonl("builtin:instruct-val")
    assert (len(train), len(val)) == (400, 60)
    q = lambda rows: {r["messages"][0]["content"] for r in rows}  # noqa: E731
    assert not q(train) & q(val)
    assert {r["task"] for r in val} == {"date", "sort", "email", "upper", "largest"}
    from lmstack.train.datasets.build_instruct import build

    assert build(12, seed=1) == val  # the shipped file is what the builder writes
    with pytest.raises(LMStackError, match="builtin datasets are"):
        read_jsonl("builtin:nope")


def test_teacher_forced_exact_match_agrees_with_greedy_decoding():
    from lmstack.infer.llm import LLM
    from lmstack.train.chat_data import measure

    llm = LLM.load("tiny-llama", seed=0)
    rows = [{"messages": [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "Z"}]}]
    before = measure(llm.model, llm.tokenizer, rows, 128, 8)
    assert before["exact_match"] == 0.0 and before["examples"][0]["output"] != "Z"
    b = collate([encode_example(llm.tokenizer, rows[0], 128)], 0)
    model = llm.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):  # memorise the one answer
        s, n = token_loss_sum(model, b["inputs"], b["targets"])
        opt.zero_grad()
        (s / n).backward()
        opt.step()
    after = measure(model, llm.tokenizer, rows, 128, 8)
    assert after["exact_match"] == 1.0 and after["examples"][0]["output"] == "Z"
    assert after["loss"] < 0.05 < before["loss"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy,method", [("ddp", "lora"), ("fsdp", "lora"), ("fsdp", "full")])
def test_sft_two_gloo_processes_match_single(tmp_path, strategy, method):
    """The SFT entry point under torchrun (FSDP: full sharding per block and at the root)
    gives the single-process losses and writes the same adapter / model."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    data = _write(tmp_path)
    peft = {"method": method, "r": 4, "alpha": 8}
    single = sft(_cfg(tmp_path / "single", data, max_steps=4, peft=peft))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: tiny-llama\ndata: {data}\nval_data: {data}\nout_dir: {tmp_path / 'dist'}\n"
                   "batch_size: 2\nmax_steps: 4\nlr: 1.0e-2\nmin_lr: 1.0e-3\nwarmup_steps: 1\neval_interval: 5\n"
                   f"ckpt_interval: 2\nprogress: false\ndistributed: {strategy}\n"
                   f"peft: {{method: {method}, r: 4, alpha: 8}}\n")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
                        "-m", "lmstack.cli.main", "sft", str(cfg)], cwd=Path(__file__).resolve().parents[1],
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(x) for x in (tmp_path / "dist" / "metrics.jsonl").read_text().splitlines()]
    assert [x["loss"] for x in recs if "loss" in x] == pytest.approx(single["losses"], abs=1e-4)
    out = "adapter" if method == "lora" else "final"
    a, b = _weights(tmp_path / "single" / "run" / out), _weights(tmp_path / "dist" / out)
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_qlora_sft_quantises_the_base_while_it_loads(tmp_path, monkeypatch):
    """`lmstack sft` with a QLoRA base from a folder: every targeted weight is quantised as the
    checkpoint is read, and the run equals one whose base was quantised after a full load."""
    import lmstack.train.sft as sft_module
    from lmstack import LLM
    from lmstack.model import Transformer, preset
    from lmstack.peft import base_loader

    torch.manual_seed(0)
    folder = tmp_path / "base"
    LLM(Transformer(preset("tiny-llama")), byte_level_tokenizer()).save(folder)
    data = _write(tmp_path)
    peft = {"method": "qlora", "r": 4, "alpha": 8, "group_size": 32}
    taken = []

    def spying_loader(cfg):
        convert = base_loader(cfg)

        def spy(model, key, t):
            done = convert(model, key, t)
            taken.extend([key] if done else [])
            return done

        return spy

    monkeypatch.setattr(sft_module, "base_loader", spying_loader)
    streamed = sft(_cfg(tmp_path / "a", data, model=str(folder), max_steps=3, peft=peft))
    assert len(taken) == 1 + 7 * 2 and "tok_emb.weight" in taken  # the embedding and every linear
    monkeypatch.setattr(sft_module, "base_loader", lambda cfg: None)
    after = sft(_cfg(tmp_path / "b", data, model=str(folder), max_steps=3, peft=peft))
    assert streamed["losses"] == after["losses"] and len(streamed["losses"]) == 3
    assert (tmp_path / "a" / "run" / "adapter").is_dir()


def test_sft_checks_its_data_before_it_loads_the_model(tmp_path, monkeypatch):
    import lmstack.train.sft as sft_mod
    from lmstack.errors import ConfigError

    def no_loading(cfg):
        raise AssertionError("the model loaded before the data was checked")

    monkeypatch.setattr(sft_mod, "_load_base", no_loading)
    good = _write(tmp_path)
    with pytest.raises(ConfigError, match=r"^data: .*missing.jsonl not found \(expected a JSONL file"):
        sft(_cfg(tmp_path, tmp_path / "missing.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(ConfigError, match=r"^data: .*empty.jsonl is empty \(expected a JSONL file"):
        sft(_cfg(tmp_path, empty))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text() + '{"messages": [{"role": "user", "content": "unterminated}]}\n')
    with pytest.raises(LMStackError) as info:
        sft(_cfg(tmp_path, bad))
    assert str(info.value).endswith("bad.jsonl:25: not valid JSON (Unterminated string starting at: column 43)")
    bad.write_text('["a list"]\n')
    with pytest.raises(LMStackError, match="bad.jsonl:1: got a JSON list, expected an object"):
        sft(_cfg(tmp_path, bad))
    with pytest.raises(ConfigError, match="^val_data: .*missing.jsonl not found"):
        sft(_cfg(tmp_path, good, val_data=str(tmp_path / "missing.jsonl")))
    with pytest.raises(ConfigError, match=r"^SFTConfig.max_len: got 0, expected > 0"):
        sft(_cfg(tmp_path, good, max_len=0))


def test_an_extreme_learning_rate_is_a_one_line_error(tmp_path, capsys):
    from lmstack.cli.main import main

    assert main(["sft", "--model", "tiny-llama", "--lr", "1e39", "--out-dir", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == "lmstack: error: SFTConfig.lr: got 1e+39, expected 0 < lr <= 1"
    assert "Traceback" not in err


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal, so tqdm draws its bars."""

    def isatty(self):
        return True


def test_measure_shows_a_bar_over_the_examples_on_a_terminal(monkeypatch):
    from lmstack.infer.llm import LLM
    from lmstack.train.chat_data import measure

    llm = LLM.load("tiny-llama", seed=0)
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "Z"}]} for q in "ab"]
    for progress, shown in ((True, True), (False, False)):
        err = _Terminal()
        monkeypatch.setattr(sys, "stderr", err)
        measure(llm.model, llm.tokenizer, rows, 128, 4, progress=progress, desc="measure before")
        assert ("measure before" in err.getvalue() and "4/4" in err.getvalue()) == shown  # 2 scored + 2 decoded


def _tiny_llama_gguf(path):
    """A one-layer llama GGUF with a byte-level tokenizer: eleven tensors."""
    import gguf
    import numpy as np

    chars = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    tokens = ["<|endoftext|>", "<|im_end|>"] + [chr(b) if b in chars else chr(next(extra)) for b in range(256)]
    w = gguf.GGUFWriter(str(path), "llama")
    for add, v in ((w.add_context_length, 64), (w.add_embedding_length, 8), (w.add_block_count, 1),
                   (w.add_feed_forward_length, 16), (w.add_head_count, 2), (w.add_head_count_kv, 2)):
        add(v)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3] + [1] * 256)
    w.add_token_merges([])
    w.add_eos_token_id(0)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (len(tokens), 8), "blk.0.attn_norm.weight": (8,), "blk.0.ffn_norm.weight": (8,),
              "output_norm.weight": (8,), "blk.0.ffn_gate.weight": (16, 8), "blk.0.ffn_up.weight": (16, 8),
              "blk.0.ffn_down.weight": (8, 16)}
    shapes.update({f"blk.0.attn_{p}.weight": (8, 8) for p in ("q", "k", "v", "output")})
    for name, shape in shapes.items():
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_the_first_gguf_load_says_it_converts_and_shows_a_bar(tmp_path, monkeypatch):
    """SFT's default base is a GGUF: its first load converts for about half a minute."""
    from lmstack.model.gguf_loader import load_gguf

    path = _tiny_llama_gguf(tmp_path / "tiny.gguf")
    monkeypatch.setenv("LMSTACK_CACHE", str(tmp_path / "cache"))
    err = _Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    load_gguf(path)
    lines = err.getvalue()
    assert f"converting tiny.gguf to a cached fp32 copy under {tmp_path / 'cache' / 'gguf'} (once)\n" in lines
    assert "dequantising" in lines and "11/11" in lines
    monkeypatch.setattr(sys, "stderr", again := _Terminal())
    load_gguf(path)  # from the cache: nothing to say
    assert again.getvalue() == ""
