"""Rerankers: reorder the hits of a first-stage retrieval by a finer, slower score.

One interface, ``rerank(query, hits, top_n) -> hits``: the same hits in a new order, cut to
``top_n``, each with ``scores["rerank"]`` set and ``score`` equal to it. ``RERANKERS`` maps a
name to a factory ``(arg, llm) -> Reranker``; ``get_reranker("cross-encoder:DIR")`` splits a
spec at the first colon.

- ``cross-encoder``: the query and a passage read together by a BERT encoder whose [CLS]
  state goes through a pooler and a one-logit classifier (Nogueira & Cho 2019, "Passage
  Re-ranking with BERT"). The backbone is the in-stack all-MiniLM-L6-v2
  (``lmstack.model.encoder``); its checkpoint carries the pooler, the classifier is new, so
  the head is trained here (``train_cross_encoder``) and the result saved as a Hugging Face
  ``BertForSequenceClassification`` folder with one label, the layout of the
  sentence-transformers cross-encoders (``Encoder.load`` and ``transformers`` both read it).
- ``llm``: the local LLM as a likelihood judge: ``score = log p("Yes") - log p("No")`` as its
  reply to "Question ... Passage ... Is the passage relevant to the question?", through
  ``lmstack.eval.judges.choose`` (whose verdict margin is that difference, signed).
- ``none``: keeps the first-stage order.

Training data comes from the corpus itself, with no LLM and no labels:

- the inverse cloze task (Lee et al. 2019, "Latent Retrieval for Weakly Supervised Open
  Domain Question Answering", sec. 4): a sentence drawn from a chunk is the query and the
  chunk without that sentence the positive (always removed here; the paper keeps it in 10% of
  the pairs so the model also learns word matching, which BM25 candidates already provide);
- a heading query: the document title and the chunk's section heading, the chunk whole as
  the positive;
- hard negatives: the query's top BM25 hits (``store.search_lexical``) that are not the
  positive: chunks of the same document whose span overlaps the positive's are left out (and,
  for a heading query, the rest of the same section), as is any chunk containing the query
  sentence verbatim (a duplicated passage would be a false negative).

The loss is listwise over one positive and its negatives (softmax cross-entropy, the
"localized contrastive estimation" of Gao et al. 2021, "Rethink Training of BERT Rerankers in
Multi-Stage Retrieval Pipelines", eq. 2) or pointwise binary cross-entropy; AdamW with a small
learning rate for the backbone and a larger one for the new head, linear warm-up and decay,
batches of similar length. Held-out documents give the ICT MRR of the positive among its
negatives before and after training (``train.json``).

Deliberately left out: distillation from a larger teacher, negatives mined with the reranker
itself, LLM-written queries, listwise LLM reranking (RankGPT-style permutation prompts),
mixed precision, and multi-process training.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from lmstack.errors import ConfigError, LMStackError
from lmstack.rag.types import ChunkRecord, Hit, Store


class Reranker(Protocol):
    name: str

    def rerank(self, query: str, hits: list[Hit], top_n: int) -> list[Hit]: ...


def reorder(hits: Sequence[Hit], scores: Sequence[float], top_n: int) -> list[Hit]:
    """New hits sorted by ``scores`` (best first, ties keep the input order), cut to ``top_n``,
    with ``scores["rerank"]`` and ``score`` set; the input hits are left unchanged."""
    _check_top_n(top_n)
    if len(scores) != len(hits):
        raise LMStackError(f"rerank: {len(scores)} scores for {len(hits)} hits")
    order = sorted(range(len(hits)), key=lambda i: -scores[i])[:top_n]
    return [Hit(hits[i].chunk, float(scores[i]), {**hits[i].scores, "rerank": float(scores[i])}) for i in order]


def _check_top_n(top_n: int) -> None:
    if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1:
        raise ConfigError(f"rerank: top_n={top_n!r}; expected a positive integer")


# -- none ------------------------------------------------------------------------------------

class NoReranker:
    """Keeps the first-stage order and scores."""

    name = "none"

    def rerank(self, query: str, hits: list[Hit], top_n: int) -> list[Hit]:
        _check_top_n(top_n)
        return [Hit(h.chunk, h.score, dict(h.scores)) for h in hits[:top_n]]


# -- cross-encoder ---------------------------------------------------------------------------

class CrossEncoderReranker:
    """A BERT cross-encoder with one output logit: ``score(query, passages)`` and ``rerank``."""

    name = "cross-encoder"

    def __init__(self, encoder, batch_size: int = 32) -> None:
        if encoder.cfg.num_labels != 1:
            raise LMStackError(f"cross-encoder: expected a classifier with 1 label, this encoder has "
                               f"{encoder.cfg.num_labels} (train one with `lmstack rag train-reranker`)")
        self.encoder = encoder
        self.batch_size = batch_size

    @classmethod
    def load(cls, folder, batch_size: int = 32) -> CrossEncoderReranker:
        """A folder written by ``train_cross_encoder`` (or any one-label BERT cross-encoder)."""
        from lmstack.model.encoder import Encoder

        path = Path(folder)
        if not (path / "config.json").is_file():
            raise LMStackError(f"cross-encoder: {path} is not a reranker folder (no config.json); train one "
                               "with `lmstack rag train-reranker` and pass cross-encoder:DIR")
        return cls(Encoder.load(path), batch_size)

    @classmethod
    def untrained(cls, base=None, seed: int = 0, batch_size: int = 32) -> CrossEncoderReranker:
        """The backbone (a BERT folder, an ``Encoder``, or None for all-MiniLM-L6-v2) with a fresh
        classifier (BERT's initialisation: N(0, 0.02) weights, zero bias, seeded); its pooler
        comes from the checkpoint when it has one."""
        return cls(_with_head(base, seed), batch_size)

    def score(self, query: str, passages: Sequence[str]) -> list[float]:
        """One logit per passage; pairs are scored longest first so a batch pads little."""
        order = sorted(range(len(passages)), key=lambda i: -len(passages[i]))
        logits = self.encoder.classify([(query, passages[i]) for i in order], self.batch_size)[:, 0]
        out = [0.0] * len(passages)
        for j, i in enumerate(order):
            out[i] = float(logits[j])
        return out

    def rerank(self, query: str, hits: list[Hit], top_n: int) -> list[Hit]:
        _check_top_n(top_n)
        return reorder(hits, self.score(query, [h.chunk.text for h in hits]), top_n)

    def save(self, folder) -> Path:
        """``config.json`` (BertForSequenceClassification, 1 label), ``model.safetensors`` under
        Hugging Face names, ``tokenizer.json`` and the max sequence length."""
        from safetensors.torch import save_file

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        cfg = self.encoder.cfg
        save_file(_to_hf_state_dict(self.encoder.model), str(out / "model.safetensors"))
        (out / "config.json").write_text(json.dumps(_hf_config(cfg), indent=2) + "\n")
        (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": cfg.max_seq_length}) + "\n")
        self.encoder.tokenizer.save(str(out / "tokenizer.json"))
        return out


def _with_head(base, seed: int):
    """An ``Encoder`` whose network has a one-logit classifier head."""
    import torch
    from tokenizers import Tokenizer

    from lmstack.model.encoder import Encoder, EncoderModel, convert_hf_state_dict

    if base is None or isinstance(base, (str, Path)):
        from safetensors.torch import load_file

        from lmstack.model.encoder import default_encoder_path

        folder = Path(base) if base is not None else default_encoder_path()
        enc = Encoder.load(folder)
        raw = load_file(str(folder / "model.safetensors"))
    else:
        enc, raw = base, None
    cfg = dataclasses.replace(enc.cfg, num_labels=1)
    model = EncoderModel(cfg)
    sd = {k: v for k, v in enc.model.state_dict().items() if not k.startswith("classifier")}
    if raw is not None:  # the checkpoint's pooler, which Encoder.load drops without a head
        sd.update({k: v for k, v in convert_hf_state_dict(raw, cfg).items() if k.startswith("pooler")})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.classifier.weight.copy_(torch.randn(model.classifier.weight.shape, generator=g) * 0.02)
        model.classifier.bias.zero_()
        if not any(k.startswith("pooler") for k in sd):
            model.pooler.weight.copy_(torch.randn(model.pooler.weight.shape, generator=g) * 0.02)
            model.pooler.bias.zero_()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or any(not k.startswith(("classifier", "pooler")) for k in missing):
        raise LMStackError(f"cross-encoder: backbone weights do not fit: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    model.to(enc.model.wte.weight.dtype)
    tok = Tokenizer.from_str(enc.tokenizer.to_str())  # its own copy: training changes the truncation
    return Encoder(model, tok, cfg)


def _to_hf_state_dict(model) -> dict:
    """Our encoder keys -> ``BertForSequenceClassification`` keys (the inverse of
    ``convert_hf_state_dict``), so the folder loads in ``transformers`` as well."""
    from lmstack.model.encoder import _HF_KEYS, _HF_LAYER_KEYS

    top = {ours: hf for hf, ours in _HF_KEYS.items()}
    layer = {ours: hf for hf, ours in _HF_LAYER_KEYS.items()}
    out = {}
    for k, t in model.state_dict().items():
        if k in top:
            name = top[k] if k.startswith("classifier") else f"bert.{top[k]}"
        else:
            _, i, sub, param = k.split(".")  # blocks.{i}.{sub}.{param}
            name = f"bert.encoder.layer.{i}.{layer[sub]}.{param}"
        out[name] = t.detach().contiguous().clone()
    return out


def _hf_config(cfg) -> dict[str, Any]:
    """A Hugging Face ``config.json`` for an ``EncoderConfig`` with a classifier head."""
    act = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}[cfg.activation]
    labels = {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)}
    return {
        "architectures": ["BertForSequenceClassification"], "model_type": "bert",
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.block_size,
        "type_vocab_size": cfg.type_vocab_size, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.intermediate_size, "layer_norm_eps": cfg.norm_eps,
        "pad_token_id": cfg.pad_token_id, "hidden_act": act, "position_embedding_type": "absolute",
        "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
        "id2label": labels, "label2id": {v: int(k) for k, v in labels.items()},
    }


# -- LLM judge -------------------------------------------------------------------------------

# The question first and "relevant" rather than "answers": on six hand-made (question, relevant,
# unrelated) triples SmolLM2-135M-Instruct ranked all six right as a chat turn with this form,
# and three of six with "Passage ... Question ... Does the passage answer the question? Answer:".
LLM_RERANK_PROMPT = (
    "Question: {question}\n\n"
    "Passage: {passage}\n\n"
    "Is the passage relevant to the question? Answer Yes or No.")
# the two replies compared; each is one token for SmolLM2, so one forward scores both
LLM_RERANK_OPTIONS: dict[str, object] = {"Yes": True, "No": False}


class LLMReranker:
    """``score = log p("Yes") - log p("No")`` as the LLM's reply (a chat turn when ``chat``)."""

    name = "llm"

    def __init__(self, llm, chat: bool = True, prompt: str = LLM_RERANK_PROMPT, batch_size: int = 8) -> None:
        from lmstack.eval.models import LLMModel

        self.judge = LLMModel(llm, batch_size=batch_size)
        self.chat = chat
        self.prompt = prompt

    def score(self, query: str, passages: Sequence[str]) -> list[float]:
        from lmstack.eval.judges import choose

        prompts = [self.prompt.format(passage=p, question=query) for p in passages]
        # the verdict's margin is |log p(Yes) - log p(No)|; its value gives the sign
        return [c.margin if c.value else -c.margin for c in choose(self.judge, prompts, LLM_RERANK_OPTIONS, self.chat)]

    def rerank(self, query: str, hits: list[Hit], top_n: int) -> list[Hit]:
        _check_top_n(top_n)
        return reorder(hits, self.score(query, [h.chunk.text for h in hits]), top_n)


# -- registry --------------------------------------------------------------------------------

class SentenceReranker:
    """Each chunk scored by its best-matching sentence window: ``max_w cos(E(q), E(w))`` over
    windows of ``window`` consecutive sentences of the chunk, embedded by the store's own
    embedder (no training). A chunk embedding averages everything the chunk says, so a passage
    holding the one sentence that answers among several others ranks lower than it should;
    scoring the sentences separately is the sentence-window retrieval idea (as in LlamaIndex's
    ``SentenceWindowNodeParser``), applied to the candidates only. Window embeddings are cached
    by text, so a chunk seen by an earlier query costs nothing."""

    name = "sentence"

    def __init__(self, embedder, window: int = 2, max_cache: int = 200_000) -> None:
        if embedder is None:
            raise ConfigError("reranker 'sentence' needs an embedder (RAG passes the store's)")
        self.embedder, self.window, self.max_cache = embedder, window, max_cache
        self._cache: dict[str, Any] = {}

    def _windows(self, text: str) -> list[str]:
        sents = [text[a:b] for a, b in sentence_spans(text)] or [text]
        w = min(self.window, len(sents))
        return [" ".join(sents[i:i + w]) for i in range(len(sents) - w + 1)]

    def score(self, query: str, passages: Sequence[str]) -> list[float]:
        import numpy as np

        windows = [self._windows(p) for p in passages]
        todo = list(dict.fromkeys(w for ws in windows for w in ws if w not in self._cache))
        if todo:
            if len(self._cache) + len(todo) > self.max_cache:
                self._cache.clear()
            for w, v in zip(todo, self.embedder.embed(todo)):
                self._cache[w] = v
        q = np.asarray(self.embedder.embed_query(query), dtype=np.float32)
        return [max(float(np.dot(self._cache[w], q)) for w in ws) for ws in windows]

    def rerank(self, query: str, hits: list[Hit], top_n: int) -> list[Hit]:
        _check_top_n(top_n)
        return reorder(hits, self.score(query, [h.chunk.text for h in hits]), top_n)


def _cross_encoder(arg: str | None, llm=None, embedder=None) -> CrossEncoderReranker:
    if not arg:
        raise ConfigError("reranker 'cross-encoder' needs a trained folder: run `lmstack rag train-reranker` "
                          "and pass cross-encoder:DIR with the folder it writes")
    return CrossEncoderReranker.load(arg)


def _llm(arg: str | None, llm=None, embedder=None) -> LLMReranker:
    if llm is None:
        from lmstack.infer import LLM

        llm = LLM.load(arg or None)
    return LLMReranker(llm)


def _none(arg: str | None, llm=None, embedder=None) -> NoReranker:
    return NoReranker()


def _sentence(arg: str | None, llm=None, embedder=None) -> SentenceReranker:
    if arg and (not arg.isdigit() or int(arg) < 1):
        raise ConfigError(f"reranker 'sentence:{arg}': expected a window of sentences >= 1 (sentence:2)")
    return SentenceReranker(embedder, window=int(arg) if arg else 2)


RERANKERS: dict[str, Callable[..., Reranker]] = {
    "cross-encoder": _cross_encoder,
    "llm": _llm,
    "sentence": _sentence,
    "none": _none,
}


def get_reranker(spec: str, llm=None, embedder=None) -> Reranker:
    """``"none"``, ``"cross-encoder:DIR"``, ``"llm"`` (the given ``llm``, else the default model),
    ``"llm:MODEL"``, or ``"sentence[:WINDOW]"`` (over ``embedder``)."""
    name, _, arg = (spec or "none").partition(":")
    if name not in RERANKERS:
        raise ConfigError(f"reranker {spec!r}: unknown name {name!r}; expected one of {', '.join(RERANKERS)}")
    return RERANKERS[name](arg or None, llm, embedder)


# -- training data: inverse cloze task and heading queries -----------------------------------

@dataclass
class Example:
    """One training query with its positive passage and hard negatives."""

    query: str
    positive: str
    negatives: list[str]
    kind: str  # "ict" or "heading"
    doc_key: str
    span: tuple[int, int]  # the positive chunk's span in its document


_SENT_BREAK = re.compile(r"(?<=[.!?])\s+|\n+")


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """``[start, end)`` of each sentence: breaks after . ! ? followed by space, and at newlines."""
    spans, start = [], 0
    for m in list(_SENT_BREAK.finditer(text)) + [None]:
        end = m.start() if m else len(text)
        piece = text[start:end]
        if piece.strip():
            lead = len(piece) - len(piece.lstrip())
            spans.append((start + lead, start + len(piece.rstrip())))
        if m:
            start = m.end()
    return spans


def ict_pair(text: str, rng: random.Random, min_words: int = 5, max_words: int = 64,
             min_sentences: int = 3) -> tuple[str, str] | None:
    """(query sentence, passage without it) from one chunk, or None when the chunk has fewer
    than ``min_sentences`` sentences or none of a usable length."""
    spans = sentence_spans(text)
    if len(spans) < min_sentences:
        return None
    usable = [s for s in spans if min_words <= len(text[s[0]:s[1]].split()) <= max_words]
    if not usable:
        return None
    s, e = rng.choice(usable)
    rest = (text[:s].rstrip() + " " + text[e:].lstrip()).strip()
    return text[s:e], rest


def heading_query(chunk: ChunkRecord) -> str | None:
    """The document title and the chunk's section heading, or None without a title."""
    title = str(chunk.meta.get("title") or "").strip()
    section = str(chunk.meta.get("section") or "").strip()
    if not title:
        return None
    return title if not section or section.lower() == title.lower() else f"{title} {section}"


def _is_positive(c: ChunkRecord, pos: ChunkRecord, query: str, kind: str) -> bool:
    if c.doc_key == pos.doc_key:
        if c.start < pos.end and pos.start < c.end:
            return True
        if kind == "heading" and c.meta.get("section") == pos.meta.get("section"):
            return True
    return kind == "ict" and query in c.text


def hard_negatives(store: Store, query: str, positive: ChunkRecord, n: int, kind: str = "ict") -> list[ChunkRecord]:
    """The query's top BM25 chunks that are not the positive (nor overlap it, nor contain the
    query sentence; for a heading query, nor share its document section), best first."""
    hits = store.search_lexical(query, 3 * n + 10)
    chunks = store.get_chunks([cid for cid, _ in hits])
    return [c for c in chunks if not _is_positive(c, positive, query, kind)][:n]


def build_examples(store: Store, n_queries: int, negatives: int, seed: int = 0, heading_share: float = 0.25,
                   doc_keys: Sequence[str] | None = None) -> list[Example]:
    """Up to ``n_queries`` examples over ``doc_keys`` (default: every document), one chunk per
    document per round, each with exactly ``negatives`` hard negatives (queries with fewer are
    dropped). A share ``heading_share`` of them are heading queries."""
    rng = random.Random(seed)
    keys = sorted(doc_keys if doc_keys is not None else store.documents())
    rng.shuffle(keys)
    pools = {k: rng.sample(chunks, len(chunks)) for k in keys if (chunks := store.doc_chunks(k))}
    out: list[Example] = []
    while pools and len(out) < n_queries:
        for k in list(pools):
            if len(out) >= n_queries:
                break
            if not pools[k]:
                del pools[k]
                continue
            chunk = pools[k].pop()
            q = heading_query(chunk) if rng.random() < heading_share else None
            if q is not None:
                kind, positive = "heading", chunk.text
            else:
                pair = ict_pair(chunk.text, rng)
                if pair is None:
                    continue
                kind, (q, positive) = "ict", pair
            negs = hard_negatives(store, q, chunk, negatives, kind)
            if len(negs) == negatives:
                out.append(Example(q, positive, [c.text for c in negs], kind, chunk.doc_key,
                                   (chunk.start, chunk.end)))
    return out


def split_documents(keys: Sequence[str], held_out: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train keys, held-out keys): whole documents, so no held-out passage was trained on."""
    keys = sorted(keys)
    random.Random(seed).shuffle(keys)
    n = max(1, round(held_out * len(keys))) if held_out > 0 else 0
    return keys[n:], keys[:n]


def mrr(reranker, examples: Sequence[Example]) -> float:
    """Mean reciprocal rank of each positive among its negatives (ties count against it)."""
    if not examples:
        return float("nan")
    total = 0.0
    for ex in examples:
        s = reranker.score(ex.query, [ex.positive] + ex.negatives)
        total += 1.0 / (1 + sum(x >= s[0] for x in s[1:]))
    return total / len(examples)


# -- losses ----------------------------------------------------------------------------------

def listwise_loss(scores):
    """Localized contrastive estimation (Gao et al. 2021, eq. 2): ``-log softmax(s)_0`` over each
    group's scores (B, 1 + n), the positive in column 0."""
    import torch
    import torch.nn.functional as F

    return F.cross_entropy(scores, torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device))


def pointwise_bce_loss(scores):
    """Binary cross-entropy per pair (Nogueira & Cho 2019): label 1 for column 0, 0 elsewhere."""
    import torch
    import torch.nn.functional as F

    labels = torch.zeros_like(scores)
    labels[:, 0] = 1.0
    return F.binary_cross_entropy_with_logits(scores, labels)


LOSSES: dict[str, Callable] = {"listwise": listwise_loss, "bce": pointwise_bce_loss}


# -- training --------------------------------------------------------------------------------

def _group_logits(encoder, examples: Sequence[Example]):
    """(B, 1 + n) logits of each example's positive and negatives, with gradients."""
    pairs = [(ex.query, p) for ex in examples for p in [ex.positive] + ex.negatives]
    ids, mask, types, _ = encoder._batch(pairs)
    logits = encoder.model.classify(encoder.model(ids, mask, types))[:, 0]  # (B * (1 + n),)
    return logits.float().view(len(examples), -1)


def train_cross_encoder(store: Store, out_dir, n_queries: int = 1000, negatives: int = 7, steps: int = 300,
                        seed: int = 0, lr: float = 3e-5, head_lr: float = 1e-3, batch_queries: int = 4, max_length: int = 192,
                        loss: str = "listwise", held_out: float = 0.1, heading_share: float = 0.25,
                        warmup: float = 0.1, base=None, progress: bool = True) -> dict[str, Any]:
    """Train a cross-encoder on ICT and heading queries over ``store`` and save it to ``out_dir``.

    ``base``: the backbone (None: all-MiniLM-L6-v2, a BERT folder, or an ``Encoder``); ``lr``
    is its learning rate, ``head_lr`` the pooler's and classifier's. Returns
    what ``train.json`` records: the settings, the loss curve's ends, the held-out MRR before
    and after training.
    """
    import torch

    if loss not in LOSSES:
        raise ConfigError(f"train-reranker: loss {loss!r}; expected one of {', '.join(LOSSES)}")
    for name, value in (("n_queries", n_queries), ("negatives", negatives), ("steps", steps),
                        ("batch_queries", batch_queries), ("max_length", max_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"train-reranker: {name}={value!r}; expected a positive integer")
    if not 0 <= held_out < 1:
        raise ConfigError(f"train-reranker: held_out={held_out!r}; expected a share in [0, 1)")
    settings = {"n_queries": n_queries, "negatives": negatives, "steps": steps, "seed": seed, "lr": lr,
                "head_lr": head_lr,
                "batch_queries": batch_queries, "max_length": max_length, "loss": loss, "held_out": held_out,
                "heading_share": heading_share, "warmup": warmup,
                "base": str(base) if base is None or isinstance(base, (str, Path)) else "encoder",
                "store": getattr(store, "uri", None)}
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    train_keys, eval_keys = split_documents(list(store.documents()), held_out, seed)
    n_eval = max(1, round(held_out * n_queries)) if eval_keys else 0
    train = build_examples(store, n_queries - n_eval, negatives, seed, heading_share, train_keys)
    evals = build_examples(store, n_eval, negatives, seed + 1, heading_share, eval_keys) if n_eval else []
    if not train:
        raise LMStackError(f"train-reranker: no training queries with {negatives} hard negatives could be made "
                           f"from {len(train_keys)} documents; ingest more text or lower negatives")

    reranker = CrossEncoderReranker.untrained(base, seed)
    enc = reranker.encoder
    enc.cfg.max_seq_length = min(max_length, enc.cfg.block_size)
    enc.tokenizer.enable_truncation(max_length=enc.cfg.max_seq_length)
    mrr_before = mrr(reranker, evals)

    # batches of similar length, in a seeded random order, cycled for as many steps as asked
    by_len = sorted(train, key=lambda ex: len(ex.query) + len(ex.positive) + sum(map(len, ex.negatives)))
    batches = [by_len[i:i + batch_queries] for i in range(0, len(by_len), batch_queries)]
    rng = random.Random(seed)
    model = enc.model.train()
    # the new head learns at its own, larger rate: at the backbone's rate a few hundred steps
    # barely move a classifier initialised at N(0, 0.02), and the loss stays at log(1 + n)
    head = [p for n, p in model.named_parameters() if n.startswith(("pooler.", "classifier."))]
    body = [p for n, p in model.named_parameters() if not n.startswith(("pooler.", "classifier."))]
    opt = torch.optim.AdamW([{"params": body, "lr": lr}, {"params": head, "lr": head_lr}], weight_decay=0.01)
    n_warm = max(1, int(warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / n_warm, max(0.0, (steps - s) / max(1, steps - n_warm))))
    loss_fn = LOSSES[loss]
    losses: list[float] = []
    order: list[int] = []
    bar = range(steps)
    if progress:
        from tqdm import tqdm

        bar = tqdm(bar, desc="train reranker", unit="step", mininterval=0.1 if sys.stderr.isatty() else 30)
    for step in bar:
        if not order:
            order = rng.sample(range(len(batches)), len(batches))
        batch = batches[order.pop()]
        loss_t = loss_fn(_group_logits(enc, batch))
        opt.zero_grad(set_to_none=True)
        loss_t.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss_t.detach()))
        if progress and step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    model.eval()
    mrr_after = mrr(reranker, evals)

    k = max(1, min(20, steps // 5))
    summary = {"settings": settings, "n_train": len(train), "n_held_out": len(evals),
               "n_heading": sum(ex.kind == "heading" for ex in train), "train_batches": len(batches),
               "loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k,
               "chance_mrr": sum(1 / r for r in range(1, negatives + 2)) / (negatives + 1),
               "held_out_mrr_before": mrr_before, "held_out_mrr_after": mrr_after,
               "seconds": round(time.perf_counter() - t0, 1)}
    out = reranker.save(out_dir)
    (out / "train.json").write_text(json.dumps(_finite(summary), indent=2) + "\n")
    summary["out_dir"] = str(out)
    summary["losses"] = losses
    return summary


def _finite(obj):
    """JSON has no NaN: an undefined MRR (no held-out queries) is written as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    return obj


__all__ = [
    "LLM_RERANK_OPTIONS",
    "LLM_RERANK_PROMPT",
    "LOSSES",
    "RERANKERS",
    "CrossEncoderReranker",
    "Example",
    "LLMReranker",
    "NoReranker",
    "Reranker",
    "build_examples",
    "get_reranker",
    "hard_negatives",
    "heading_query",
    "ict_pair",
    "listwise_loss",
    "mrr",
    "pointwise_bce_loss",
    "reorder",
    "sentence_spans",
    "split_documents",
    "train_cross_encoder",
]
