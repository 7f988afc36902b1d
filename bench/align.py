"""Preference-training benchmark: one DPO-LoRA step of ``lmstack dpo`` against TRL's
``DPOTrainer`` with a PEFT LoRA, step time and peak memory.

    .venv/bin/python bench/align.py                      # 3 interleaved pairs, 2 threads, Markdown tables
    .venv/bin/python bench/align.py --pairs 5 --steps 4
    .venv/bin/python bench/align.py --case dpo-trl       # one case, one JSON line (what the driver runs)

Both sides: SmolLM2-135M-Instruct (the embedded GGUF, exported to a Hugging Face folder so that
TRL loads the same fp32 weights), LoRA r=8, alpha=16 on all seven linear projections, the
first 8 pairs (``--batch``) of the shipped preference set (``builtin:pref-train``; where it is not built,
pairs made from ``builtin:instruct-train``: each reference answer against the next prompt's),
conversational, rendered by the same chat template, no truncation (``max_length`` 512),
sigmoid loss, beta 0.1, AdamW, fp32, no gradient checkpointing. A step is the policy's
forward and backward over the chosen and rejected completions of the batch, the reference's
forward (the adapters disabled, no gradient) and the optimizer step: for TRL,
``trainer.training_step`` on a collated batch plus its optimizer's step.

Step time: ``--pairs`` interleaved pairs of runs, each side its own process under the default
allocator, one warm-up step then the median of ``--steps`` steps; the ratio of each pair and
their median (one run per side is at the mercy of a shared machine's load). Peak memory: one
more run per side with glibc returning freed blocks at once (as ``bench/train.py``): the
process's peak RSS (VmHWM) and that peak less the RSS just before the model loads (the
libraries imported), which is what the model, the activations and the optimizer cost.
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

CASES = ["dpo-lmstack", "dpo-trl"]
MAX_LEN = 512
BATCH = int(os.environ.get("BENCH_BATCH", "8"))  # pairs per step


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def pairs() -> tuple[list[dict], str]:
    """The benchmark's preference pairs (TRL's conversational format) and where they come from."""
    from importlib import resources

    from lmstack.train.align_data import read_preference
    from lmstack.train.chat_data import read_jsonl

    if (resources.files("lmstack.train.datasets") / "pref-train.jsonl").is_file():
        rows = read_preference("builtin:pref-train")[:BATCH]
        return [{"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected} for r in rows], "builtin:pref-train"
    chats = read_jsonl("builtin:instruct-train")[:BATCH + 1]
    return [{"prompt": c["messages"][:-1], "chosen": c["messages"][-1:], "rejected": n["messages"][-1:]}
            for c, n in zip(chats, chats[1:])], "builtin:instruct-train (derived pairs)"


def _timed(step, steps: int) -> float:
    step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def case_lmstack(steps: int) -> dict:
    import torch

    from lmstack import LLM
    from lmstack.peft import PEFTConfig, apply_peft
    from lmstack.train.align_common import collate, completion_logps, encode, pad_id, reference_logps
    from lmstack.train.align_loss import dpo_loss

    data, source = pairs()
    before_load = rss()
    llm = LLM.load(None)
    model, tok = llm.model, llm.tokenizer
    torch.manual_seed(0)
    apply_peft(model, PEFTConfig(method="lora", r=8, alpha=16))
    model.train()
    enc = [(encode(tok, r["prompt"], r["chosen"], MAX_LEN), encode(tok, r["prompt"], r["rejected"], MAX_LEN))
           for r in data]
    b = collate([c for c, _ in enc] + [j for _, j in enc], pad_id(tok))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=False)

    def step():
        logps, _ = completion_logps(model, b["input_ids"], b["completion_mask"])
        ref = reference_logps(model, b)
        losses, _, _ = dpo_loss(logps[:BATCH], logps[BATCH:], ref[:BATCH], ref[BATCH:], beta=0.1)
        losses.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sec = _timed(step, steps)
    peak = peak_rss()
    return {"case": "DPO-LoRA lmstack", "data": source, "rows": b["input_ids"].shape[0],
            "seq_len": b["input_ids"].shape[1], "completion_tokens": int(b["completion_mask"].sum()), "step_s": sec,
            "peak_rss_mib": peak / 2**20, "peak_above_load_mib": (peak - before_load) / 2**20}


def case_trl(steps: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    data, source = pairs()
    with tempfile.TemporaryDirectory() as d, tempfile.TemporaryDirectory() as out:
        # exported in a child process, so this one's RSS before the load holds the libraries only
        subprocess.run([sys.executable, "-c", f"from lmstack import LLM; LLM.load().save({d!r}, format='hf')"],
                       check=True)
        before_load = rss()
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa")
        tok = AutoTokenizer.from_pretrained(d)
        args = DPOConfig(output_dir=out, per_device_train_batch_size=BATCH, max_length=MAX_LEN, beta=0.1,
                         loss_type=["sigmoid"], learning_rate=1e-4, use_cpu=True, report_to=[], save_strategy="no",
                         logging_strategy="no", precompute_ref_log_probs=False, gradient_checkpointing=False,
                         dataloader_num_workers=0, seed=0, disable_dropout=True)
        peft = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        torch.manual_seed(0)
        trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(data), processing_class=tok,
                             peft_config=peft)
        trainer.create_optimizer_and_scheduler(num_training_steps=steps + 1)
        trainer.current_gradient_accumulation_steps = 1  # what Trainer.train sets before its first step
        batch = next(iter(trainer.get_train_dataloader()))
        model = trainer.model
        model.train()

        def step():
            trainer.training_step(model, batch)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)

        sec = _timed(step, steps)
        peak = peak_rss()
    return {"case": "DPO-LoRA TRL DPOTrainer + PEFT", "data": source, "rows": batch["input_ids"].shape[0],
            "seq_len": batch["input_ids"].shape[1], "completion_tokens": int(batch["completion_mask"].sum()),
            "step_s": sec, "peak_rss_mib": peak / 2**20, "peak_above_load_mib": (peak - before_load) / 2**20}


def run_case(name: str, steps: int) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    return case_lmstack(steps) if name == "dpo-lmstack" else case_trl(steps)


def _run(case: str, steps: int, env: dict) -> dict:
    p = subprocess.run([sys.executable, __file__, "--case", case, "--steps", str(steps)], env=env,
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{case}: failed\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    """Run the comparison (or one ``--case``); returns the results, prints Markdown tables."""
    global BATCH
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=CASES)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=3, help="interleaved pairs of step-time runs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=BATCH, help="preference pairs per step")
    ap.add_argument("--no-memory", action="store_true",
                    help="skip the memory runs; the peaks of the timing runs (default allocator) are printed")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    BATCH = args.batch
    if args.case:
        r = run_case(args.case, args.steps)
        print(json.dumps(r))
        return r
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "BENCH_THREADS": str(args.threads),
           "BENCH_BATCH": str(args.batch)}
    env_mem = {**env, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    print("| pair | lmstack step (s) | TRL step (s) | ratio |\n|---|---|---|---|")
    ratios, runs = [], []
    for i in range(args.pairs):
        a, b = _run("dpo-lmstack", args.steps, env), _run("dpo-trl", args.steps, env)
        runs.append((a, b))
        ratios.append(a["step_s"] / b["step_s"])
        print(f"| {i + 1} | {a['step_s']:.2f} | {b['step_s']:.2f} | {ratios[-1]:.2f}x |", flush=True)
    med = statistics.median(ratios)
    print(f"\nstep time ratios, sorted: {', '.join(f'{r:.2f}x' for r in sorted(ratios))}; median {med:.2f}x "
          f"({'met' if med <= 0.7 else 'not met'} against the 0.7x target)")
    mem = [runs[-1][0], runs[-1][1]] if args.no_memory else [_run(c, 1, env_mem) for c in CASES]
    print("\n| case | rows x T | peak RSS (MiB) | above pre-load (MiB) |\n|---|---|---|---|")
    for r in mem:
        print(f"| {r['case']} | {r['rows']} x {r['seq_len']} | {r['peak_rss_mib']:,.0f} | "
              f"{r['peak_above_load_mib']:,.0f} |")
    above = mem[0]["peak_above_load_mib"] / mem[1]["peak_above_load_mib"]
    total = mem[0]["peak_rss_mib"] / mem[1]["peak_rss_mib"]
    print(f"\npeak memory lmstack / TRL: above pre-load {above:.2f}x, total {total:.2f}x "
          f"({'met' if above <= 0.8 else 'not met'} against the 0.8x target, above pre-load)")
    result = {"ratios": ratios, "median_ratio": med, "runs": runs, "memory": mem, "memory_ratio_above_load": above,
              "memory_ratio_total": total, "data": runs[0][0]["data"] if runs else None}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
