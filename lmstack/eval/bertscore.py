"""BERTScore (Zhang et al. 2020, "BERTScore: Evaluating Text Generation with BERT") on our encoder.

Each text becomes the encoder's last-layer token vectors, L2-normalised. For a candidate x
and a reference y (Eq. 3-4 of the paper, with importance weights w)::

    R = sum_{y_j} w(y_j) max_{x_i} x_i . y_j / sum_{y_j} w(y_j)
    P = sum_{x_i} w(x_i) max_{y_j} x_i . y_j / sum_{x_i} w(x_i)
    F = 2 P R / (P + R)

Without IDF every token weighs 1; with IDF, w(t) = log((M + 1) / (df(t) + 1)) over the M
references. [CLS] and [SEP] weigh 0 but stay in the similarity matrix, the convention of the
``bert-score`` package, so with the same model and layer the numbers agree with it.
Multiple references: the one with the best F counts.

Texts are read up to the encoder's positions (``block_size``: 512 wordpieces for
all-MiniLM-L6-v2, specials included), as ``bert-score`` truncates at the tokenizer's
``model_max_length``; the sentence-embedding path (``Encoder.encode``) keeps the shorter
``max_seq_length`` (256) the checkpoint was trained for. Longer texts are cut there, in both
the scores and the IDF counts.

Deliberately left out: baseline rescaling (its baselines are per model and not available
offline) and layer selection (the encoder's last layer is used).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import torch

from lmstack.eval.metrics import Reference, _as_lists, _mean


def idf_weights(token_ids: Sequence[Sequence[int]], special_ids: Sequence[int]) -> dict[int, float]:
    """Token id -> log((M + 1) / (df + 1)) over M documents; special tokens get 0."""
    m = len(token_ids)
    df = Counter(t for doc in token_ids for t in set(doc))
    weights = {t: math.log((m + 1) / (c + 1)) for t, c in df.items()}
    weights.update({s: 0.0 for s in special_ids})
    return weights


def full_length(encoder):
    """The same network and vocabulary, truncating at ``block_size`` instead of ``max_seq_length``.

    A shallow copy with its own tokenizer: ``encoder`` itself (shared with ``encode``) is unchanged.
    """
    import copy

    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(encoder.tokenizer.to_str())
    tok.enable_truncation(max_length=encoder.cfg.block_size)
    long = copy.copy(encoder)
    long.tokenizer = tok
    return long


def bertscore_scores(predictions: Sequence[str], references: Sequence[Reference], encoder=None,
                     idf: bool = False, batch_size: int = 32) -> dict[str, list[float]]:
    """Per-item BERTScore precision, recall and F1 (best reference by F1)."""
    refs = _as_lists(predictions, references)
    if encoder is None:
        from lmstack.model.encoder import Encoder

        encoder = Encoder.load()
    encoder = full_length(encoder)
    tok = encoder.tokenizer
    specials = [i for i in (tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")) if i is not None]
    flat_refs = [r for rs in refs for r in rs]
    cand_states = encoder.token_states([p.strip() for p in predictions], batch_size)
    ref_states = encoder.token_states([r.strip() for r in flat_refs], batch_size)
    if idf:
        weights = idf_weights([ids for ids, _ in ref_states], specials)
        unseen = math.log(len(flat_refs) + 1)
    else:
        weights, unseen = {s: 0.0 for s in specials}, 1.0

    def w(ids: list[int]) -> torch.Tensor:
        return torch.tensor([weights.get(t, unseen) for t in ids])

    out: dict[str, list[float]] = {"precision": [], "recall": [], "f1": []}
    k = 0
    for (c_ids, c_h), rs in zip(cand_states, refs):
        best = (0.0, 0.0, -1.0)
        x = torch.nn.functional.normalize(c_h, dim=-1)  # (Tc, C)
        wx = w(c_ids)
        for _ in rs:
            r_ids, r_h = ref_states[k]
            k += 1
            y = torch.nn.functional.normalize(r_h, dim=-1)  # (Tr, C)
            wy = w(r_ids)
            sim = x @ y.T  # (Tc, Tr)
            p = float((sim.max(dim=1).values * wx).sum() / wx.sum()) if wx.sum() > 0 else 0.0
            r = float((sim.max(dim=0).values * wy).sum() / wy.sum()) if wy.sum() > 0 else 0.0
            f = 2 * p * r / (p + r) if p + r > 0 else 0.0
            if f > best[2]:
                best = (p, r, f)
        out["precision"].append(best[0])
        out["recall"].append(best[1])
        out["f1"].append(best[2])
    return out


def bertscore(predictions: Sequence[str], references: Sequence[Reference], encoder=None, idf: bool = False,
              batch_size: int = 32) -> dict[str, float]:
    """Mean BERTScore precision / recall / F1 over items."""
    scores = bertscore_scores(predictions, references, encoder, idf, batch_size)
    return {k: _mean(v) for k, v in scores.items()}


__all__ = ["bertscore", "bertscore_scores", "full_length", "idf_weights"]
