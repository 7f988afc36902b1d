"""LoRA / QLoRA fine-tuning on one CUDA GPU: lmstack against transformers + PEFT.

    python bench/train_cuda.py                       # all cases, prints a Markdown table
    python bench/train_cuda.py --preset smollm2-360m --batch 8 --seq 512

The model is the preset's shape (default SmolLM2-135M) with random weights (seed 0), written
once as a Hugging Face folder that both sides load, so no download is needed; step time and
memory do not depend on the weight values. The batch is random token ids with the loss on the
last 40% of each row (an SFT-like mask), fp32 weights, bf16 autocast on both sides, LoRA r=8,
alpha=16 on all seven projections, AdamW. Each case runs in its own process.

Memory is ``torch.cuda.max_memory_allocated`` over the whole process (load included), the
figure the QLoRA paper and PEFT report: tensors only, no CUDA context or allocator cache.
Step time is the median of 5 steps after 2 warm-ups, synchronised.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = ["lora-lmstack", "qlora-lmstack", "lora-peft", "lora-ckpt-lmstack", "qlora-ckpt-lmstack", "lora-ckpt-peft"]


def _batch(vocab: int, B: int, T: int):
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (B, T + 1), generator=g)
    targets = ids[:, 1:].clone()
    targets[:, : int(T * 0.6)] = -100
    return ids[:, :-1].cuda(), targets.cuda()


def _timed(step) -> tuple[float, int]:
    import torch

    for _ in range(2):
        step()
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), torch.cuda.max_memory_allocated()


def case(name: str, folder: str, B: int, T: int) -> dict:
    import torch

    ckpt = "-ckpt" in name
    if name.endswith("-peft"):
        from transformers import AutoModelForCausalLM

        from train import peft_lora  # bench/train.py: the same PEFT set-up as the CPU comparison

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").cuda()
        model = peft_lora(model, ckpt)
        inputs, targets = _batch(model.config.vocab_size, B, T)
        labels = torch.cat([torch.full_like(targets[:, :1], -100), targets], 1)[:, :-1]  # HF shifts inside

        def loss_fn():
            return model(input_ids=inputs, labels=torch.where(labels == -100, labels, inputs)).loss
    else:
        from lmstack import LLM
        from lmstack.peft import PEFTConfig, apply_peft, base_loader
        from lmstack.train.common import token_loss_sum

        cfg = PEFTConfig(method="qlora" if name.startswith("qlora") else "lora", r=8, alpha=16, group_size=64)
        model = LLM.load(folder, device="cuda", convert=base_loader(cfg)).model
        apply_peft(model, cfg)
        model.gradient_checkpointing = ckpt
        inputs, targets = _batch(model.config.vocab_size, B, T)

        def loss_fn():
            s, n = token_loss_sum(model, inputs, targets)
            return s / n

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sec, peak = _timed(step)
    return {"case": name, "step_s": sec, "tokens_per_s": B * T / sec, "peak_alloc_mib": peak / 2**20,
            "device": torch.cuda.get_device_name()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=CASES)
    ap.add_argument("--folder")
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    if args.case:
        print(json.dumps(case(args.case, args.folder, args.batch, args.seq)))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = str(Path(tmp) / args.preset)
        subprocess.run([sys.executable, "-c", f"from lmstack import LLM; LLM.load({args.preset!r}).save({folder!r}, "
                        "format='hf')"], check=True)
        for c in CASES:
            p = subprocess.run([sys.executable, __file__, "--case", c, "--folder", folder, "--batch", str(args.batch),
                                "--seq", str(args.seq)], capture_output=True, text=True)
            if p.returncode != 0:
                print(f"{c}: failed\n{p.stderr[-3000:]}", file=sys.stderr)
                continue
            results.append(json.loads(p.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    by = {r["case"]: r for r in results}
    print(f"\n{args.preset}, batch {args.batch} x {args.seq}, {results[0]['device'] if results else '?'}\n")
    print("| case | step (ms) | tokens/s | peak allocated (MiB) |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['case']} | {r['step_s'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} | {r['peak_alloc_mib']:,.0f} |")
    for ck in ("", "-ckpt"):
        lo, q, pe = by.get(f"lora{ck}-lmstack"), by.get(f"qlora{ck}-lmstack"), by.get(f"lora{ck}-peft")
        if lo and q:
            print(f"QLoRA/LoRA{ck}: memory {q['peak_alloc_mib'] / lo['peak_alloc_mib']:.2f}x")
        if lo and pe:
            print(f"LoRA{ck} lmstack/PEFT: step time {lo['step_s'] / pe['step_s']:.2f}x, "
                  f"memory {lo['peak_alloc_mib'] / pe['peak_alloc_mib']:.2f}x")


if __name__ == "__main__":
    main()
