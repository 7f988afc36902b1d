"""Reward functions: the built-ins, ``module:function`` loading, the weighted sum, and the
checks that name a failing function."""

from __future__ import annotations

import math
import sys

import pytest

from lmstack.errors import ConfigError
from lmstack.train.rewards import (REWARDS, RewardError, Rewards, RewardSpec, exact_match, extract_answer,
                                   json_schema, regex_match, resolve, unit_tests)

SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}


def _chat(text):
    return [{"role": "assistant", "content": text}]


def test_extract_answer_prefers_the_tag_then_the_last_number():
    assert extract_answer("3 + 4 = 7") == "7"
    assert extract_answer("<answer>12</answer> and then 99") == "12"
    assert extract_answer("it is 12.0") == "12"
    assert extract_answer("no digits here ") == "no digits here"


def test_exact_match_reads_the_answer_column_and_skips_rows_without_one():
    got = exact_match(None, ["so 7", _chat("The answer is 8."), "7"], answer=["7", "7", None])
    assert got == [1.0, 0.0, None]


def test_regex_match_is_a_full_match_of_the_stripped_completion():
    assert regex_match(None, [" yes\n", "yes, sure", "x"], pattern=["yes|no", "yes|no", None]) == [1.0, 0.0, None]


def test_json_schema_accepts_fenced_and_surrounded_json_only_when_it_validates():
    comps = ['{"answer": 4}', '```json\n{"answer": 4}\n```', 'Sure: {"answer": 4} done', '{"answer": "4"}',
             "four", '{"answer": 4}']
    assert json_schema(None, comps, schema=[SCHEMA] * 5 + [None]) == [1.0, 1.0, 1.0, 0.0, 0.0, None]


def test_unit_tests_run_in_the_sandbox():
    from lmstack.eval.code_exec import isolation_mode

    try:
        isolation_mode()
    except Exception as e:  # no bubblewrap on this machine: the built-in refuses, and says why
        pytest.skip(str(e))
    tests = "assert add_2(1) == 3\nassert add_2(-2) == 0"
    comps = ["```python\ndef add_2(x):\n    return x + 2\n```", "def add_2(x):\n    return x + 3",
             "import os\nos.system('true')\ndef add_2(x):\n    return x + 2", "whatever"]
    assert unit_tests(None, comps, tests=[tests, tests, tests, None]) == [1.0, 0.0, 0.0, None]


def test_every_builtin_has_the_trl_signature():
    for name, fn in REWARDS.items():
        if name in ("unit_tests", "reward_model"):
            continue
        assert fn(["p"], ["c"]) == [None], name  # without its column a built-in does not apply


# -- loading and combining --------------------------------------------------------------------


def _one(prompts, completions, **_):
    return [1.0] * len(completions)


def _length(prompts, completions, **_):
    return [float(len(c)) for c in completions]


def _raises(prompts, completions, **_):
    raise ValueError("boom")


def _short(prompts, completions, **_):
    return [1.0]


def _nan(prompts, completions, **_):
    return [0.0, math.nan]


def _inf(prompts, completions, **_):
    return [math.inf, 0.0]


def _text(prompts, completions, **_):
    return ["good", 1.0]


def _scalar(prompts, completions, **_):
    return 1.0


def _sees_columns(prompts, completions, answer, completion_ids, scale=1.0, **_):
    return [scale * (a == "x") + len(ids) for a, ids in zip(answer, completion_ids)]


def _spec(fn, weight=1.0, **args):
    return RewardSpec(f"tests.test_align_rewards:{fn}", weight, args)


def test_weighted_sum_of_user_and_builtin_rewards_with_columns_and_args():
    r = Rewards([_spec("_one", 0.5), _spec("_length", 2.0), RewardSpec("exact_match")])
    total, per = r(["p", "p"], ["ab", "1"], {"answer": [None, "1"]})
    assert per["exact_match"] == [None, 1.0]
    assert total == [0.5 + 4.0, 0.5 + 2.0 + 1.0]  # the term that does not apply is left out
    r = Rewards([_spec("_sees_columns", scale=10.0), _spec("_sees_columns", 0.5)])
    total, per = r(["p", "p"], ["a", "b"], {"answer": ["x", "y"], "completion_ids": [[1, 2], [3]]})
    assert total == [12.0 + 0.5 * 3.0, 1.0 + 0.5 * 1.0]
    assert list(per) == ["tests.test_align_rewards:_sees_columns", "tests.test_align_rewards:_sees_columns#2"]


def test_no_applicable_reward_gives_nan_for_that_completion_only():
    total, _ = Rewards([RewardSpec("exact_match")])(["p", "p"], ["1", "2"], {"answer": ["1", None]})
    assert total[0] == 1.0 and math.isnan(total[1])


@pytest.mark.parametrize("fn, message", [
    ("_raises", r"'tests.test_align_rewards:_raises' raised ValueError: boom"),
    ("_short", r"'tests.test_align_rewards:_short' returned 1 values for 2 completions"),
    ("_nan", r"'tests.test_align_rewards:_nan' returned nan for completion 1"),
    ("_inf", r"'tests.test_align_rewards:_inf' returned inf for completion 0"),
    ("_text", r"'tests.test_align_rewards:_text' returned 'good' \(str\) for completion 0"),
    ("_scalar", r"'tests.test_align_rewards:_scalar' returned a float, expected a list of 2"),
])
def test_bad_rewards_fail_with_the_function_named(fn, message):
    r = Rewards([_spec("_one"), _spec(fn)])
    with pytest.raises(RewardError, match=message):
        r(["p", "q"], ["a", "b"], {})


@pytest.mark.parametrize("name, message", [
    ("no_such_reward", r"expected one of \[.*exact_match.*\] or 'module:function'"),
    ("no_such_module_xyz:fn", r"cannot import module 'no_such_module_xyz'"),
    ("tests.test_align_rewards:missing", r"module 'tests.test_align_rewards' has no attribute 'missing'"),
    ("tests.test_align_rewards:SCHEMA", r"'SCHEMA' is a dict, expected a function"),
])
def test_unknown_rewards_fail_before_anything_runs(name, message):
    with pytest.raises(ConfigError, match=message):
        resolve(RewardSpec(name))


def test_reward_model_needs_its_folder():
    with pytest.raises(ConfigError, match="reward_model"):
        Rewards([RewardSpec("reward_model")])(["p"], ["c"], {})


sys.modules.setdefault("tests.test_align_rewards", sys.modules[__name__])
