"""Reward functions for online RL: a table of built-ins, user functions as ``module:function``,
a weighted sum, and the checks that keep a bad reward from training anything.

Every reward has TRL's signature::

    def my_reward(prompts, completions, **columns) -> list[float | None]

``prompts`` and ``completions`` hold one entry per completion (a prompt repeats once per
sample); conversational data gives messages (a completion is ``[{"role": "assistant",
"content": ...}]``), plain data gives strings. ``columns`` holds every other column of the
data set, repeated the same way, plus ``completion_ids``. ``None`` means "does not apply to
this completion" (a code test for an arithmetic row); a completion to which no reward applies
gets no advantage, as in TRL.

Built-ins (``REWARDS``): ``exact_match`` (the answer extracted from the completion against the
``answer`` column), ``regex_match`` (the whole completion against the ``pattern`` column),
``json_schema`` (the completion parses as JSON that satisfies the ``schema`` column),
``unit_tests`` (the completion's code followed by the ``tests`` column passes in the sandbox of
``lmstack.eval.code_exec``), ``reward_model`` (a model trained by ``lmstack rm``; its folder is
the ``path`` argument).

Checks, with the function named: it raises; it returns something that is not a list of the
completions' length; an entry that is not a number or None; NaN or infinity. Any of them stops
the step before its update, so a NaN reward never reaches a checkpoint. Deliberately left out:
asynchronous rewards and rewards that see the model's log-probs.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from lmstack.errors import ConfigError, LMStackError

RewardFn = Callable[..., list]


@dataclass
class RewardSpec:
    """One term of the reward: a built-in name or ``module:function``, its weight, and keyword
    arguments bound to the function (e.g. ``{"path": "runs/rm-smollm2/reward_model"}`` for ``reward_model``)."""

    name: str = "exact_match"
    weight: float = 1.0
    args: dict[str, Any] = field(default_factory=dict)


class RewardError(LMStackError):
    """A reward function failed or returned something unusable; the message names it."""


# -- what the built-ins read from a completion -----------------------------------------------

_TAG = re.compile(r"<answer>(.*?)</answer>", re.S)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_FENCE = re.compile(r"```(?:[A-Za-z0-9_+-]*)\n(.*?)```", re.S)


def completion_text(c: Any) -> str:
    """The text of a completion: a string, or the content of its messages."""
    if isinstance(c, str):
        return c
    return "".join(str(m.get("content", "")) for m in c)


def extract_answer(text: str) -> str:
    """The answer a completion gives: the last ``<answer>...</answer>``, else its last number
    (``"12.0"`` reads as ``"12"``), else the stripped text."""
    tags = _TAG.findall(text)
    if tags:
        text = tags[-1]
    nums = _NUMBER.findall(text)
    if not nums:
        return text.strip()
    n = nums[-1]
    return n[: -len(".0")] if n.endswith(".0") else n


def extract_code(text: str) -> str:
    """The first fenced code block of a completion, or the whole text."""
    m = _FENCE.search(text)
    return m.group(1) if m else text


def extract_json(text: str) -> Any:
    """The JSON value a completion holds (inside a code fence or not); raises ``ValueError``."""
    text = extract_code(text).strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise ValueError("no JSON object")
    return json.loads(text[start:end + 1])


# -- built-ins ------------------------------------------------------------------------------


def exact_match(prompts, completions, answer=None, **_) -> list[Optional[float]]:
    """1.0 when the extracted answer equals the ``answer`` column (as text), else 0.0."""
    answer = answer or [None] * len(completions)
    return [None if a is None else float(extract_answer(completion_text(c)) == str(a).strip())
            for c, a in zip(completions, answer)]


def regex_match(prompts, completions, pattern=None, **_) -> list[Optional[float]]:
    """1.0 when the stripped completion matches the ``pattern`` column in full."""
    pattern = pattern or [None] * len(completions)
    return [None if p is None else float(re.fullmatch(p, completion_text(c).strip(), re.S) is not None)
            for c, p in zip(completions, pattern)]


def json_schema(prompts, completions, schema=None, **_) -> list[Optional[float]]:
    """1.0 when the completion holds JSON that satisfies the ``schema`` column (JSON Schema,
    checked by ``jsonschema_rs``, a dependency of the ``serve`` extra)."""
    import jsonschema_rs

    schema = schema or [None] * len(completions)
    out: list[Optional[float]] = []
    for c, s in zip(completions, schema):
        if s is None:
            out.append(None)
            continue
        try:
            out.append(float(jsonschema_rs.is_valid(s, extract_json(completion_text(c)))))
        except ValueError:  # no JSON in the completion (json.JSONDecodeError is a ValueError)
            out.append(0.0)
    return out


def unit_tests(prompts, completions, tests=None, timeout_s: float = 10.0, workers: int = 2,
               **_) -> list[Optional[float]]:
    """1.0 when the completion's code followed by the ``tests`` column runs to the end in the
    sandbox (``lmstack.eval.code_exec``: bubblewrap, no network, limits)."""
    from lmstack.eval.code_exec import SandboxConfig, run_many

    tests = tests or [None] * len(completions)
    jobs = [(k, extract_code(completion_text(c)) + "\n\n" + t + "\n") for k, (c, t) in enumerate(zip(completions, tests))
            if t is not None]
    out: list[Optional[float]] = [None] * len(completions)
    if jobs:
        results = run_many([p for _, p in jobs], SandboxConfig(timeout_s=timeout_s), workers=workers, progress=False)
        for (k, _), r in zip(jobs, results):
            out[k] = float(r.passed)
    return out


@functools.lru_cache(maxsize=2)
def _reward_model(path: str, device: str):
    from lmstack.train.reward_model import RewardModel

    return RewardModel.load(path, device=device)


def reward_model(prompts, completions, path: str = "", device: str = "cpu", **_) -> list[Optional[float]]:
    """The score of a reward model trained by ``lmstack rm`` (loaded once, at first use)."""
    if not path:
        raise ConfigError("reward 'reward_model': set args: {path: <folder written by lmstack rm>}")
    return _reward_model(path, device).score(list(prompts), list(completions))


REWARDS: dict[str, RewardFn] = {
    "exact_match": exact_match,
    "regex_match": regex_match,
    "json_schema": json_schema,
    "unit_tests": unit_tests,
    "reward_model": reward_model,
}


# -- resolving, checking, combining ---------------------------------------------------------


def resolve(spec: RewardSpec) -> RewardFn:
    """The function a spec names, its ``args`` bound; errors name the spec."""
    name = spec.name
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            raise ConfigError(f"reward {name!r}: cannot import module {module!r} ({e})") from None
        fn = getattr(mod, attr, None)
        if fn is None:
            raise ConfigError(f"reward {name!r}: module {module!r} has no attribute {attr!r}")
        if not callable(fn):
            raise ConfigError(f"reward {name!r}: {attr!r} is a {type(fn).__name__}, expected a function")
    elif name in REWARDS:
        fn = REWARDS[name]
    else:
        raise ConfigError(f"reward {name!r}: expected one of {sorted(REWARDS)} or 'module:function'")
    return functools.partial(fn, **spec.args) if spec.args else fn


def check_rewards(name: str, values: Any, n: int, prompts: Sequence) -> list[Optional[float]]:
    """``values`` as a list of ``n`` finite floats or None; an error naming ``name`` otherwise."""
    if not isinstance(values, (list, tuple)):
        raise RewardError(f"reward {name!r} returned a {type(values).__name__}, expected a list of {n} numbers")
    if len(values) != n:
        raise RewardError(f"reward {name!r} returned {len(values)} values for {n} completions")
    out: list[Optional[float]] = []
    for k, v in enumerate(values):
        if v is None:
            out.append(None)
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) and not hasattr(v, "__float__"):
            raise RewardError(f"reward {name!r} returned {v!r} ({type(v).__name__}) for completion {k}, "
                              "expected a number or None")
        f = float(v)
        if not math.isfinite(f):
            raise RewardError(f"reward {name!r} returned {f} for completion {k} (prompt {str(prompts[k])[:80]!r}); "
                              "rewards must be finite, so the step was not applied")
        out.append(f)
    return out


class Rewards:
    """The weighted sum of several rewards: ``total = sum_i w_i r_i`` over the rewards that
    apply (``None`` entries are left out; none applying gives NaN, which GRPO turns into a zero
    advantage)."""

    def __init__(self, specs: Sequence[RewardSpec]):
        if not specs:
            raise ConfigError("rewards: got an empty list, expected at least one reward")
        self.specs = list(specs)
        self.fns = [resolve(s) for s in self.specs]
        # the keys of the per-function results: a name listed twice (other args) gets "#2", "#3"
        self.names = [s.name if [t.name for t in self.specs[:i]].count(s.name) == 0
                      else f"{s.name}#{[t.name for t in self.specs[:i]].count(s.name) + 1}"
                      for i, s in enumerate(self.specs)]

    def __call__(self, prompts: list, completions: list, columns: dict[str, list]
                 ) -> tuple[list[float], dict[str, list[Optional[float]]]]:
        n = len(completions)
        per: dict[str, list[Optional[float]]] = {}
        for name, fn in zip(self.names, self.fns):
            try:
                values = fn(prompts, completions, **columns)
            except LMStackError:  # already a message for people (e.g. a missing reward model folder)
                raise
            except Exception as e:
                raise RewardError(f"reward {name!r} raised {type(e).__name__}: {e}") from e
            per[name] = check_rewards(name, values, n, prompts)
        total = []
        for k in range(n):
            terms = [s.weight * per[name][k] for s, name in zip(self.specs, self.names) if per[name][k] is not None]
            total.append(math.fsum(terms) if terms else math.nan)
        return total, per
