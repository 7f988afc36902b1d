"""A new user's first hour on the command line: the default model by name, a fast parser,
an interactive chat that behaves as Ollama's does, human summaries, and suggestions for typos."""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from lmstack.cli.main import build_parser, main
from lmstack.config import config_from_dict
from lmstack.errors import ConfigError

# Long enough to interrupt: a random-weight preset with a large context, writing to the limit
# (sampled: greedy decoding of random weights repeats one token, often a newline).
LONG_ANSWER = ("--model", "llama-10m", "--max-new-tokens", "480", "--ignore-eos", "--temperature", "1", "--seed", "0")
STATS = re.compile(r"\[(\d+) tokens, \d+\.\d tok/s, first token after \d+\.\d\d s\]")


def run(*args, input=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "lmstack", *args], capture_output=True, text=True,
                          input=input, timeout=timeout)


# -- startup ------------------------------------------------------------------------------------

def _torch_free(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", f"import sys\n{code}\nassert 'torch' not in sys.modules, "
                           "sorted(m for m in sys.modules if m.startswith('lmstack'))"],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("module", [
    "data", "eval", "model", "serve", "tokenizer", "train",
])
def test_each_command_module_registers_without_torch(module):
    res = _torch_free(f"import argparse, lmstack.cli.{module} as m\n"
                      "m.register(argparse.ArgumentParser().add_subparsers())")
    assert res.returncode == 0, res.stderr


def test_the_whole_parser_is_built_without_torch():
    res = _torch_free("from lmstack.cli.main import build_parser\nbuild_parser()")
    assert res.returncode == 0, res.stderr


# -- typos --------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,hint", [
    (["caht"], "did you mean 'chat'?"),
    (["eval", "rnu", "x.yaml"], "did you mean 'run'?"),
    (["generate", "--prompt", "x", "--dtype", "bfloat61"], "did you mean 'bfloat16'?"),
])
def test_a_mistyped_command_or_choice_gets_the_closest_suggested(argv, hint, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2
    assert hint in capsys.readouterr().err


def test_nothing_close_gets_no_suggestion(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["zzzzzz"])
    err = capsys.readouterr().err
    assert "invalid choice: 'zzzzzz'" in err and "did you mean" not in err


def test_an_unknown_recipe_key_gets_the_closest_field(tmp_path, capsys):
    from lmstack.train.config import SFTConfig

    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['max_step'\]; did you mean 'max_steps'\? known"):
        config_from_dict(SFTConfig, {"max_step": 3})
    with pytest.raises(ConfigError, match=r"did you mean 'max_steps' \(for 'max_step'\), 'warmup_steps' "
                                          r"\(for 'warmup_step'\)\?"):
        config_from_dict(SFTConfig, {"max_step": 3, "warmup_step": 1})
    with pytest.raises(ConfigError) as e:
        config_from_dict(SFTConfig, {"qqqqqq": 1})
    assert "did you mean" not in str(e.value)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("max_step: 3\n")
    assert main(["sft", str(recipe)]) == 2
    assert "did you mean 'max_steps'?" in capsys.readouterr().err


# -- the default model by name ------------------------------------------------------------------

@pytest.fixture
def tiny_default(tmp_path, monkeypatch):
    """A small native model standing in for the embedded default, so naming it is cheap to test."""
    import lmstack.infer.llm as llm_module
    from lmstack import LLM

    folder = LLM.load("tiny-llama").save(tmp_path / "tiny-default")
    monkeypatch.setattr(llm_module, "default_model_path", lambda: folder)
    return folder


@pytest.mark.parametrize("name", [None, "default", "DEFAULT", "SmolLM2-135M-Instruct", "smollm2-135m-instruct"])
def test_default_and_the_models_name_mean_the_embedded_model(name, tiny_default):
    from lmstack.infer.llm import resolve_model

    assert resolve_model(name) == tiny_default


def test_a_preset_or_a_folder_named_default_stays_what_it_is(tiny_default, tmp_path, monkeypatch):
    from lmstack.infer.llm import resolve_model

    assert resolve_model("smollm2-135m") == "smollm2-135m"  # the random-weight preset, not the trained model
    monkeypatch.chdir(tmp_path)
    (tmp_path / "default").mkdir()
    assert resolve_model("default") == "default"


def test_every_command_that_loads_a_model_takes_default(tiny_default, tmp_path, capsys):
    from lmstack import LLM

    want = LLM.load(tiny_default).info()["params"]
    assert LLM.load("default").info()["params"] == want  # what sft, eval and serve go through
    assert main(["info", "default", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params"] == want
    assert main(["convert", "Default", str(tmp_path / "copy")]) == 0
    assert (tmp_path / "copy" / "lmstack.json").is_file()
    text = tmp_path / "t.txt"
    text.write_text("a short text to score")
    capsys.readouterr()
    assert main(["eval", "perplexity", str(text), "--model", "default", "--window", "16"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] > 0
    assert main(["generate", "--model", "smollm2-135m-instruct", "--prompt", "hi", "--max-new-tokens", "2"]) == 0
    assert "note:" not in capsys.readouterr().err


@pytest.mark.slow
def test_default_is_the_real_embedded_model(smollm2_gguf, lmstack_cache):
    from lmstack.infer.llm import resolve_model

    assert resolve_model("default") == smollm2_gguf
    res = run("info", "SmolLM2-135M-Instruct", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["n_layer"] == 30
    # nothing on stderr but, on a cold cache, the one-time conversion line (no random-weights note)
    others = [line for line in res.stderr.splitlines() if line and "cached fp32 copy" not in line]
    assert others == [] and "random" not in res.stderr, res.stderr


def test_a_preset_says_it_has_random_weights_on_the_command_line_only(capfd):
    from lmstack import LLM

    LLM.load("tiny-llama")
    assert capfd.readouterr().err == ""  # Python callers load presets silently
    assert main(["info", "tiny-llama", "--json"]) == 0
    err = capfd.readouterr().err
    assert err == ("note: 'tiny-llama' is a preset with random weights (for tests and pre-training); "
                   "the trained model is 'default'\n")


def test_serve_says_so_too(monkeypatch, capsys):
    import lmstack.serve.server as server

    monkeypatch.setattr(server, "serve", lambda cfg, **kw: 0)
    assert main(["serve", "--model", "smollm2-135m"]) == 0
    assert "note: 'smollm2-135m' is a preset with random weights" in capsys.readouterr().err


# -- generate / chat flags ----------------------------------------------------------------------

def test_the_sampling_flags_state_sampling_params_defaults():
    """The flags default to None (SamplingParams fills in what was not typed, without torch at
    parse time), so their help states the defaults: it must match the dataclass."""
    from lmstack.infer.sampling import SamplingParams

    d = SamplingParams()
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    helps = {a.dest: a.help for a in sub.choices["chat"]._actions}
    assert f"(default {d.max_new_tokens})" in helps["max_new_tokens"]
    assert d.temperature == 0.0 and "0 = greedy (the default)" in helps["temperature"]
    assert d.top_k == 0 and "(default 0: off)" in helps["top_k"]
    assert d.top_p == 1.0 and "(default 1.0: off)" in helps["top_p"]
    assert d.min_p == 0.0 and "(default 0: off)" in helps["min_p"]
    assert d.repetition_penalty == 1.0 and "default 1.0: off" in helps["repetition_penalty"]


def test_stats_count_tokens_not_chunks(capsys):
    assert main(["generate", "--model", "tiny-llama", "--prompt", "hi", "--max-new-tokens", "7", "--ignore-eos",
                 "--stats"]) == 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    m = STATS.fullmatch(last)
    assert m and m.group(1) == "7", last
    assert main(["chat", "hi", "--model", "tiny-llama", "--max-new-tokens", "5", "--ignore-eos", "--stats"]) == 0
    m = STATS.fullmatch(capsys.readouterr().err.strip().splitlines()[-1])
    assert m and m.group(1) == "5"


@pytest.fixture
def adapter(tiny_adapter):
    return tiny_adapter[1]


def test_generate_and_chat_take_an_adapter_the_way_eval_does(adapter, capsys):
    from lmstack.eval.models import LLMModel

    tuned = LLMModel.load("tiny-llama", str(adapter)).llm
    args = ["--model", "tiny-llama", "--max-new-tokens", "12", "--ignore-eos"]
    assert main(["generate", "--prompt", "hello", *args, "--adapter", str(adapter)]) == 0
    with_adapter = capsys.readouterr().out
    assert with_adapter == tuned.generate("hello", max_new_tokens=12, ignore_eos=True) + "\n"
    assert main(["generate", "--prompt", "hello", *args]) == 0
    assert capsys.readouterr().out != with_adapter
    messages = [{"role": "user", "content": "hello"}]
    assert main(["chat", "hello", *args, "--adapter", str(adapter)]) == 0
    assert capsys.readouterr().out == tuned.chat(messages, max_new_tokens=12, ignore_eos=True) + "\n"


def test_threads_sets_torchs_thread_count_before_the_load(monkeypatch):
    import torch

    import lmstack.infer.llm as llm_module

    seen = []
    real = llm_module.LLM.load.__func__
    monkeypatch.setattr(llm_module.LLM, "load", classmethod(lambda cls, *a, **kw: (
        seen.append(torch.get_num_threads()), real(cls, *a, **kw))[1]))
    before = torch.get_num_threads()
    try:
        assert main(["generate", "--model", "tiny-llama", "--prompt", "x", "--max-new-tokens", "1",
                     "--threads", "1"]) == 0
        assert seen == [1]
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("command", [["generate", "--prompt", "x"], ["chat"], ["eval", "perplexity", "f.txt"],
                                     ["eval", "run", "s.yaml", "--model", "m"]])
def test_threads_must_be_positive(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([*command, "--threads", "0"])
    assert "--threads: got '0', expected an integer >= 1" in capsys.readouterr().err


def test_chat_commands_when_input_is_piped():
    res = run("chat", "--model", "tiny-llama", "--max-new-tokens", "3",
              input="/help\n/foo bar\nhi\n/reset\nhello again\n/bye\nnot read\n")
    assert res.returncode == 0, res.stderr
    assert "/reset" in res.stderr and "/exit" in res.stderr  # the /help list
    assert "unknown command /foo; /help lists them" in res.stderr
    assert "history cleared" in res.stderr
    assert res.stdout.count("> ") == 6  # /bye quit before the last line


def test_an_error_in_one_answer_keeps_the_session():
    res = run("chat", "--model", "tiny-llama", input="x" * 300 + "\n/bye\n")  # tiny-llama's context: 128
    assert res.returncode == 0, res.stderr
    assert "leaves no room in the context of 128 tokens (/reset starts over)" in res.stderr


# -- the interactive chat in a terminal ---------------------------------------------------------

def _spawn(*args):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "lmstack", "chat", *args], encoding="utf-8",
                          codec_errors="replace", timeout=120, env={**os.environ, "TERM": "dumb"},
                          dimensions=(40, 200))
    child.expect_exact("> ")
    return child


def _ask(child, typed: str = "") -> None:
    """Ask, wait for the answer to start streaming, then type ``typed`` (no Enter) into it."""
    child.sendline("tell me a long story")
    child.expect_exact("tell me a long story")
    child.expect(r"\S")  # the answer is streaming
    if typed:
        child.send(typed)


def _stop_an_answer(child):
    _ask(child)
    child.sendintr()
    child.expect_exact("[stopped]")
    child.expect_exact("> ")


def _finish(child) -> int:
    child.expect(pytest.importorskip("pexpect").EOF)
    child.close()
    return child.exitstatus


def test_ctrl_c_stops_the_answer_and_keeps_the_session():
    child = _spawn(*LONG_ANSWER)
    _stop_an_answer(child)
    child.sendline("/help")
    child.expect_exact("forget the conversation")
    child.expect_exact("> ")
    child.sendline("/foo")
    child.expect_exact("unknown command /foo; /help lists them")
    child.expect_exact("> ")
    _stop_an_answer(child)
    child.sendline("/reset")
    child.expect_exact("history cleared")
    child.expect_exact("> ")
    child.sendline("/exit")
    assert _finish(child) == 0


def test_keys_typed_during_an_answer_are_not_echoed_nor_kept():
    child = _spawn(*LONG_ANSWER[:2], "--max-new-tokens", "160", *LONG_ANSWER[4:], "--stats")
    _ask(child, typed="qzqzq")
    child.expect(STATS)  # the answer ran to its end
    assert "qzqzq" not in child.before
    child.expect_exact("> ")
    child.sendline("/help")  # had "qzqzq" been kept, this line would be "qzqzq/help", a question
    child.expect_exact("forget the conversation")
    child.expect_exact("> ")
    child.sendeof()
    assert _finish(child) == 0


def test_ctrl_c_twice_at_the_prompt_quits():
    child = _spawn("--model", "tiny-llama")
    child.sendintr()
    child.expect_exact("Ctrl-C again")
    child.expect_exact("> ")
    child.sendintr()
    assert _finish(child) == 0


@pytest.mark.slow
def test_the_default_model_answers_in_a_terminal(smollm2_gguf, lmstack_cache):
    child = _spawn("--max-new-tokens", "24", "--stats")
    child.sendline("What is the capital of France?")
    child.expect_exact("Paris")
    child.expect(STATS)
    child.expect_exact("> ")
    child.sendline("/bye")
    assert _finish(child) == 0


# -- summaries ----------------------------------------------------------------------------------

def test_eval_run_prints_the_headline_table_and_where_the_report_is(tmp_path, capsys):
    suite = tmp_path / "s.yaml"
    suite.write_text("name: s\ntasks:\n  - {name: qa, kind: generative, dataset: qa, limit: 3, max_new_tokens: 2}\n")
    assert main(["eval", "run", str(suite), "--model", "tiny-llama", "--out", str(tmp_path / "out"), "--no-cache"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "s: tiny-llama"
    assert lines[1].split() == ["task", "metric", "value", "95%", "CI"]
    assert any(line.split()[:2] == ["qa", "exact_match"] for line in lines[2:])
    assert f"report: {tmp_path / 'out' / 'report.md'} (also report.json, report.html" in out
    assert "# Evaluation report" not in out and "Worst examples" not in out


def test_data_info_is_a_summary_with_json_behind_a_flag(tmp_path, capsys):
    from lmstack.data.shards import FORMAT, VERSION

    meta = {"format": FORMAT, "version": VERSION, "complete": True, "dtype": "<u2", "eos_token_id": 0,
            "vocab_size": 8192, "tokenizer": {"sha256": "x", "path": "tokenizer/tokenizer.json"},
            "splits": {"train": {"num_tokens": 123456, "num_docs": 100}, "val": {"num_tokens": 1234, "num_docs": 3}},
            "sources": {"wiki": {"token_share": 0.75}, "code": {"token_share": 0.25}},
            "mixture": {}, "shards": [{}, {}]}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    assert main(["data", "info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"{tmp_path}: complete"
    assert "train:       123,456 tokens in 100 documents" in out
    assert "2 shard(s) of uint16, vocab_size 8,192, eos id 0" in out
    assert "tokens by source: wiki 75.0%, code 25.0%" in out
    assert main(["data", "info", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_shards"] == 2


def _sft_args(tmp_path, *more):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{i}+1?"},
                                                     {"role": "assistant", "content": str(i + 1)}]}) + "\n"
                            for i in range(8)))
    return ["sft", "--model", "tiny-llama", "--data", str(data), "--val-data", "", "--out-dir", str(tmp_path / "run"),
            "--batch-size", "2", "--max-steps", "2", "--ckpt-interval", "1", "--warmup-steps", "1",
            "--peak-flops", "1e12", "--no-progress", *more]


def test_sft_ends_with_a_summary_and_json_behind_a_flag(tmp_path, capsys):
    assert main(_sft_args(tmp_path)) == 0
    captured = capsys.readouterr()
    assert "note: 'tiny-llama' is a preset with random weights" in captured.err
    run_dir = tmp_path / "run"
    assert re.search(r"^sft: 2 steps, final loss \d+\.\d{4}$", captured.out, re.M), captured.out
    assert f"run folder: {run_dir}" in captured.out and f"adapter:    {run_dir / 'adapter'}" in captured.out
    assert f"lmstack chat --model tiny-llama --adapter {run_dir / 'adapter'}" in captured.out
    assert main(_sft_args(tmp_path / "again", "--json")) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["run_dir"] == str(tmp_path / "again" / "run")


def test_a_stopped_run_names_its_last_checkpoint_and_the_resume_command(tmp_path, capsys, monkeypatch):
    import lmstack.train.sft as sft_module

    assert main(_sft_args(tmp_path)) == 0
    capsys.readouterr()

    def interrupted(cfg, resume=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(sft_module, "sft", interrupted)
    assert main(_sft_args(tmp_path)) == 130
    err = capsys.readouterr().err
    assert f"last checkpoint: {tmp_path / 'run' / 'checkpoints' / 'step-00000002'}" in err
    command = err.split("resume with: ")[1].strip()
    assert shlex.split(command)[:2] == ["lmstack", "sft"] and command.endswith(" --resume")
    assert build_parser().parse_args(shlex.split(command)[1:]).resume  # it parses as typed
    assert "--val-data ''" in command and "--no-progress" in command

    assert main(_sft_args(tmp_path / "fresh")) == 130
    assert "stopped before its first checkpoint" in capsys.readouterr().err
