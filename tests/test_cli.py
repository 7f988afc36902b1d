"""The command line: streaming chat, generate, convert, info, and one-line errors."""

import json
import os
import subprocess
import sys



def run(*args, input=None, env_extra=None, timeout=300):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "lmstack", *args], capture_output=True, text=True,
                          input=input, timeout=timeout, env=env)


def assert_one_line_error(res, *needles):
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmstack: error:"), res.stderr
    assert "Traceback" not in res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_help_lists_the_commands():
    res = run("--help")
    assert res.returncode == 0
    for cmd in ("chat", "generate", "convert", "info"):
        assert cmd in res.stdout


def test_info_on_a_preset():
    res = run("info", "tiny-llama", "--json")
    info = json.loads(res.stdout)
    assert info["params"] > 0 and info["n_kv_head"] == 2 and info["arch"] == "llama"


def test_generate_is_seeded(tmp_path):
    args = ("generate", "--model", "tiny-gpt2", "--prompt", "hello", "--max-new-tokens", "8",
            "--temperature", "1.0", "--seed", "7")
    a, b = run(*args), run(*args)
    assert a.returncode == 0 and a.stdout == b.stdout


def test_convert_native_then_hf(tmp_path):
    assert run("convert", "tiny-qwen2", str(tmp_path / "n")).returncode == 0
    assert (tmp_path / "n" / "lmstack.json").is_file() and (tmp_path / "n" / "metadata.json").is_file()
    res = run("convert", str(tmp_path / "n"), str(tmp_path / "h"), "--to", "hf")
    assert res.returncode == 0, res.stderr
    cfg = json.loads((tmp_path / "h" / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and (tmp_path / "h" / "tokenizer.json").is_file()
    assert not list(tmp_path.glob(".*tmp*")), "temporary folders left behind"


def test_errors_are_one_line(tmp_path):
    assert_one_line_error(run("info", str(tmp_path / "nope")), "model not found")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    assert_one_line_error(run("info", str(tmp_path / "bert")), "'bert'", "supported: gpt2, llama")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run("info", str(tmp_path / "empty")), "not a model folder")
    (tmp_path / "pt").mkdir()
    (tmp_path / "pt" / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 8,
        "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 8}))
    (tmp_path / "pt" / "pytorch_model.bin").write_bytes(b"\x80\x04")
    assert_one_line_error(run("info", str(tmp_path / "pt")), "no *.safetensors", "never loaded")
    assert_one_line_error(run("generate", "--model", "tiny-llama", "--prompt", "x", "--top-p", "0"), "top_p")


def test_chat_streams_an_answer(smollm2_gguf, lmstack_cache, smollm2):
    res = run("chat", "What is the capital of France?", env_extra={"LMSTACK_CACHE": str(lmstack_cache)})
    assert res.returncode == 0, res.stderr
    assert "Paris" in res.stdout


def test_interactive_chat_keeps_history(smollm2_gguf, lmstack_cache, smollm2):
    res = run("chat", "--max-new-tokens", "20", input="What is the capital of France?\n/reset\nSay hi.\n/exit\n",
              env_extra={"LMSTACK_CACHE": str(lmstack_cache)})
    assert res.returncode == 0, res.stderr
    assert "Paris" in res.stdout and res.stdout.count("> ") >= 3
