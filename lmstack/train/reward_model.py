"""A reward model: the core transformer with a scalar head on the last token, r(x, y) = w . h_T + b.

``h_T`` is the final normed hidden state (``Transformer.forward(return_hidden=True)``) of the
last real token of prompt + completion; for a chat that is the completion's end-of-turn
token, which has attended to every token before it. The forward asks the core for that one
position per row (``keep``), so the last block's MLP and the final norm run on ``B`` rows,
not ``B x T``. The head is zero-initialised: every pair starts with equal rewards (the
Bradley-Terry loss is exactly log 2), and the first update moves the head only. The head is
computed in float32 whatever the autocast dtype.

A saved reward model is one folder::

    reward_model.json    format, base model, PEFT method, head width, max_len, max_prompt_len
    head.safetensors     head.weight (1, n_embd), head.bias (1,)
    model/               full fine-tuning: a native checkpoint (``LLM.load`` reads it alone)
    adapter/             LoRA/QLoRA: the adapter (``lmstack.peft.save_adapter``) for the base named in the json

``RewardModel.load(folder).score(prompts, completions)`` returns one float per pair; prompts
and completions are TRL's plain text or conversational messages, as in the training data.
``ScalarHead`` is also PPO's value head. Deliberately left out: multi-objective heads,
reward normalisation statistics saved with the model, and sequence classification exports
to the Hugging Face format.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn

from lmstack.errors import LMStackError
from lmstack.files import atomic_dir
from lmstack.train.align_common import collate, encode, pad_id

FORMAT = "lmstack-reward-model/1"
META_FILE = "reward_model.json"
HEAD_FILE = "head.safetensors"


class ScalarHead(nn.Linear):
    """``n_embd -> 1``, zero-initialised (the reward model's head and PPO's value head)."""

    def __init__(self, n_embd: int):
        super().__init__(n_embd, 1)
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return super().forward(h.float()).squeeze(-1)  # (...,)


def last_token_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """(B, T) bool, True at position ``lengths[b] - 1`` of each row only."""
    return torch.arange(T, device=lengths.device)[None, :] == (lengths[:, None] - 1)


class RewardModel(nn.Module):
    """``core`` (a ``Transformer``, possibly with PEFT modules) + ``head`` (a ``ScalarHead``)."""

    def __init__(self, core: nn.Module, tokenizer=None, base: str = "", max_len: int = 512,
                 max_prompt_len: int = 0):
        super().__init__()
        self.core = core
        self.head = ScalarHead(core.config.n_embd).to(core.device)
        self.tokenizer = tokenizer
        self.base, self.max_len, self.max_prompt_len = base, max_len, max_prompt_len

    @property
    def config(self):
        return self.core.config

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Rewards (B,) of right-padded ``input_ids`` (B, T) with ``lengths[b]`` real tokens."""
        if int(lengths.min()) < 1 or int(lengths.max()) > input_ids.shape[1]:
            raise LMStackError(f"lengths: got {lengths.tolist()}, expected each in [1, {input_ids.shape[1]}]")
        keep = last_token_mask(lengths, input_ids.shape[1])
        h = self.core(input_ids, return_hidden=True, keep=keep)[0]  # (B, C): one kept position per row, in order
        return self.head(h)

    # -- scoring text ---------------------------------------------------------------------

    def encode_pairs(self, prompts: Sequence, completions: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ``input_ids`` (B, T) and ``lengths`` (B,) of prompt + completion pairs."""
        tok = self._need_tokenizer()
        if len(prompts) != len(completions):
            raise LMStackError(f"score: got {len(prompts)} prompts and {len(completions)} completions, "
                               "expected one completion per prompt")
        items = []
        for i, (p, c) in enumerate(zip(prompts, completions)):
            if isinstance(p, list) and isinstance(c, str):  # a conversational prompt answered in plain text
                c = [{"role": "assistant", "content": c}]
            enc = encode(tok, p, c, self.max_len, self.max_prompt_len)
            if enc is None:  # a prompt that fills max_len keeps its last max_len / 2 tokens, so the pair still scores
                enc = encode(tok, p, c, self.max_len, self.max_len // 2)
            if enc is None:
                raise LMStackError(f"score: pair {i} has no completion token to score (max_len {self.max_len})")
            items.append(enc)
        b = collate(items, pad_id(tok))
        lengths = torch.tensor([len(p) + len(c) for p, c in items])
        return b["input_ids"], lengths

    @torch.no_grad()
    def score(self, prompts: Sequence, completions: Sequence, batch_size: int = 16) -> list[float]:
        """The reward of each (prompt, completion) pair."""
        was = self.training
        self.eval()
        out: list[float] = []
        try:
            for i in range(0, len(prompts), batch_size):
                ids, lengths = self.encode_pairs(prompts[i:i + batch_size], completions[i:i + batch_size])
                out += self(ids.to(self.core.device), lengths.to(self.core.device)).tolist()
        finally:
            self.train(was)
        return out

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise LMStackError("this reward model has no tokenizer; it scores token ids only (forward)")
        return self.tokenizer

    # -- saving and loading ---------------------------------------------------------------

    def save(self, folder: str | os.PathLike, metadata: Optional[dict] = None) -> Path:
        """Write the folder described in the module docstring, atomically as a whole."""
        from safetensors.torch import save_file

        from lmstack.model.checkpoint import save_native
        from lmstack.peft.core import save_adapter

        head = {k: v.detach().float().cpu().contiguous() for k, v in self.head.state_dict().items()}
        if not all(torch.isfinite(t).all() for t in head.values()):
            raise LMStackError("refusing to save the reward model: its head has non-finite values")
        peft = getattr(self.core, "peft_config", None)
        meta = {"format": FORMAT, "base": self.base, "peft": peft.method if peft is not None else "full",
                "n_embd": self.config.n_embd, "max_len": self.max_len, "max_prompt_len": self.max_prompt_len,
                **(metadata or {})}
        with atomic_dir(folder) as tmp:
            save_file(head, str(tmp / HEAD_FILE))
            if peft is None:
                save_native(self.core, tmp / "model", self.tokenizer, metadata={"source": "lmstack rm"})
            else:
                save_adapter(self.core, tmp / "adapter")
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        return Path(folder)

    @classmethod
    def load(cls, folder: str | os.PathLike, device: str = "cpu") -> "RewardModel":
        """A reward model saved by ``save`` (its base model is loaded again for an adapter)."""
        from safetensors.torch import load_file

        from lmstack.infer.llm import LLM

        folder = Path(folder)
        if not (folder / META_FILE).is_file():
            raise LMStackError(f"{folder}: not a reward model folder (no {META_FILE}; `lmstack rm` writes one "
                               "as <out_dir>/reward_model)")
        meta = json.loads((folder / META_FILE).read_text())
        if meta.get("format") != FORMAT:
            raise LMStackError(f"{folder / META_FILE}: format {meta.get('format')!r}, expected {FORMAT!r}")
        if meta["peft"] == "full":
            llm = LLM.load(folder / "model", device=device)
        else:
            # "seed": a random preset base is rebuilt from the seed it was trained on
            llm = LLM.load(meta["base"] or None, device=device, seed=meta.get("seed", 0), adapter=folder / "adapter")
        rm = cls(llm.model, llm.tokenizer, base=meta["base"], max_len=meta["max_len"],
                 max_prompt_len=meta["max_prompt_len"])
        head = load_file(str(folder / HEAD_FILE))
        if tuple(head["weight"].shape) != (1, rm.config.n_embd):
            raise LMStackError(f"{folder / HEAD_FILE}: head of shape {tuple(head['weight'].shape)}, expected "
                               f"(1, {rm.config.n_embd}) for this base model")
        rm.head.load_state_dict(head)
        return rm.eval()
