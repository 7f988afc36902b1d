"""Data pipeline benchmark.

1. MinHash + LSH near-duplicate detection, lmstack against datasketch on the same documents
   with the same parameters (word shingles, permutations, threshold, seed): time for
   signatures + index queries, and precision/recall on planted near-duplicates.
2. Throughput of each pipeline stage (docs/s, MB/s) on a synthetic corpus, with 2 workers.

    .venv/bin/python bench/data.py [--docs 2000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def near_dup_bench(n_docs: int, num_perm: int, k: int, threshold: float) -> dict:
    from datasketch import MinHash, MinHashLSH

    from lmstack.data.dedup import LSHIndex, MinHasher, normalized_words, shingles
    from lmstack.data.synthetic import planted_duplicates

    ps = planted_duplicates(n_docs=n_docs, n_near=n_docs // 5, n_exact=n_docs // 20,
                            n_partial=n_docs // 10, seed=0)
    truth = ps.near_duplicates | ps.exact_duplicates
    mb = sum(len(t.encode()) for _, t in ps.docs) / 1e6

    def score(found: set[str]) -> tuple[float, float]:
        tp = len(found & truth)
        return tp / max(len(found), 1), tp / len(truth)

    results = {}
    for mode in ("fast", "sha1"):
        t0 = time.perf_counter()
        mh, lsh = MinHasher(num_perm, k, seed=1, hash=mode), LSHIndex(num_perm, threshold, verify=False)
        found = {d for d, t in ps.docs if lsh.add_if_new(d, mh.signature(t)) is not None}
        dt = time.perf_counter() - t0
        p, r = score(found)
        results[f"lmstack ({mode})"] = {"seconds": dt, "docs_per_s": len(ps.docs) / dt, "mb_per_s": mb / dt,
                                        "precision": p, "recall": r}
    # datasketch, fed the identical shingles; query-then-insert in stream order like lmstack.
    t0 = time.perf_counter()
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    found = set()
    for d, t in ps.docs:
        m = MinHash(num_perm=num_perm, seed=1)
        m.update_batch([s.encode() for s in shingles(normalized_words(t), k)])
        if lsh.query(m):
            found.add(d)
        else:
            lsh.insert(d, m)
    dt = time.perf_counter() - t0
    p, r = score(found)
    results["datasketch"] = {"seconds": dt, "docs_per_s": len(ps.docs) / dt, "mb_per_s": mb / dt,
                             "precision": p, "recall": r}
    for name in ("lmstack (fast)", "lmstack (sha1)"):
        results[name]["speedup_vs_datasketch"] = results["datasketch"]["seconds"] / results[name]["seconds"]
    return {"docs": len(ps.docs), "mb": mb, "num_perm": num_perm, "shingle_words": k,
            "threshold": threshold, "planted": len(truth), "results": results}


def pipeline_bench(n_docs: int, workers: int) -> dict:
    from lmstack.config import config_from_dict
    from lmstack.data.pipeline import PrepareConfig, prepare
    from lmstack.data.synthetic import planted_duplicates
    from lmstack.tokenizer.train import TokenizerTrainConfig, train_tokenizer

    ps = planted_duplicates(n_docs=n_docs, n_near=n_docs // 10, n_exact=n_docs // 20, n_partial=0, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "c.jsonl").write_text("".join(json.dumps({"id": d, "text": t}) + "\n" for d, t in ps.docs))
        train_tokenizer((t for _, t in ps.docs[:500]), TokenizerTrainConfig(vocab_size=2048)).save(root / "tok")
        cfg = config_from_dict(PrepareConfig, {
            "output": str(root / "out"), "tokenizer": str(root / "tok"), "workers": workers,
            "progress": False, "clean": {"pii": True},
            "sources": [{"name": "c", "kind": "jsonl", "paths": [str(root / "c.jsonl")], "id_field": "id"}],
            "decontam": {"eval_sets": [{"name": "e", "kind": "jsonl", "paths": [str(root / "c.jsonl")],
                                        "max_docs": 20}], "action": "flag"},
        })
        t0 = time.perf_counter()
        report = prepare(cfg)
        total = time.perf_counter() - t0
    return {"docs": len(ps.docs), "workers": workers, "wall_seconds": total,
            "throughput": report["throughput"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--num-perm", type=int, default=128)
    ap.add_argument("--shingle", type=int, default=5)
    ap.add_argument("--threshold", type=float, default=0.7)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    out = {"near_dup": near_dup_bench(a.docs, a.num_perm, a.shingle, a.threshold),
           "pipeline": pipeline_bench(a.docs, a.workers)}
    nd = out["near_dup"]
    print(f"near-duplicates: {nd['docs']} docs ({nd['mb']:.1f} MB), {nd['planted']} planted, "
          f"num_perm={nd['num_perm']}, {nd['shingle_words']}-word shingles, threshold={nd['threshold']}")
    print("| implementation | seconds | docs/s | MB/s | precision | recall | speed vs datasketch |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in nd["results"].items():
        print(f"| {name} | {r['seconds']:.2f} | {r['docs_per_s']:,.0f} | {r['mb_per_s']:.2f} | "
              f"{r['precision']:.3f} | {r['recall']:.3f} | {r.get('speedup_vs_datasketch', 1.0):.2f}x |")
    pl = out["pipeline"]
    print(f"\npipeline: {pl['docs']} docs, {pl['workers']} workers, {pl['wall_seconds']:.1f} s wall")
    print("| stage | docs/s | MB/s |\n|---|---:|---:|")
    for name, t in pl["throughput"].items():
        print(f"| {name} | {t['docs_per_s']:,.0f} | {t['mb_per_s']:.2f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
