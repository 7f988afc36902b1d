"""What the harness and the judges evaluate: a local ``LLM`` (optionally with a LoRA / PEFT
adapter) or an OpenAI-compatible endpoint, behind one batched interface.

    generate_batch(prompts, max_new_tokens, temperature, seeds, chat, stop) -> list[str]
    loglikelihood_batch([(context, continuation), ...]) -> list[float]
    option_probs(prompt, options, chat) -> list[float] | None   # next-token probabilities (G-Eval)
    option_loglikelihoods(prompts, options, chat) -> list[list[float]]  # likelihood judges; local only
    identity -> str                                              # for the output cache key

Sampled rows get their own seed (``seeds[i]``), so a row's text never depends on which other
rows share its batch: a resumed run reproduces the uninterrupted one. Endpoints are reached with
the ``openai`` package, imported when an ``OpenAIModel`` is made.
"""

from __future__ import annotations

import hashlib
import math
from typing import Optional, Sequence

from lmstack.errors import ConfigError, UnsupportedError


class _PerItem:
    """The per-item forms the first harness used (and scripted test models still implement),
    on top of a model's batched ``generate_batch`` and ``loglikelihood_batch``."""

    def generate(self, prompt: str, max_new_tokens: int, temperature: float) -> str:
        return self.generate_batch([prompt], max_new_tokens, temperature)[0]

    def chat(self, prompt: str, max_new_tokens: int, temperature: float) -> str:
        return self.generate_batch([prompt], max_new_tokens, temperature, chat=True)[0]

    def loglikelihood(self, context: str, continuation: str) -> float:
        return self.loglikelihood_batch([(context, continuation)])[0]


def generate_texts(model, prompts: Sequence[str], max_new_tokens: int, temperature: float,
                   seeds: Optional[Sequence[Optional[int]]] = None, chat: bool = False) -> list[str]:
    """The model's ``generate_batch``, or for a model with the per-item forms only, its ``chat`` /
    ``generate`` prompt by prompt (no per-row seeds)."""
    if hasattr(model, "generate_batch"):
        return model.generate_batch(list(prompts), max_new_tokens, temperature, seeds=seeds, chat=chat)
    ask = model.chat if chat else model.generate
    return [ask(p, max_new_tokens, temperature) for p in prompts]


class LLMModel(_PerItem):
    """Adapts ``lmstack.infer.LLM`` to the harness (batched generation and scoring)."""

    def __init__(self, llm, name: Optional[str] = None, adapter: Optional[str] = None, batch_size: int = 8) -> None:
        self.llm = llm
        self.name = name or str(getattr(llm, "metadata", {}).get("source", "llm"))
        self.adapter = adapter
        self.batch_size = batch_size
        self.truncated = 0  # prompts cut from the left to fit the context
        self._identity: Optional[str] = None

    @classmethod
    def load(cls, path: str, adapter: Optional[str] = None, batch_size: int = 8, dtype=None) -> "LLMModel":
        from lmstack.infer import LLM

        llm = LLM.load(path, dtype=dtype, adapter=adapter)
        return cls(llm, name=str(path), adapter=adapter, batch_size=batch_size)

    @property
    def identity(self) -> str:
        """A digest of every weight (adapter included), so a changed checkpoint never hits the cache."""
        if self._identity is None:
            import torch

            h = hashlib.sha256()
            for k, t in sorted(self.llm.model.state_dict().items()):
                h.update(k.encode())
                h.update(str(t.dtype).encode())
                h.update(t.detach().cpu().contiguous().view(-1).view(dtype=torch.uint8).numpy().tobytes())
            self._identity = f"lmstack:{h.hexdigest()[:32]}"
        return self._identity

    def _prompt_ids(self, prompt: str, chat: bool, room: int = 0) -> list[int]:
        """Prompt ids, left-truncated (as lm-evaluation-harness does) to leave ``room`` new tokens."""
        ids = self.llm.chat_ids([{"role": "user", "content": prompt}]) if chat else self.llm.encode(prompt)
        keep = max(1, self.llm.config.block_size - max(1, room))
        if len(ids) > keep:
            self.truncated += 1
            ids = ids[-keep:]
        return ids

    def generate_batch(self, prompts: Sequence[str], max_new_tokens: int, temperature: float = 0.0,
                       seeds: Optional[Sequence[Optional[int]]] = None, chat: bool = False,
                       stop: Sequence[str] = ()) -> list[str]:
        from lmstack.infer import SamplingParams, stream_generate

        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, stop=list(stop))
        out: list[str] = []
        for s in range(0, len(prompts), self.batch_size):
            chunk = prompts[s: s + self.batch_size]
            ids = [self._prompt_ids(p, chat, max_new_tokens) for p in chunk]
            row_seeds = list(seeds[s: s + self.batch_size]) if seeds is not None else [None] * len(chunk)
            texts = [""] * len(chunk)
            for ev in stream_generate(self.llm.model, self.llm.tokenizer, ids, params, seeds=row_seeds):
                texts[ev.row] += ev.text
            out += texts
        return out

    def loglikelihood_batch(self, requests: Sequence[tuple[str, str]]) -> list[float]:
        from lmstack.eval.lm_metrics import loglikelihoods

        return [s.logprob for s in loglikelihoods(self.llm, requests, max(self.batch_size, 16))]

    def option_loglikelihoods(self, prompts: Sequence[str], options: Sequence[str],
                              chat: bool = True) -> list[list[float]]:
        """``log p(option | prompt)`` of every option as the reply to every prompt, one row per
        prompt: what a likelihood judge picks its verdict from.

        The prompt is encoded as ``generate_batch`` encodes it (with ``chat``, a user message
        and the assistant header); the option follows the assistant header as it is, and a plain
        prompt after a space (" A" after "Better response:"), as the judge would write it. An
        option of several tokens sums their log-probabilities. When every option is one token,
        one forward per prompt scores them all; otherwise each (prompt, option) row is scored
        as ``loglikelihood_batch`` scores a continuation.
        """
        import torch

        from lmstack.eval.lm_metrics import score_token_rows

        tok = self.llm.tokenizer
        prompt_ids, option_ids = [], []
        for p in prompts:
            lead = "" if chat or p[-1:].isspace() else " "
            ids = [tok.encode(lead + o, add_special_tokens=False) for o in options]
            empty = [o for o, i in zip(options, ids) if not i]
            if empty:
                raise ConfigError(f"option_loglikelihoods: options {empty} encode to no tokens")
            prompt_ids.append(self._prompt_ids(p, chat, max(len(i) for i in ids)))
            option_ids.append(ids)
        if all(len(i) == 1 for ids in option_ids for i in ids):
            out = []
            for p_ids, ids in zip(prompt_ids, option_ids):
                logp = torch.log_softmax(self.llm.logits([p_ids])[0, -1], dim=-1)  # (V,)
                out.append([float(logp[i[0]]) for i in ids])
            return out
        rows = [p_ids + i for p_ids, ids in zip(prompt_ids, option_ids) for i in ids]
        scored = score_token_rows(self.llm.model, rows, [len(i) for ids in option_ids for i in ids],
                                  max(self.batch_size, 16))
        k = len(options)
        return [[s.logprob for s in scored[j * k: (j + 1) * k]] for j in range(len(prompts))]

    def option_probs(self, prompt: str, options: Sequence[str], chat: bool = True) -> Optional[list[float]]:
        """Probability of each option as the next token, renormalised over the options; None when
        an option is not a single token."""
        import torch

        tok = self.llm.tokenizer
        opt_ids = [tok.encode(o, add_special_tokens=False) for o in options]
        if any(len(i) != 1 for i in opt_ids):
            return None
        ids = self._prompt_ids(prompt, chat, 1)
        logits = self.llm.logits([ids])[0, -1]  # (V,)
        p = torch.softmax(logits[[i[0] for i in opt_ids]], dim=-1)
        return p.tolist()


class OpenAIModel(_PerItem):
    """An OpenAI-compatible endpoint (``base_url``, ``api_key``, ``model``) through the ``openai``
    package. Log-likelihoods need the legacy completions API with ``echo`` and ``logprobs``;
    endpoints without it raise ``UnsupportedError``."""

    def __init__(self, model: str, base_url: Optional[str] = None, api_key: Optional[str] = None,
                 http_client=None, max_retries: int = 2) -> None:
        try:
            import openai
        except ImportError:
            raise UnsupportedError("an OpenAI-compatible endpoint needs the openai package: "
                                   "pip install openai") from None
        kw = {"http_client": http_client} if http_client is not None else {}
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "none", max_retries=max_retries, **kw)
        self.model = model
        self.name = f"{base_url or 'openai'}#{model}"
        self.identity = f"openai:{base_url}:{model}"

    def generate_batch(self, prompts: Sequence[str], max_new_tokens: int, temperature: float = 0.0,
                       seeds: Optional[Sequence[Optional[int]]] = None, chat: bool = False,
                       stop: Sequence[str] = ()) -> list[str]:
        out = []
        for i, p in enumerate(prompts):
            kw = dict(model=self.model, max_tokens=max_new_tokens, temperature=temperature,
                      seed=seeds[i] if seeds is not None else None, stop=list(stop) or None)
            if chat:
                r = self.client.chat.completions.create(messages=[{"role": "user", "content": p}], **kw)
                out.append(r.choices[0].message.content or "")
            else:
                r = self.client.completions.create(prompt=p, **kw)
                out.append(r.choices[0].text)
        return out

    def loglikelihood_batch(self, requests: Sequence[tuple[str, str]]) -> list[float]:
        out = []
        for ctx, cont in requests:
            r = self.client.completions.create(model=self.model, prompt=ctx + cont, max_tokens=0, echo=True,
                                               logprobs=1, temperature=0.0)
            lp = getattr(r.choices[0], "logprobs", None)
            if lp is None or not getattr(lp, "text_offset", None):
                raise UnsupportedError(f"endpoint {self.name} returns no echoed prompt logprobs; multiple-choice "
                                       "tasks need a completions endpoint with echo=True and logprobs")
            total = sum(v for off, v in zip(lp.text_offset, lp.token_logprobs) if off >= len(ctx) and v is not None)
            out.append(float(total))
        return out

    def option_probs(self, prompt: str, options: Sequence[str], chat: bool = True) -> Optional[list[float]]:
        r = self.client.chat.completions.create(model=self.model, messages=[{"role": "user", "content": prompt}],
                                                max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=20)
        lp = getattr(r.choices[0], "logprobs", None)
        if lp is None or not lp.content:
            return None
        top = {t.token.strip(): math.exp(t.logprob) for t in lp.content[0].top_logprobs}
        p = [top.get(o, 0.0) for o in options]
        z = sum(p)
        return [x / z for x in p] if z > 0 else None


def load_model(model: Optional[str] = None, adapter: Optional[str] = None, base_url: Optional[str] = None,
               api_key: Optional[str] = None, batch_size: int = 8):
    """A local model (path or preset, optional adapter folder) or, with ``base_url``, an endpoint."""
    if base_url:
        if adapter:
            raise ConfigError("--adapter applies to local models only, not to an endpoint (--base-url)")
        if not model:
            raise ConfigError("an endpoint needs --model NAME (the model name the endpoint serves)")
        return OpenAIModel(model, base_url, api_key)
    if not model:
        from lmstack.infer.llm import default_model_path

        model = str(default_model_path())
    return LLMModel.load(model, adapter, batch_size)
