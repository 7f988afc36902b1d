"""Training benchmarks: pre-training throughput/MFU and LoRA/QLoRA step time and peak memory.

    .venv/bin/python bench/train.py                 # every case, 2 threads, prints a Markdown table
    .venv/bin/python bench/train.py --case lora-peft # one case (what the driver runs per process)
    .venv/bin/python bench/train.py --only lora-ckpt-lmstack qlora-ckpt-lmstack --loss-chunk 0

Each case runs twice, each time in its own process (so peak memory is that case's alone):
once with glibc's default allocator for the step time (the median of the timed steps after one
warm-up step), and once with glibc told to return freed blocks to the OS at once
(MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_) for the memory: the process's peak RSS (the
kernel's VmHWM: imports, loading and every step included) then follows the live tensors
instead of what the allocator keeps. That setting makes every large allocation a system call
and page faults, up to twice the step time, so it is never used for timing; the peak under
the default allocator is reported too. The fine-tuning cases also report that peak less
the RSS the process had just before it loaded the model (after importing torch, transformers
and lmstack): the library pages are the same whatever is trained, so that figure is what the
model, its tokenizer, the activations and the optimizer cost.

* ``pretrain-*``: random token batches through ``Transformer`` + AdamW (fwd, bwd, step);
  MFU = achieved FLOPs (6N + attention, PaLM app. B) / the measured 1024^3 matmul throughput
  in the same dtype on the same threads.
* ``lora-lmstack`` vs ``lora-peft``: SmolLM2-135M-Instruct (the embedded GGUF, exported to a
  Hugging Face folder so both sides load the same fp32 weights), r=8, alpha=16, all seven
  linear projections, batch of 8 examples of the shipped instruction set (right-padded, loss
  on assistant tokens, no attention mask on either side), fp32, AdamW.
* ``qlora-lmstack`` / ``qlora8-lmstack``: the same with the frozen base in group-wise int4 / int8
  (the tied embedding / output projection too, unless ``--float-embedding``), quantised while
  it loads (``lmstack.peft.base_loader``), as ``lmstack sft`` does.
* ``--base smollm2-360m`` (any preset): the fine-tuning cases on that shape with random weights
  instead of the embedded model, to see how the ratios move with model size.
* ``--loss-chunk`` sets ``token_loss_sum``'s fused projection + loss chunk for the lmstack
  cases (0: one unfused projection with full logits, as transformers computes its loss).
* ``--pairs N``: the step-time comparison of the first two ``--only`` cases (default
  ``lora-lmstack lora-peft``) as N interleaved pairs of runs, each its own process under the
  default allocator, so that both sides of a pair see the same machine; prints each pair's
  ratio and the median. One run per side is at the mercy of a shared machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = ["pretrain-llama-10m-float32", "pretrain-llama-10m-bfloat16", "pretrain-gpt2-124m-float32",
         "pretrain-gpt2-124m-bfloat16", "lora-lmstack", "lora-peft", "qlora-lmstack", "qlora8-lmstack",
         "lora-ckpt-lmstack", "lora-ckpt-peft", "qlora-ckpt-lmstack"]


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """The process's peak RSS so far (VmHWM): imports, loading and every step included."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _timed_steps(step, n_steps: int) -> tuple[float, int]:
    """(median step seconds, the process's peak RSS in bytes) over ``n_steps`` steps after one warm-up."""
    step()
    times = []
    for _ in range(n_steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times), peak_rss()


def _memory(peak: int, before_load: int) -> dict:
    return {"peak_rss_mib": peak / 2**20, "rss_before_load_mib": before_load / 2**20,
            "peak_above_load_mib": (peak - before_load) / 2**20}


def case_pretrain(name: str, dtype: str, steps: int) -> dict:
    import torch

    from lmstack.model import Transformer, preset
    from lmstack.train.common import flops_per_token, peak_flops

    torch.manual_seed(0)
    cfg = preset(name)
    model = Transformer(cfg)
    B, T = (8, 256) if cfg.num_params() < 50e6 else (4, 256)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    x = torch.randint(0, cfg.vocab_size, (B, T + 1))
    dt = torch.bfloat16 if dtype == "bfloat16" else torch.float32

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            logits = model(x[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sec, peak = _timed_steps(step, steps)
    tps = B * T / sec
    fpt = flops_per_token(cfg, model.num_params(), T)
    pk = peak_flops("cpu", dt)
    return {"case": f"pretrain {name} {dtype}", "params_M": model.num_params() / 1e6, "tokens_per_step": B * T,
            "step_s": sec, "tokens_per_s": tps, "achieved_gflops": tps * fpt / 1e9, "matmul_peak_gflops": pk / 1e9,
            "mfu": tps * fpt / pk, "peak_rss_mib": peak / 2**20}


def _sft_batch(tok):
    import torch

    from lmstack.train.chat_data import collate, encode_dataset, read_jsonl

    enc = encode_dataset(tok, read_jsonl("builtin:instruct-train")[:8], 512)
    b = collate(enc, tok.pad_token_id or 0)
    return b["inputs"], b["targets"], torch.cat([b["inputs"][:, :1], b["targets"]], 1)


def case_lora_lmstack(method: str, steps: int, bits: str = "int4", ckpt: bool = False, loss_chunk: int = 4096,
                      quant_embedding: bool = True, base: str | None = None) -> dict:
    import torch

    from lmstack import LLM
    from lmstack.peft import PEFTConfig, apply_peft, base_loader, param_counts
    from lmstack.train.common import token_loss_sum

    cfg = PEFTConfig(method=method, r=8, alpha=16, quant_bits=bits, group_size=64, quant_embedding=quant_embedding)
    before_load = rss()
    llm = LLM.load(base, convert=base_loader(cfg))  # QLoRA: quantised as it loads, as `lmstack sft` does
    model, tok = llm.model, llm.tokenizer
    torch.manual_seed(0)
    apply_peft(model, cfg)
    model.gradient_checkpointing = ckpt
    model.train()
    inputs, targets, _ = _sft_batch(tok)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=False)

    def step():
        s, n = token_loss_sum(model, inputs, targets, loss_chunk=loss_chunk)
        (s / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sec, peak = _timed_steps(step, steps)
    label = {"lora": "LoRA lmstack", "qlora": f"QLoRA ({bits}) lmstack"}[method]
    label += " + activation checkpointing" if ckpt else ""
    label += ", fp32 embedding" if method == "qlora" and not quant_embedding else ""
    label += ", unfused loss" if loss_chunk == 0 else ""
    return {"case": label, "method": method if method == "lora" else f"qlora-{bits}", "ckpt": ckpt,
            "trainable": param_counts(model)[0], "tokens_per_step": inputs.numel(),
            "target_tokens": int((targets != -100).sum()), "step_s": sec, **_memory(peak, before_load)}


def peft_lora(model, ckpt: bool):
    """The PEFT side of every LoRA comparison: r=8, alpha=16 on all seven projections."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                             "gate_proj", "up_proj", "down_proj"]))
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def case_lora_peft(steps: int, ckpt: bool = False, base: str | None = None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from lmstack.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory() as d:
        # The export runs in a child process so that this one's RSS before the load holds the
        # imported libraries only, as in the lmstack cases.
        subprocess.run([sys.executable, "-c", f"from lmstack import LLM; LLM.load({base!r}).save({d!r}, format='hf')"],
                       check=True)
        before_load = rss()
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa")
        tok = Tokenizer.load(d)
    torch.manual_seed(0)
    model = peft_lora(model, ckpt)
    model.train()
    inputs, _, labels = _sft_batch(tok)
    ids = labels.clone()
    ids[:, 1:] = inputs  # the full sequence; labels = the same ids with -100 off the assistant tokens
    labels = torch.where(labels == -100, labels, ids)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=False)

    def step():
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sec, peak = _timed_steps(step, steps)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    label = "LoRA transformers+PEFT" + (" + activation checkpointing" if ckpt else "")
    return {"case": label, "trainable": trainable, "tokens_per_step": inputs.numel(),
            "step_s": sec, **_memory(peak, before_load)}


def run_case(name: str, steps: int, loss_chunk: int, quant_embedding: bool, base: str | None = None) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    if name.startswith("pretrain-"):
        parts = name[len("pretrain-"):].rsplit("-", 1)
        return case_pretrain(parts[0], parts[1], steps)
    if name.endswith("-peft"):
        return case_lora_peft(steps, ckpt="-ckpt" in name, base=base)
    method = "qlora" if name.startswith("qlora") else "lora"
    return case_lora_lmstack(method, steps, "int8" if name.startswith("qlora8") else "int4", ckpt="-ckpt" in name,
                             loss_chunk=loss_chunk, quant_embedding=quant_embedding, base=base)


_TIME_FIELDS = ("step_s", "tokens_per_s", "achieved_gflops", "matmul_peak_gflops", "mfu")


def _ratios(results: list[dict]) -> list[str]:
    """QLoRA int4 against LoRA (both lmstack), with and without checkpointing, on both measures."""
    by = {(r.get("method"), r.get("ckpt")): r for r in results}
    lines = []
    for ckpt in (False, True):
        lora, qlora = by.get(("lora", ckpt)), by.get(("qlora-int4", ckpt))
        if lora and qlora:
            total = qlora["peak_rss_mib"] / lora["peak_rss_mib"]
            above = qlora["peak_above_load_mib"] / lora["peak_above_load_mib"]
            lines.append(f"QLoRA int4 / LoRA, checkpointing {'on' if ckpt else 'off'} on both: total peak RSS "
                         f"{total:.2f}x ({'met' if total <= 0.5 else 'not met'}), above pre-load {above:.2f}x "
                         f"({'met' if above <= 0.5 else 'not met'}) against the 0.5x target")
    return lines


def pair_ratios(cases: list[str], pairs: int, steps: int, env: dict, extra: list[str]) -> None:
    """Step time of ``cases[0]`` over ``cases[1]``, from ``pairs`` interleaved pairs of runs."""
    if len(cases) != 2:
        raise SystemExit(f"--pairs compares two cases, got {cases}")
    ratios = []
    print(f"| pair | {cases[0]} step (s) | {cases[1]} step (s) | ratio |\n|---|---|---|---|")
    for i in range(pairs):
        sec = []
        for c in cases:
            p = subprocess.run([sys.executable, __file__, "--case", c, "--steps", str(steps), *extra], env=env,
                               capture_output=True, text=True)
            if p.returncode != 0:
                raise SystemExit(f"{c}: failed\n{p.stderr[-2000:]}")
            sec.append(json.loads(p.stdout.strip().splitlines()[-1])["step_s"])
        ratios.append(sec[0] / sec[1])
        print(f"| {i + 1} | {sec[0]:.2f} | {sec[1]:.2f} | {ratios[-1]:.2f}x |", flush=True)
    print(f"\nratios, sorted: {', '.join(f'{r:.2f}x' for r in sorted(ratios))}; median {statistics.median(ratios):.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=CASES)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--only", nargs="*", help="cases to run (default: all)")
    ap.add_argument("--loss-chunk", type=int, default=4096,
                    help="lmstack cases: vocabulary rows per chunk of the fused loss (0 = unfused)")
    ap.add_argument("--float-embedding", action="store_true",
                    help="QLoRA cases: keep the tied embedding / output projection in fp32")
    ap.add_argument("--base", help="fine-tuning cases: a preset (random weights, seed 0, saved once with the "
                                   "embedded model's tokenizer, e.g. smollm2-360m) instead of the embedded model")
    ap.add_argument("--out", help="write all results as JSON here")
    ap.add_argument("--pairs", type=int, default=0,
                    help="step time only: this many interleaved runs of the first two --only cases, and their ratios")
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.steps, args.loss_chunk, not args.float_embedding, args.base)))
        return
    env_time = {**os.environ, "OMP_NUM_THREADS": "2"}
    env_mem = {**env_time, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    extra = ["--loss-chunk", str(args.loss_chunk)] + (["--float-embedding"] if args.float_embedding else [])
    if args.pairs:
        if args.base:
            ap.error("--pairs runs the embedded model; leave out --base")
        pair_ratios(args.only[:2] if args.only else ["lora-lmstack", "lora-peft"], args.pairs, args.steps, env_time,
                    extra)
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.base:
            folder = str(Path(tmp) / args.base)
            subprocess.run([sys.executable, "-c", "from lmstack import LLM; "
                            f"m = LLM.load({args.base!r}); m.tokenizer = LLM.load().tokenizer; m.save({folder!r})"],
                           check=True)
            extra += ["--base", folder]
        for c in args.only or CASES:
            runs = []
            for e in (env_time, env_mem):
                p = subprocess.run([sys.executable, __file__, "--case", c, "--steps", str(args.steps), *extra], env=e,
                                   capture_output=True, text=True)
                if p.returncode != 0:
                    print(f"{c}: failed\n{p.stderr[-2000:]}", file=sys.stderr)
                    break
                runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
            if len(runs) < 2:
                continue
            r = {**runs[1], **{k: v for k, v in runs[0].items() if k in _TIME_FIELDS},
                 "peak_rss_default_malloc_mib": runs[0]["peak_rss_mib"]}
            if args.base:
                r["case"] += f" ({args.base}, random weights)"
            results.append(r)
            print(json.dumps(r), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    print("\n| case | step (s) | tokens/s | MFU | peak RSS (MiB) | above pre-load (MiB) | peak RSS, default malloc "
          "(MiB) |\n|---|---|---|---|---|---|---|")
    for r in results:
        tps = r.get("tokens_per_s", r["tokens_per_step"] / r["step_s"])
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
        above = f"{r['peak_above_load_mib']:,.0f}" if "peak_above_load_mib" in r else "-"
        print(f"| {r['case']} | {r['step_s']:.2f} | {tps:,.0f} | {mfu} | {r['peak_rss_mib']:,.0f} | {above} | "
              f"{r['peak_rss_default_malloc_mib']:,.0f} |")
    for line in _ratios(results):
        print(line)


if __name__ == "__main__":
    main()
