"""GRPO step time against TRL's ``GRPOTrainer`` (+ PEFT LoRA), and generation throughput inside
GRPO against the engine serving the same requests.

    .venv/bin/python bench/align_grpo.py --pairs 2        # 2 interleaved pairs, 2 threads
    .venv/bin/python bench/align_grpo.py --case lmstack   # one side (what the driver runs per process)

Both sides: SmolLM2-135M-Instruct (the embedded GGUF, exported once to a Hugging Face folder so
both load the same fp32 weights), LoRA r=16, alpha=32 on all seven projections, 2 prompts of
the shipped task set (arithmetic and JSON answers) x G = 8 completions of at most 24 tokens at
temperature 1, the ``exact_match`` reward, scaled group advantages, the ``grpo`` loss, beta 0
(no reference pass), one update per generation batch, AdamW at lr 1e-5, fp32, the same
threads. A step is everything between two optimizer updates: sampling, rewards, advantages,
log-probs, backward, update. lmstack samples with its engine over the live weights; TRL with
``transformers`` ``generate`` on the PEFT model (its default without vLLM). Each side runs in
its own process, ``--steps`` steps, and reports the median step after the first (warm-up);
pairs alternate so both sides of a pair see the same machine.

The lmstack side also reports the engine's throughput on the same 16 requests outside
training (the base model in eval mode, no adapters: what ``lmstack serve`` would do with
them), beside the generation tokens/s measured inside the GRPO step.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = 2
G = 8
MAX_NEW = 24


def _rows() -> list[dict]:
    from lmstack.train.align_data import read_prompts

    rows = [ex for ex in read_prompts("builtin:tasks-train") if ex.extra.get("kind") in ("arithmetic", "format")]
    return rows[:PROMPTS]


def case_lmstack(folder: str, steps: int) -> dict:
    import torch

    from lmstack.infer.llm import LLM
    from lmstack.infer.sampling import SamplingParams
    from lmstack.peft.config import PEFTConfig
    from lmstack.train.grpo import encode_prompt, grpo
    from lmstack.train.grpo_config import GRPOConfig
    from lmstack.train.rewards import RewardSpec
    from lmstack.train.rollout import sample

    rows = _rows()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "prompts.jsonl"
        data.write_text("".join(json.dumps({"prompt": ex.prompt, **ex.extra}) + "\n" for ex in rows))
        # Serving: the engine on the plain model, the same 16 requests, no training around it.
        llm = LLM.load(folder)
        ids = [encode_prompt(llm.tokenizer, ex.prompt, 256) for ex in rows]
        p = SamplingParams(max_new_tokens=MAX_NEW, temperature=1.0)
        sample(llm.model, llm.tokenizer, ids[:1], 2, p, seed=1)  # warm-up
        serve = sample(llm.model, llm.tokenizer, ids, G, p, seed=0)
        del llm
        cfg = GRPOConfig(model=folder, data=str(data), val_data="", out_dir=str(Path(tmp) / "run"),
                         batch_size=PROMPTS, num_generations=G, max_completion_len=MAX_NEW, max_prompt_len=256,
                         temperature=1.0, rewards=[RewardSpec("exact_match")], beta=0.0, num_iterations=1,
                         logp_batch=G * PROMPTS, max_steps=steps, lr=1e-5, min_lr=1e-5, warmup_steps=0,
                         schedule="constant", ckpt_interval=1000, eval_interval=1000, measure=False,
                         peft=PEFTConfig(method="lora", r=16, alpha=32), progress=False,
                         threads=torch.get_num_threads())
        grpo(cfg)
        recs = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "step_time_s" in r][1:]
    return {"case": "lmstack grpo (engine rollouts, LoRA)", "step_s": statistics.median(r["step_time_s"] for r in recs),
            "gen_s": statistics.median(r["gen_s"] for r in recs),
            "gen_tokens_per_s": statistics.median(r["gen_tokens_per_s"] for r in recs),
            "completion_len": statistics.median(r["completion_len"] for r in recs),
            "serve_tokens_per_s": serve.tokens_per_s, "serve_completion_len": serve.tokens / len(serve.texts)}


def case_trl(folder: str, steps: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from lmstack.train.rewards import exact_match

    rows = _rows()
    ds = Dataset.from_list([{"prompt": ex.prompt, "answer": ex.extra["answer"]} for ex in rows] * steps)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    tok = AutoTokenizer.from_pretrained(folder)
    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    def reward(prompts, completions, answer, **_):
        return exact_match(prompts, completions, answer=answer)

    with tempfile.TemporaryDirectory() as tmp:
        args = GRPOConfig(output_dir=tmp, per_device_train_batch_size=PROMPTS * G, gradient_accumulation_steps=1,
                          num_generations=G, max_completion_length=MAX_NEW, temperature=1.0, top_p=1.0,
                          beta=0.0, num_iterations=1, loss_type="grpo", scale_rewards="group", learning_rate=1e-5,
                          lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_steps=steps,
                          use_cpu=True, bf16=False, logging_steps=1, report_to=[], save_strategy="no", seed=0,
                          shuffle_dataset=False, dataloader_num_workers=0)
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok,
                              peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                     "gate_proj", "up_proj", "down_proj"]),
                              callbacks=[Timer()])
        trainer.train()
        lens = [r["completions/mean_length"] for r in trainer.state.log_history if "completions/mean_length" in r]
    return {"case": "TRL GRPOTrainer + PEFT LoRA (transformers generate)", "step_s": statistics.median(times[1:]),
            "completion_len": statistics.median(lens[1:]) if len(lens) > 1 else None}


def _export() -> str:
    folder = tempfile.mkdtemp(prefix="grpo-bench-")
    subprocess.run([sys.executable, "-c", f"from lmstack import LLM; LLM.load().save({folder!r}, format='hf')"],
                   check=True)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=["lmstack", "trl"])
    ap.add_argument("--model", help="a Hugging Face folder (the driver exports the embedded model once)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.case:
        import torch

        torch.set_num_threads(args.threads)
        fn = case_lmstack if args.case == "lmstack" else case_trl
        print(json.dumps(fn(args.model, args.steps)))
        return
    folder = _export()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    print("| pair | lmstack step (s) | TRL step (s) | ratio | lmstack gen tok/s in GRPO | engine serving tok/s |\n"
          "|---|---|---|---|---|---|")
    ratios = []
    try:
        _pairs(args, folder, env, ratios)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"\nratios, sorted: {', '.join(f'{r:.2f}x' for r in sorted(ratios))}; median {statistics.median(ratios):.2f}x")


def _pairs(args, folder: str, env: dict, ratios: list[float]) -> None:
    for i in range(args.pairs):
        res = {}
        for c in ("lmstack", "trl"):
            p = subprocess.run([sys.executable, __file__, "--case", c, "--model", folder, "--steps", str(args.steps),
                                "--threads", str(args.threads)], env=env, capture_output=True, text=True)
            if p.returncode != 0:
                raise SystemExit(f"{c}: failed\n{p.stderr[-3000:]}")
            res[c] = json.loads(p.stdout.strip().splitlines()[-1])
            print(json.dumps(res[c]), file=sys.stderr, flush=True)
        a, b = res["lmstack"], res["trl"]
        ratios.append(a["step_s"] / b["step_s"])
        print(f"| {i + 1} | {a['step_s']:.1f} | {b['step_s']:.1f} | {ratios[-1]:.2f}x | {a['gen_tokens_per_s']:.0f} | "
              f"{a['serve_tokens_per_s']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
