"""``Tokenizer``: one tokenizer object for every model lmstack loads.

A thin layer over the Hugging Face ``tokenizers`` library (``tok.hf``): the ``tokenizers``
object does the encoding and decoding; this class adds what a model folder or GGUF file says
around it (BOS/EOS/PAD tokens, whether the model wants BOS, the chat template, the stop
tokens) and saves it back in a form ``transformers.AutoTokenizer`` also loads.

Sources, by what ``Tokenizer.load(path)`` is given:

* a ``tokenizer.json`` file, or a model folder containing one (plus, when present,
  ``tokenizer_config.json``, ``special_tokens_map.json``, ``chat_template.jinja`` and
  ``generation_config.json`` for extra end-of-sequence ids);
* a ``.gguf`` file, full model or tokenizer-only (see ``gguf_vocab``).

Deliberately left out: SentencePiece ``.model`` files (convert them to tokenizer.json with
transformers first), slow Python tokenizers, and pair-of-sequences encoding.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from lmstack.files import atomic_write_text
from lmstack.errors import LMStackError
from lmstack.tokenizer.chat import DEFAULT_CHATML_TEMPLATE, render_chat
from lmstack.tokenizer.stream import IncrementalDecoder

SUPPORTED_SOURCES = "a tokenizer.json file, a model folder containing tokenizer.json, or a .gguf file"

# End-of-turn tokens of common chat formats; each one present in the vocabulary stops generation.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>", "<|end|>",
                      "<end_of_turn>", "<turn|>", "<|end_of_text|>", "<｜end▁of▁sentence｜>")


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LMStackError(f"{path}: not readable JSON ({type(e).__name__}: {e})") from None


class Tokenizer:
    """Encode/decode text, render chats, stream detokenisation; see the module docstring."""

    def __init__(self, hf: Any, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, unk_token: str | None = None,
                 chat_template: str | None = None, add_bos_token: bool | None = None,
                 add_eos_token: bool | None = None, extra_stop_token_ids: Iterable[int] = ()) -> None:
        self.hf = hf
        self.bos_token = bos_token if bos_token is not None and hf.token_to_id(bos_token) is not None else None
        self.eos_token = eos_token if eos_token is not None and hf.token_to_id(eos_token) is not None else None
        self.pad_token = pad_token if pad_token is not None and hf.token_to_id(pad_token) is not None else None
        self.unk_token = unk_token if unk_token is not None and hf.token_to_id(unk_token) is not None else None
        self._own_template = chat_template or None
        self._extra_stop = {int(i) for i in extra_stop_token_ids}
        if add_bos_token and self.bos_token is not None and not self._post_processor_adds_bos():
            self._install_bos_processor()
        self.add_bos_token = self._post_processor_adds_bos()
        self.add_eos_token = bool(add_eos_token)

    # --- loading -------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load from a tokenizer.json file, a model folder, or a .gguf file."""
        p = Path(path)
        if not p.exists():
            raise LMStackError(f"tokenizer not found: {p} does not exist (expected {SUPPORTED_SOURCES})")
        if p.is_dir():
            if (p / "tokenizer.json").is_file():
                return cls._from_folder(p, p / "tokenizer.json")
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) == 1:
                return cls.from_gguf(ggufs[0])
            found = sorted(x.name for x in p.iterdir())[:8]
            hint = " (a SentencePiece tokenizer.model is not supported: convert it to tokenizer.json)" \
                if (p / "tokenizer.model").exists() else ""
            raise LMStackError(
                f"{p}: folder has no tokenizer.json{hint}; found {found or 'nothing'}"
                f"{' and more' if len(list(p.iterdir())) > 8 else ''}; expected {SUPPORTED_SOURCES}"
            )
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return cls.from_gguf(p)
        if p.suffix == ".json":
            return cls._from_folder(p.parent, p, with_config=p.name == "tokenizer.json")
        raise LMStackError(f"{p}: unrecognised tokenizer file (suffix {p.suffix!r}, first bytes "
                           f"{magic!r}); expected {SUPPORTED_SOURCES}")

    @classmethod
    def _from_folder(cls, folder: Path, tokenizer_json: Path, with_config: bool = True) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        data = _read_json(tokenizer_json)
        if not isinstance(data, dict) or not isinstance(data.get("model"), dict) or "type" not in data["model"]:
            keys = sorted(data)[:6] if isinstance(data, dict) else type(data).__name__
            raise LMStackError(f"{tokenizer_json}: not a Hugging Face tokenizers file (found {keys}, "
                               "expected a 'model' object with a 'type'); expected " + SUPPORTED_SOURCES)
        try:
            hf = HFTokenizer.from_str(json.dumps(data))
        except Exception as e:  # tokenizers raises a bare Exception on schema errors
            raise LMStackError(f"{tokenizer_json}: tokenizers could not load it ({e})") from None

        config: dict[str, Any] = {}
        if with_config:
            for name in ("special_tokens_map.json", "tokenizer_config.json"):
                if (folder / name).is_file():
                    loaded = _read_json(folder / name)
                    if isinstance(loaded, dict):
                        config.update(loaded)
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if with_config and (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")

        extra_stop: set[int] = set()
        if with_config and (folder / "generation_config.json").is_file():
            eos = _read_json(folder / "generation_config.json").get("eos_token_id")
            extra_stop.update([eos] if isinstance(eos, int) else [i for i in eos or [] if isinstance(i, int)])

        add_bos = config.get("add_bos_token")
        return cls(hf, bos_token=_token_content(config.get("bos_token")),
                   eos_token=_token_content(config.get("eos_token")),
                   pad_token=_token_content(config.get("pad_token")),
                   unk_token=_token_content(config.get("unk_token")),
                   chat_template=template if isinstance(template, str) else None,
                   add_bos_token=add_bos if isinstance(add_bos, bool) else None,
                   add_eos_token=config.get("add_eos_token") is True,
                   extra_stop_token_ids=extra_stop)

    @classmethod
    def from_gguf(cls, reader_or_path: Any) -> "Tokenizer":
        """Build from a GGUF file's tokenizer metadata (a ``gguf.GGUFReader`` or a path)."""
        import gguf

        from lmstack.tokenizer.gguf_vocab import build_hf_tokenizer, read_vocab

        if isinstance(reader_or_path, gguf.GGUFReader):
            data = getattr(reader_or_path, "data", None)
            where = str(getattr(data, "filename", None) or "GGUF file")
        elif isinstance(reader_or_path, (str, os.PathLike)):
            where = os.fspath(reader_or_path)
        else:
            raise LMStackError(f"from_gguf: got {type(reader_or_path).__name__}, expected a path to a "
                               ".gguf file or a gguf.GGUFReader")
        vocab = read_vocab(reader_or_path, where)
        hf = build_hf_tokenizer(vocab, where)

        def name(i: int | None) -> str | None:
            return vocab.tokens[i] if i is not None and 0 <= i < len(vocab.tokens) else None

        extra = {vocab.eot_token_id} if vocab.eot_token_id is not None else set()
        return cls(hf, bos_token=name(vocab.bos_token_id), eos_token=name(vocab.eos_token_id),
                   pad_token=name(vocab.pad_token_id), unk_token=name(vocab.unk_token_id),
                   chat_template=vocab.chat_template, add_bos_token=None,
                   add_eos_token=vocab.add_eos_token, extra_stop_token_ids=extra)

    def _post_processor_adds_bos(self) -> bool:
        if self.bos_token_id is None:
            return False
        ids = self.hf.encode("a", add_special_tokens=True).ids
        return bool(ids) and ids[0] == self.bos_token_id

    def _install_bos_processor(self) -> None:
        """The model wants BOS but tokenizer.json's post-processor does not add it."""
        from tokenizers import processors

        bos = self.bos_token
        template = processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                                 special_tokens=[(bos, self.bos_token_id)])
        current = self.hf.post_processor
        self.hf.post_processor = template if current is None else processors.Sequence([current, template])

    # --- vocabulary ----------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
                f"add_bos_token={self.add_bos_token})")

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.hf.id_to_token(int(token_id))

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.hf.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.hf.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self.hf.token_to_id(self.pad_token)

    @property
    def unk_token_id(self) -> int | None:
        return None if self.unk_token is None else self.hf.token_to_id(self.unk_token)

    @property
    def special_tokens(self) -> dict[str, int]:
        """Every special added token, content -> id."""
        return {t.content: i for i, t in self.hf.get_added_tokens_decoder().items() if t.special}

    @property
    def stop_token_ids(self) -> set[int]:
        """EOS plus the chat end-of-turn tokens this vocabulary has."""
        stops = set(self._extra_stop)
        if self.eos_token_id is not None:
            stops.add(self.eos_token_id)
        for t in END_OF_TURN_TOKENS:
            i = self.hf.token_to_id(t)
            if i is not None:
                stops.add(i)
        return stops

    # --- encode / decode -----------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` adds BOS only if the model wants it."""
        if not isinstance(text, str):
            raise LMStackError(f"encode: got {type(text).__name__}, expected a string")
        return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise LMStackError(f"encode_batch: item {i} is {type(t).__name__}, expected a string")
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def _check_ids(self, ids: Any) -> list[int]:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        ids = list(ids)
        n = self.vocab_size
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
                raise LMStackError(f"decode: token id {i!r} is not an integer in [0, {n})")
        return ids

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (a list, tuple, numpy array or tensor of ints)."""
        ids = self._check_ids(ids)
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens) if ids else ""

    def decoder(self, skip_special_tokens: bool = False) -> IncrementalDecoder:
        """A streaming detokeniser: ``push(id) -> delta``, ``flush() -> rest``."""
        return IncrementalDecoder(self.hf, skip_special_tokens=skip_special_tokens)

    # --- chat ----------------------------------------------------------------------------

    @property
    def chat_template(self) -> str:
        """The model's own chat template, or ChatML when it has none."""
        return self._own_template or DEFAULT_CHATML_TEMPLATE

    @chat_template.setter
    def chat_template(self, template: str | None) -> None:
        self._own_template = template or None

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None, **kwargs: Any) -> str:
        """Render a conversation into the prompt string the model expects."""
        variables = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or "",
                     "pad_token": self.pad_token or "", "unk_token": self.unk_token or ""}
        variables.update(kwargs)
        return render_chat(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                           tools=tools, **variables)

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None, **kwargs: Any) -> list[int]:
        """Render then encode; special tokens written by the template count as special, and
        nothing is added on top (the template writes BOS itself when the model wants it)."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                        tools=tools, **kwargs)
        return self.hf.encode(text, add_special_tokens=False).ids

    # --- saving --------------------------------------------------------------------------

    def save(self, folder: str | os.PathLike) -> Path:
        """Write tokenizer.json and tokenizer_config.json into ``folder`` (atomically each)."""
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise LMStackError(f"save: {folder} exists and is not a folder")
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token, "eos_token": self.eos_token,
            "pad_token": self.pad_token, "unk_token": self.unk_token,
            "add_bos_token": self.add_bos_token, "add_eos_token": self.add_eos_token,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
        }
        if self._own_template is not None:
            config["chat_template"] = self._own_template
        atomic_write_text(folder / "tokenizer.json", self.hf.to_str(pretty=False))
        atomic_write_text(folder / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        return folder
