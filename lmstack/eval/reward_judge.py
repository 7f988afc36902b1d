"""The ``reward_model`` task kind: a trained reward model (``lmstack rm``) scores the model's answers.

The judge is a ``RewardJudge`` (``load_judge`` returns one for a folder holding
``reward_model.json``). For every item the evaluated model answers the task's prompt, and
the reward model scores that answer and the item's first reference answer, in the format the
task sends prompts in (a user message with ``chat: true``, else plain text). Metrics:

* ``reward_score``: the mean reward of the model's answers (the reward model's own scale:
  only differences between models scored by the same reward model mean anything);
* ``reward_win_rate``: the share of items whose answer the reward model scores above the
  reference (a tie counts one half);
* ``reference_reward``: the mean reward of the references, for scale.

Scores go through the output cache, keyed by the reward model's weight digest, the prompt
and the answer. Deliberately left out: reward normalisation across reward models and
per-token rewards.
"""

from __future__ import annotations

import hashlib
from typing import Optional, Sequence

from lmstack.errors import ConfigError
from lmstack.eval.cache import cached_map
from lmstack.eval.calls import generate_answers
from lmstack.eval.items import item_id, references
from lmstack.eval.scoring import KindResult


class RewardJudge:
    """A ``lmstack.train.reward_model.RewardModel`` in the judge slot of the harness."""

    def __init__(self, reward_model, name: str = "reward_model", batch_size: int = 8) -> None:
        self.rm, self.name, self.batch_size = reward_model, name, batch_size
        self._identity: Optional[str] = None

    @classmethod
    def load(cls, folder: str, batch_size: int = 8) -> "RewardJudge":
        from lmstack.train.reward_model import RewardModel

        return cls(RewardModel.load(folder), name=str(folder), batch_size=batch_size)

    @property
    def identity(self) -> str:
        """A digest of every weight of the reward model (head included)."""
        if self._identity is None:
            import torch

            h = hashlib.sha256()
            for k, t in sorted(self.rm.state_dict().items()):
                h.update(k.encode())
                h.update(t.detach().cpu().contiguous().view(-1).view(dtype=torch.uint8).numpy().tobytes())
            self._identity = f"reward_model:{h.hexdigest()[:32]}"
        return self._identity

    def score(self, prompts: Sequence[str], answers: Sequence[str], chat: bool) -> list[float]:
        if chat:
            return self.rm.score([[{"role": "user", "content": p}] for p in prompts],
                                 [[{"role": "assistant", "content": a}] for a in answers], self.batch_size)
        return self.rm.score(list(prompts), list(answers), self.batch_size)


def load_judge(path: str, batch_size: int = 8):
    """The judge at ``path``: a ``RewardJudge`` for a reward-model folder, else a local LLM."""
    from pathlib import Path

    from lmstack.eval.models import LLMModel
    from lmstack.train.reward_model import META_FILE

    if (Path(path) / META_FILE).is_file():
        return RewardJudge.load(path, batch_size)
    return LLMModel.load(path, batch_size=batch_size)


def run_reward_model(task, model, judge, items, cache, progress, stats) -> KindResult:
    rj = judge.model
    if not isinstance(rj, RewardJudge):
        raise ConfigError(f"task {task.name!r}: kind 'reward_model' needs a reward model as its judge (a folder "
                          f"written by `lmstack rm`, e.g. --judge runs/rm/reward_model); got "
                          f"{getattr(rj, 'name', type(rj).__name__)}")
    prompts, preds = generate_answers(task, model, items, cache, progress)
    refs = [references(it)[0] for it in items]
    payloads = [{"prompt": p, "answer": a, "chat": task.chat} for p, a in zip(prompts, preds)]
    payloads += [{"prompt": p, "answer": a, "chat": task.chat} for p, a in zip(prompts, refs)]

    def compute(batch: list[dict]) -> list[float]:
        # one batch is scored as one call; its rows share "chat" (every payload of a task does)
        return rj.score([b["prompt"] for b in batch], [b["answer"] for b in batch], task.chat)

    scores = cached_map(cache, judge.identity, "reward", payloads, compute, rj.batch_size)
    mine, theirs = scores[:len(items)], scores[len(items):]
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(mine, theirs)]
    metrics = {"reward_score": stats.value(mine), "reward_win_rate": stats.value(wins),
               "reference_reward": stats.value(theirs)}
    records = [{"id": item_id(it), "prompt": p, "prediction": y, "references": references(it),
                "scores": {"reward_score": s, "reward_win_rate": w, "reference_reward": r}}
               for it, p, y, s, w, r in zip(items, prompts, preds, mine, wins, theirs)]
    return KindResult(metrics, {"reward_score": mine, "reward_win_rate": wins}, records, "reward_score")
