"""Prefill and decode speed, and peak memory: lmstack vs transformers ``generate``.

Same weights (the embedded SmolLM2-135M-Instruct, dequantised, exported once as a Hugging
Face folder for transformers), same prompt tokens, same thread count, greedy decoding of a
fixed number of tokens (EOS ignored). Each (engine, dtype, batch) runs in its own process so
peak RSS is its own.

    python bench/decode.py                      # the full grid, prints a Markdown table
    python bench/decode.py --json out.json      # also save the raw numbers

Bandwidth bound: decoding one step reads every weight once, so at batch 1 the ceiling is
memory bandwidth / weight bytes; ``--bandwidth-gbs`` sets the measured bandwidth (53 GB/s
on the reference 2-core machine).

``--dtypes int4 qlora``: lmstack with group-wise int4 weights (quantised while loading; ``qlora``
adds LoRA r=8 on all seven projections, as a QLoRA model is after training) against
transformers in fp32, what it runs on a CPU without a 4-bit backend.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _hf_folder() -> Path:
    from lmstack import LLM
    from lmstack.model.gguf_loader import cache_dir

    out = cache_dir() / "bench" / "smollm2-135m-hf"
    if not (out / "config.json").is_file():
        LLM.load().save(out, format="hf")
    return out


def worker(engine: str, dtype: str, batch: int, prompt_len: int, new_tokens: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    dt = {"bfloat16": torch.bfloat16}.get(dtype, torch.float32)  # int4 / qlora: transformers runs fp32
    torch.manual_seed(0)
    prompts = torch.randint(100, 40000, (batch, prompt_len))
    if engine == "lmstack":
        from lmstack import LLM
        from lmstack.infer import SamplingParams, generate_ids
        from lmstack.peft import PEFTConfig, apply_peft, base_loader

        quant = dtype in ("int4", "qlora")
        peft = PEFTConfig(method="qlora", r=8, alpha=16, quant_bits="int4", group_size=64)
        llm = LLM.load(dtype=None if quant else dtype, convert=base_loader(peft) if quant else None)
        model = llm.model
        if dtype == "qlora":  # the int4 base with LoRA on all seven projections, as after QLoRA training
            apply_peft(model, peft)
            model.eval()
        weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())

        def run(n):
            params = SamplingParams(max_new_tokens=n, ignore_eos=True)
            return generate_ids(model, prompts.tolist(), params)
    else:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(_hf_folder(), dtype=dt).eval()
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        mask = torch.ones_like(prompts)

        def run(n):
            with torch.inference_mode():
                out = model.generate(prompts, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                     do_sample=False, pad_token_id=2)
            return out[:, prompt_len:].tolist()

    run(4)  # warm-up
    t0 = time.perf_counter()
    run(1)
    t_prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = run(new_tokens)
    t_total = time.perf_counter() - t0
    assert all(len(o) == new_tokens for o in out), "generation stopped early"
    return {
        "engine": engine, "dtype": dtype, "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "prefill_tok_s": batch * prompt_len / t_prefill,
        "decode_tok_s": batch * (new_tokens - 1) / (t_total - t_prefill),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "weight_bytes": weight_bytes,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--engines", nargs="+", default=["lmstack", "transformers"])
    ap.add_argument("--bandwidth-gbs", type=float, default=53.0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", nargs=3, metavar=("ENGINE", "DTYPE", "BATCH"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        e, d, b = a.worker
        print(json.dumps(worker(e, d, int(b), a.prompt_len, a.new_tokens, a.threads)))
        return
    if "transformers" in a.engines:
        _hf_folder()  # export once, outside the timed workers
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    rows = []
    for d in a.dtypes:
        for b in a.batches:
            for e in a.engines:
                cmd = [sys.executable, __file__, "--worker", e, d, str(b), "--threads", str(a.threads),
                       "--prompt-len", str(a.prompt_len), "--new-tokens", str(a.new_tokens)]
                res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
                if res.returncode:
                    sys.exit(f"worker {e} {d} batch {b} failed:\n{res.stderr[-2000:]}")
                rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
                r = rows[-1]
                print(f"  {e:12s} {d:8s} b={b}: prefill {r['prefill_tok_s']:.0f} tok/s, "
                      f"decode {r['decode_tok_s']:.1f} tok/s, peak {r['peak_rss_mib']:.0f} MiB", file=sys.stderr)
    bw = a.bandwidth_gbs * 1e9
    print(f"\n{datetime.date.today()} | {platform.processor() or platform.machine()} | "
          f"{a.threads} threads | torch {__import__('torch').__version__} | prompt {a.prompt_len}, "
          f"{a.new_tokens} new tokens, greedy\n")
    print("| dtype | batch | lmstack prefill tok/s | transformers prefill tok/s | lmstack decode tok/s | "
          "transformers decode tok/s | decode ratio | lmstack peak MiB | transformers peak MiB | "
          "lmstack % of bandwidth bound |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for d in a.dtypes:
        for b in a.batches:
            r = {x["engine"]: x for x in rows if x["dtype"] == d and x["batch"] == b}
            ours, ref = r.get("lmstack"), r.get("transformers")
            if not ours or not ref:
                continue
            bound = bw / ours["weight_bytes"] * b  # one weight read per step serves b tokens
            print(f"| {d} | {b} | {ours['prefill_tok_s']:.0f} | {ref['prefill_tok_s']:.0f} | "
                  f"{ours['decode_tok_s']:.1f} | {ref['decode_tok_s']:.1f} | "
                  f"{ours['decode_tok_s'] / ref['decode_tok_s']:.2f}x | {ours['peak_rss_mib']:.0f} | "
                  f"{ref['peak_rss_mib']:.0f} | {100 * ours['decode_tok_s'] / bound:.0f}% |")
    if a.json:
        Path(a.json).write_text(json.dumps({"date": str(datetime.date.today()), "threads": a.threads,
                                            "machine": platform.platform(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
