"""Decoding on a busy machine: thread count and OpenMP wait policy, with and without a
competing CPU-bound process.

On a machine whose cores are shared, threads that spin-wait at each parallel region's barrier
wait for a sibling that the scheduler has handed to another process: a decode step then
takes a scheduler time slice instead of microseconds. This script decodes with the embedded
SmolLM2 (greedy, EOS ignored) in a fresh process per run, for each setting, on a quiet
machine and beside ``--competitors`` busy-looping processes, interleaving the settings over
``--repeats`` rounds, and prints the medians and each setting's ratio to one thread.

    python bench/threads.py               # passive (lmstack's default), spinning, 1 thread
    python bench/threads.py --repeats 5 --competitors 1 2

"spinning" leaves ``OMP_WAIT_POLICY`` and ``GOMP_SPINCOUNT`` unset: GNU OpenMP's default,
which spins for a while at each barrier before it sleeps, and what torch gets when nothing
sets them.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time

SETTINGS = {  # name: (threads, extra environment)
    "passive, all cores": (0, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "spinning (OpenMP's default), all cores": (0, {}),
    "1 thread": (1, {"OMP_WAIT_POLICY": "PASSIVE"}),
}


def worker(threads: int, new_tokens: int) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    from lmstack import LLM

    llm = LLM.load()
    llm.generate("Hello", max_new_tokens=4, ignore_eos=True)  # first-call costs out of the timing
    t0 = time.perf_counter()
    llm.generate("Tell me a story about a cat who learns to sail.", max_new_tokens=new_tokens, ignore_eos=True)
    return {"threads": torch.get_num_threads(), "tok_s": new_tokens / (time.perf_counter() - t0)}


def busy() -> None:
    while True:
        pass


def run(setting: str, new_tokens: int) -> float:
    threads, extra = SETTINGS[setting]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(extra)
    p = subprocess.run([sys.executable, __file__, "--worker", str(threads), "--new-tokens", str(new_tokens)],
                       env=env, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"{setting}: failed\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])["tok_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--competitors", type=int, nargs="+", default=[0, 1],
                    help="busy-looping processes beside the decode (0 = quiet)")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker is not None:
        print(json.dumps(worker(a.worker, a.new_tokens)))
        return
    results: dict[tuple[int, str], list[float]] = {}
    for n in a.competitors:
        procs = [multiprocessing.Process(target=busy, daemon=True) for _ in range(n)]
        for p in procs:
            p.start()
        try:
            for r in range(a.repeats):
                for s in (list(SETTINGS) if r % 2 == 0 else list(reversed(SETTINGS))):
                    results.setdefault((n, s), []).append(run(s, a.new_tokens))
                    print(f"  {n} competing, {s}: {results[(n, s)][-1]:.1f} tok/s", file=sys.stderr)
        finally:
            for p in procs:
                p.terminate()
    print(f"\n{time.strftime('%Y-%m-%d')} | {platform.processor() or platform.machine()} | "
          f"{os.cpu_count()} cores | {a.new_tokens} greedy tokens | {a.repeats} runs each, medians\n")
    print("| competing busy processes | setting | decode tok/s | runs | vs 1 thread |\n|---|---|---|---|---|")
    for n in a.competitors:
        one = statistics.median(results[(n, "1 thread")])
        for s in SETTINGS:
            xs = results[(n, s)]
            print(f"| {n} | {s} | {statistics.median(xs):.1f} | {', '.join(f'{x:.1f}' for x in xs)} | "
                  f"{statistics.median(xs) / one:.2f}x |")


if __name__ == "__main__":
    main()
