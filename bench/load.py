"""Loading the embedded model: time and memory, plain and as a QLoRA base.

    python bench/load.py              # every case, 3 runs each, prints a Markdown table

Cases, each in a process of its own (glibc told to hand freed blocks back at once, as in
``bench/train.py``, so RSS follows the live tensors):

* ``load``: ``LLM.load()`` of SmolLM2-135M-Instruct (fp32, from the GGUF's native cache).
* ``qlora-while-loading``: ``LLM.load(convert=base_loader(cfg))`` then ``apply_peft``: every
  targeted weight quantised to int4 as it is read (what ``lmstack sft`` does).
* ``qlora-after-loading``: ``LLM.load()`` then ``apply_peft``: the fp32 model first, quantised
  after (what a plain load followed by ``apply_peft`` does).

``--stages`` instead prints, for one QLoRA process, the RSS that each stage before the first
training step adds: imports, the tokenizer, the quantised load, the optimizer.

Reported (medians): seconds for the load (and quantisation) in a fresh process, RSS before it
(after importing torch and lmstack) and after it, and the process's peak RSS (VmHWM) less the
RSS before the load.
To compare with an older revision, run this file with ``PYTHONPATH`` set to that checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CASES = ["load", "qlora-while-loading", "qlora-after-loading"]


def _status(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":"))


def case(name: str) -> dict:
    import torch

    import lmstack
    from lmstack import LLM

    torch.set_num_threads(2)
    before = _status("VmRSS")
    t = time.perf_counter()
    if name == "load":  # "load" and "qlora-after-loading" use nothing newer than LLM.load and
        LLM.load()       # apply_peft, so older revisions can run them
    else:
        from lmstack.peft import PEFTConfig, apply_peft

        cfg = PEFTConfig(method="qlora", r=8, alpha=16, quant_bits="int4", group_size=64)
        if name == "qlora-while-loading":
            from lmstack.peft import base_loader

            llm = LLM.load(convert=base_loader(cfg))
        else:
            llm = LLM.load()
        apply_peft(llm.model, cfg)
    sec = time.perf_counter() - t
    return {"case": name, "seconds": sec, "rss_before_mib": before, "rss_after_mib": _status("VmRSS"),
            "peak_above_before_mib": _status("VmHWM") - before, "lmstack": os.path.dirname(lmstack.__file__)}


def stages() -> dict:
    """Where a QLoRA run's memory goes before its first step, stage by stage (RSS in MiB)."""
    import torch

    from lmstack import LLM
    from lmstack.model.gguf_loader import cache_dir
    from lmstack.peft import PEFTConfig, apply_peft, base_loader
    from lmstack.tokenizer import Tokenizer

    torch.set_num_threads(2)
    out = {"imports": _status("VmRSS")}
    Tokenizer.load(next((cache_dir() / "gguf").glob("SmolLM2-135M-Instruct*")))  # the same tokenizer, alone
    out["tokenizer"] = _status("VmRSS") - out["imports"]
    cfg = PEFTConfig(method="qlora", r=8, alpha=16, quant_bits="int4", group_size=64)
    r = _status("VmRSS")
    model = apply_peft(LLM.load(convert=base_loader(cfg)).model, cfg)
    out["qlora load (a second tokenizer included)"] = _status("VmRSS") - r
    out["int4 base tensors (codes and scales)"] = sum(
        b.numel() * b.element_size() for n, b in model.named_buffers()
        if b.dtype == torch.uint8 or n.endswith("scales")) / 2**20
    r = _status("VmRSS")
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    out["building AdamW (imports torch's compiler stack)"] = _status("VmRSS") - r
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=CASES)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--stages", action="store_true", help="one process: the QLoRA memory stage by stage")
    args = ap.parse_args()
    if args.case:
        print(json.dumps(case(args.case)))
        return
    if args.stages:
        for k, v in stages().items():
            print(f"{k}: {v:.0f} MiB")
        return
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    # The first load of a GGUF converts it into the cache: do that once, outside the measured runs.
    subprocess.run([sys.executable, "-c", "from lmstack import LLM; LLM.load()"], env=env, check=True)
    print("| case | load seconds (median) | RSS before (MiB) | RSS after (MiB) | peak above before (MiB) |")
    print("|---|---|---|---|---|")
    for c in CASES:
        runs = []
        for _ in range(args.runs):
            p = subprocess.run([sys.executable, __file__, "--case", c], env=env, capture_output=True, text=True)
            if p.returncode != 0:
                sys.exit(f"{c} failed:\n{p.stderr[-2000:]}")
            runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], float)}
        print(f"| {c} | {med['seconds']:.2f} | {med['rss_before_mib']:.0f} | {med['rss_after_mib']:.0f} | "
              f"{med['peak_above_before_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
