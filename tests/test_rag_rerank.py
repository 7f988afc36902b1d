"""Rerankers and the cross-encoder's training data: permutation invariants, the LLM score
against log-softmax values taken straight from ``LLM.logits``, inverse-cloze pairs that never
leak the query, hard negatives that never overlap the positive, a training run that lowers the
loss and reloads to identical scores, and the saved folder against ``transformers``."""

import json
import math
import random
import re

import pytest
import torch

from lmstack.errors import ConfigError, LMStackError
from lmstack.rag.rerank import (
    LLM_RERANK_OPTIONS,
    LLM_RERANK_PROMPT,
    RERANKERS,
    CrossEncoderReranker,
    LLMReranker,
    NoReranker,
    build_examples,
    get_reranker,
    hard_negatives,
    heading_query,
    ict_pair,
    listwise_loss,
    mrr,
    pointwise_bce_loss,
    reorder,
    sentence_spans,
    split_documents,
    train_cross_encoder,
)
from lmstack.rag.types import ChunkRecord, Hit, chunk_id

# -- a fake store: documents of sentences over a topic vocabulary, BM25-like lexical search ----

TOPICS = ["volcano lava magma crater eruption ash basalt",
          "violin bow string orchestra concerto sonata rosin",
          "glacier ice moraine fjord crevasse snowfield melt",
          "bread flour yeast dough oven crust knead",
          "comet orbit nucleus tail perihelion dust coma",
          "chess bishop knight pawn castling gambit endgame",
          "coral reef polyp lagoon atoll algae bleaching",
          "railway locomotive track station signal freight carriage",
          "honey bee hive pollen nectar queen swarm",
          "castle moat tower rampart keep siege drawbridge"]
COMMON = ["the", "a", "of", "and", "in", "is", "was", "with", "for", "by", "on", "from", "many", "some", "often"]


def _sentence(rng, words, extra):
    n = rng.randint(6, 10)
    toks = [rng.choice(words) if rng.random() < 0.6 else rng.choice(extra) for _ in range(n)]
    return " ".join(toks).capitalize() + "."


def make_docs(seed=0, sentences=4, chunks=3):
    """{doc key: (title, [(section, text of one chunk)])}: each chunk has its own sub-vocabulary."""
    rng = random.Random(seed)
    docs = {}
    for t, topic in enumerate(TOPICS):
        words = topic.split()
        parts = []
        for c in range(chunks):
            sub = [f"{words[c % len(words)]}{c}{k}" for k in range(4)]
            text = " ".join(_sentence(rng, words + sub * 2, COMMON) for _ in range(sentences))
            parts.append((f"{words[c]} and many", text))  # common words: other documents match too
        docs[f"doc{t}"] = (words[0].capitalize(), parts)
    return docs


def _tokens(text):
    return re.findall(r"\w+", text.lower())


class FakeStore:
    """``documents``, ``doc_chunks``, ``get_chunks`` and a BM25-like ``search_lexical``. With
    ``overlap``, every document also has chunks straddling its neighbouring chunks."""

    uri = "fake://"

    def __init__(self, docs, overlap=False):
        self.chunks: dict[str, ChunkRecord] = {}
        self.by_doc: dict[str, list[ChunkRecord]] = {}
        for key, (title, parts) in docs.items():
            text, spans = "", []
            for section, part in parts:
                start = len(text)
                text += part + "\n\n"
                spans.append((start, start + len(part), section))
            if overlap:  # a chunk from the middle of one part to the middle of the next
                for (s1, e1, sec), (s2, e2, _) in zip(spans, spans[1:]):
                    spans.append(((s1 + e1) // 2, (s2 + e2) // 2, sec))
            recs = []
            for i, (s, e, sec) in enumerate(spans):
                body = text[s:e]
                recs.append(ChunkRecord(chunk_id(key, s, e, body), key, i, body, s, e,
                                        {"title": title, "section": sec, "doc_key": key, "source": "fake"}))
            self.by_doc[key] = recs
            self.chunks.update({c.id: c for c in recs})
        n = len(self.chunks)
        df: dict[str, int] = {}
        for c in self.chunks.values():
            for w in set(_tokens(c.text)):
                df[w] = df.get(w, 0) + 1
        self.idf = {w: math.log(1 + (n - d + 0.5) / (d + 0.5)) for w, d in df.items()}

    def documents(self):
        return {k: "h" for k in self.by_doc}

    def doc_chunks(self, key):
        return list(self.by_doc.get(key, []))

    def get_chunks(self, ids):
        return [self.chunks[i] for i in ids if i in self.chunks]

    def search_lexical(self, query, k, where=None):
        q = set(_tokens(query))
        scored = []
        for c in self.chunks.values():
            s = sum(self.idf[w] for w in q & set(_tokens(c.text)))
            if s > 0:
                scored.append((c.id, s))
        scored.sort(key=lambda x: (-x[1], x[0]))
        return scored[:k]


# -- a tiny random cross-encoder over a word-level tokenizer built from the corpus -------------

def tiny_encoder(seed=0):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    from lmstack.model.encoder import Encoder, EncoderConfig, EncoderModel

    words = sorted({w for _, parts in make_docs().values() for _, t in parts for w in _tokens(t)}
                   | {w for t in TOPICS for w in t.split()} | set(COMMON))
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    cfg = EncoderConfig(vocab_size=len(vocab), block_size=256, n_layer=2, n_head=2, n_embd=32,
                        intermediate_size=64, max_seq_length=256)
    torch.manual_seed(seed)
    return Encoder(EncoderModel(cfg), tok, cfg)


def _hits(texts, scores=None):
    scores = scores or [float(len(texts) - i) for i in range(len(texts))]
    return [Hit(ChunkRecord(f"id{i}", "d", i, t, 0, len(t)), s, {"dense": s}) for i, (t, s) in
            enumerate(zip(texts, scores))]


# -- reranking invariants ----------------------------------------------------------------------

def test_reorder_is_a_sorted_truncated_permutation_and_leaves_the_input_alone():
    hits = _hits(["a", "b", "c", "d", "e"])
    out = reorder(hits, [0.1, 3.0, -2.0, 3.0, 1.0], 3)
    assert [h.chunk.id for h in out] == ["id1", "id3", "id4"]  # ties keep the input order
    assert [h.score for h in out] == [3.0, 3.0, 1.0]
    assert all(h.scores["rerank"] == h.score and "dense" in h.scores for h in out)
    assert [h.score for h in hits] == [5.0, 4.0, 3.0, 2.0, 1.0] and "rerank" not in hits[0].scores
    assert len(reorder(hits, [0.0] * 5, 50)) == 5
    with pytest.raises(LMStackError):
        reorder(hits, [1.0], 2)


@pytest.mark.parametrize("top_n", [0, -1, 2.5, None, True])
def test_bad_top_n_is_refused(top_n):
    with pytest.raises(ConfigError, match="top_n"):
        NoReranker().rerank("q", _hits(["a"]), top_n)


def test_none_keeps_the_first_stage_order():
    hits = _hits(["a", "b", "c"])
    out = get_reranker("none").rerank("q", hits, 2)
    assert [(h.chunk.id, h.score) for h in out] == [("id0", 3.0), ("id1", 2.0)]


def test_cross_encoder_rerank_is_a_permutation_sorted_by_its_own_scores():
    ce = CrossEncoderReranker.untrained(tiny_encoder(), seed=3)
    texts = [p for _, parts in list(make_docs().values())[:3] for _, p in parts]
    hits = _hits(texts)
    out = ce.rerank("volcano lava crater", hits, 5)
    assert len(out) == 5 and len({h.chunk.id for h in out}) == 5
    assert {h.chunk.id for h in out} <= {h.chunk.id for h in hits}
    assert all(a.score >= b.score for a, b in zip(out, out[1:]))
    direct = dict(zip([h.chunk.id for h in hits], ce.score("volcano lava crater", texts)))
    assert all(h.score == direct[h.chunk.id] == h.scores["rerank"] for h in out)
    full = ce.rerank("volcano lava crater", hits, 100)
    assert sorted(h.chunk.id for h in full) == sorted(h.chunk.id for h in hits)
    # scores do not depend on the batch a pair lands in (padding never counts)
    one = [ce.score("volcano lava crater", [t])[0] for t in texts[:3]]
    assert one == pytest.approx(ce.score("volcano lava crater", texts)[:3], abs=1e-5)


def test_registry_and_clear_errors():
    assert set(RERANKERS) == {"cross-encoder", "llm", "sentence", "none"}
    with pytest.raises(ConfigError, match="lmstack rag train-reranker"):
        get_reranker("cross-encoder")
    with pytest.raises(ConfigError, match="unknown name 'bm42'"):
        get_reranker("bm42")


def test_cross_encoder_folder_errors(tmp_path):
    with pytest.raises(LMStackError, match="train-reranker"):
        get_reranker(f"cross-encoder:{tmp_path}")
    with pytest.raises(LMStackError, match="1 label"):
        CrossEncoderReranker(tiny_encoder())


# -- the LLM judge -------------------------------------------------------------------------------

def _direct_yes_no(llm, prompt, chat=True):
    """log p(Yes) - log p(No) straight from ``LLM.logits`` (each option's tokens summed)."""
    ids = llm.chat_ids([{"role": "user", "content": prompt}]) if chat else llm.encode(prompt)
    total = []
    for opt in LLM_RERANK_OPTIONS:
        o = llm.tokenizer.encode(opt if chat else " " + opt, add_special_tokens=False)
        logp = torch.log_softmax(llm.logits([ids + o])[0], dim=-1)  # (T, V)
        total.append(sum(float(logp[len(ids) - 1 + j, t]) for j, t in enumerate(o)))
    return total[0] - total[1]


def test_llm_score_is_the_yes_no_log_softmax_difference():
    from lmstack import LLM

    llm = LLM.load("tiny-llama")  # random weights, byte-level tokens: "Yes" is three tokens
    prompt = "Q: {question}\nP: {passage}\nRelevant?"  # short: this model has 128 positions
    rr = LLMReranker(llm, prompt=prompt)
    passages = ["Bees make honey.", "Ice is cold."]
    got = rr.score("Who makes honey?", passages)
    for p, g in zip(passages, got):
        assert g == pytest.approx(_direct_yes_no(llm, prompt.format(passage=p, question="Who makes honey?")), abs=1e-4)
    out = rr.rerank("Who makes honey?", _hits(passages), 2)
    assert [h.score for h in out] == sorted(got, reverse=True)


@pytest.mark.slow
@pytest.mark.assets
def test_llm_reranker_on_the_default_model(smollm2):
    torch.set_num_threads(1)
    assert all(len(smollm2.tokenizer.encode(o, add_special_tokens=False)) == 1 for o in LLM_RERANK_OPTIONS)
    rr = get_reranker("llm", smollm2)
    q = "Who wrote Hamlet?"
    passages = ["Hamlet is a tragedy written by William Shakespeare around 1600.",
                "Glaciers are large masses of ice that move slowly over land."]
    got = rr.score(q, passages)
    assert got[0] == pytest.approx(_direct_yes_no(smollm2, LLM_RERANK_PROMPT.format(passage=passages[0], question=q)),
                                   abs=1e-3)
    assert got[0] > got[1]


# -- training data -------------------------------------------------------------------------------

def test_sentence_spans_cover_the_sentences_exactly():
    text = "  First one. Second one!\nThird?  Fourth without end"
    spans = sentence_spans(text)
    assert [text[s:e] for s, e in spans] == ["First one.", "Second one!", "Third?", "Fourth without end"]


def test_ict_pair_removes_the_query_sentence_from_the_positive():
    rng = random.Random(0)
    for _, parts in make_docs().values():
        for _, text in parts:
            q, pos = ict_pair(text, rng)
            assert q in text and q not in pos
            assert sorted(_tokens(q) + _tokens(pos)) == sorted(_tokens(text))  # nothing else was lost
    assert ict_pair("One short sentence here. And another one here.", rng) is None  # under 3 sentences


def test_heading_query():
    c = ChunkRecord("x", "d", 0, "t", 0, 1, {"title": "Volcano", "section": "Lava flows"})
    assert heading_query(c) == "Volcano Lava flows"
    c.meta["section"] = "volcano"
    assert heading_query(c) == "Volcano"
    assert heading_query(ChunkRecord("x", "d", 0, "t", 0, 1, {})) is None


def _overlaps(a, b):
    return a.doc_key == b.doc_key and a.start < b.end and b.start < a.end


def test_hard_negatives_never_overlap_the_positive_span():
    store = FakeStore(make_docs(), overlap=True)
    rng = random.Random(1)
    checked = 0
    for key in store.documents():
        for chunk in store.doc_chunks(key):
            q, _ = ict_pair(chunk.text, rng) or (None, None)
            if q is None:
                continue
            negs = hard_negatives(store, q, chunk, 5)
            assert negs and all(not _overlaps(n, chunk) and q not in n.text for n in negs)
            heads = hard_negatives(store, heading_query(chunk), chunk, 5, "heading")
            assert all(not _overlaps(n, chunk) and not (n.doc_key == chunk.doc_key and
                                                        n.meta["section"] == chunk.meta["section"]) for n in heads)
            checked += 1
    assert checked > 20
    # the overlapping chunks are real BM25 candidates, so the filter is what keeps them out
    c = store.doc_chunks("doc0")[0]
    q, _ = ict_pair(c.text, random.Random(0))
    raw = store.get_chunks([cid for cid, _ in store.search_lexical(q, 30)])
    assert any(_overlaps(x, c) for x in raw if x.id != c.id)


def test_build_examples_has_full_negative_lists_and_no_leaks():
    store = FakeStore(make_docs(), overlap=True)
    exs = build_examples(store, 25, 4, seed=0, heading_share=0.3)
    assert len(exs) == 25 and {e.kind for e in exs} == {"ict", "heading"}
    for ex in exs:
        assert len(ex.negatives) == 4 and ex.positive not in ex.negatives
        pos = next(c for c in store.doc_chunks(ex.doc_key) if (c.start, c.end) == ex.span)
        by_text = {c.text: c for c in store.chunks.values()}
        assert all(not _overlaps(by_text[n], pos) for n in ex.negatives)
        if ex.kind == "ict":
            assert ex.query not in ex.positive and ex.query in pos.text
    assert [e.query for e in build_examples(store, 25, 4, seed=0, heading_share=0.3)] == [e.query for e in exs]
    train, held = split_documents(list(store.documents()), 0.2)
    assert len(held) == 2 and not set(train) & set(held) and len(train) + len(held) == 10


# -- losses and training -------------------------------------------------------------------------

def test_losses_match_their_definitions():
    s = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 0.0]])
    want = -(torch.log_softmax(s, -1)[:, 0]).mean()
    assert float(listwise_loss(s)) == pytest.approx(float(want), abs=1e-6)
    assert float(listwise_loss(torch.zeros(4, 8))) == pytest.approx(math.log(8), abs=1e-6)
    p = torch.sigmoid(s)
    bce = -(torch.log(p[:, 0]).sum() + torch.log(1 - p[:, 1:]).sum()) / s.numel()
    assert float(pointwise_bce_loss(s)) == pytest.approx(float(bce), abs=1e-6)


def test_a_tiny_training_run_lowers_the_loss_and_reloads_to_identical_scores(tmp_path):
    torch.set_num_threads(1)
    store = FakeStore(make_docs(), overlap=True)
    base = tiny_encoder()
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    res = train_cross_encoder(store, tmp_path / "ce", n_queries=60, negatives=3, steps=60, seed=0, lr=2e-3,
                              batch_queries=4, max_length=96, held_out=0.2, base=base, progress=False)
    assert res["loss_last"] < res["loss_first"] - 0.3
    assert res["n_train"] > 30 and res["n_held_out"] > 5
    assert res["held_out_mrr_after"] > res["held_out_mrr_before"]
    saved = json.loads((tmp_path / "ce" / "train.json").read_text())
    assert saved["settings"]["steps"] == 60 and saved["held_out_mrr_after"] == res["held_out_mrr_after"]
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in (tmp_path / "ce").iterdir()}
    again = get_reranker(f"cross-encoder:{tmp_path / 'ce'}")
    exs = build_examples(store, 8, 3, seed=5)
    texts = [t for ex in exs for t in [ex.positive] + ex.negatives]
    from lmstack.model.encoder import Encoder

    trained = CrossEncoderReranker(Encoder.load(tmp_path / "ce"))
    assert again.score(exs[0].query, texts) == trained.score(exs[0].query, texts)
    assert mrr(again, exs) == pytest.approx(mrr(trained, exs))
    assert again.encoder.cfg.max_seq_length == 96
    # the base encoder passed in is left as it was: training works on a copy of it
    assert all(torch.equal(v, before[k]) for k, v in base.model.state_dict().items())
    assert base.tokenizer.truncation is None and base.cfg.num_labels == 0


def test_training_refuses_bad_settings(tmp_path):
    store = FakeStore(make_docs())
    with pytest.raises(ConfigError, match="loss"):
        train_cross_encoder(store, tmp_path, loss="hinge", base=tiny_encoder())
    with pytest.raises(ConfigError, match="negatives"):
        train_cross_encoder(store, tmp_path, negatives=0, base=tiny_encoder())
    with pytest.raises(LMStackError, match="no training queries"):
        train_cross_encoder(store, tmp_path, negatives=500, base=tiny_encoder(), progress=False)


@pytest.mark.slow
@pytest.mark.assets
def test_minilm_cross_encoder_trains_saves_and_matches_transformers(encoder, tmp_path):
    torch.set_num_threads(1)
    transformers = pytest.importorskip("transformers")
    store = FakeStore(make_docs(), overlap=True)
    res = train_cross_encoder(store, tmp_path / "ce", n_queries=24, negatives=3, steps=6, seed=0, lr=3e-5,
                              batch_queries=2, max_length=128, held_out=0.2, base=None, progress=False)
    assert res["loss_last"] < res["loss_first"]
    ce = CrossEncoderReranker.load(tmp_path / "ce")
    assert ce.encoder.cfg.max_seq_length == 128
    ref = transformers.BertForSequenceClassification.from_pretrained(str(tmp_path / "ce")).eval()
    q, p = "volcano lava", store.doc_chunks("doc0")[0].text
    e = ce.encoder.tokenizer.encode(q, p)
    with torch.no_grad():
        want = ref(input_ids=torch.tensor([e.ids]), token_type_ids=torch.tensor([e.type_ids])).logits[0, 0]
    assert ce.score(q, [p])[0] == pytest.approx(float(want), abs=1e-4)
