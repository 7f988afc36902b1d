"""Data pipeline benchmark.

1. MinHash + LSH near-duplicate detection, lmstack against datasketch on the same documents
   with the same parameters (word shingles, permutations, threshold, seed): time for
   signatures + index queries, and precision/recall on planted near-duplicates. Precision is
   the share of reports that are planted copies; recall counts the planted copies whose exact
   shingle Jaccard with the document they copy reaches the threshold, overall and per band of
   that Jaccard. lmstack's misses are split into pairs LSH never made candidates and
   candidates whose estimate fell below the threshold; reports of copies just under the
   threshold (their estimate above it) are counted too.
2. Throughput of each pipeline stage (docs/s, MB/s) on a synthetic corpus, with 2 workers.

    .venv/bin/python bench/data.py [--docs 2000] [--threshold 0.8] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path


def near_dup_bench(n_docs: int, num_perm: int, k: int, threshold: float) -> dict:
    from datasketch import MinHash, MinHashLSH

    from lmstack.data.dedup import LSHIndex, MinHasher, normalized_words, shingles
    from lmstack.data.synthetic import planted_duplicates

    ps = planted_duplicates(n_docs=n_docs, n_near=n_docs // 5, n_exact=n_docs // 20,
                            n_partial=n_docs // 10, seed=0)
    mb = sum(len(t.encode()) for _, t in ps.docs) / 1e6
    sets = {d: set(shingles(normalized_words(t), k)) for d, t in ps.docs}

    def jaccard(a: str, b: str) -> float:
        return len(sets[a] & sets[b]) / len(sets[a] | sets[b])

    true_j = {d: jaccard(d, src) for d, src in ps.original.items()}
    truth = {d for d, j in true_j.items() if j >= threshold}
    edges = (threshold, round(threshold + 0.05, 4), round(threshold + 0.1, 4), 1.0)
    buckets = {f"[{lo:.2f}, {hi:.2f}{']' if hi == 1.0 else ')'}":
               {d for d in truth if lo <= true_j[d] < hi or (hi == 1.0 and true_j[d] == 1.0)}
               for lo, hi in itertools.pairwise(edges)}

    def score(matches: dict[str, list[str]], seconds: float) -> dict:
        """``matches``: document -> the indexed documents it was reported to duplicate.
        Precision counts reports of planted copies; a planted copy just under the threshold may
        be reported (its estimate above it), which ``reported_below_threshold`` counts."""
        found = set(matches)
        best = [max(jaccard(d, m) for m in ms) for d, ms in matches.items()]
        return {"seconds": seconds, "docs_per_s": len(ps.docs) / seconds, "mb_per_s": mb / seconds,
                "precision": len(found & set(ps.original)) / max(len(found), 1),
                "recall": len(truth & found) / len(truth),
                "recall_by_jaccard": {b: len(ds & found) / max(len(ds), 1) for b, ds in buckets.items()},
                "reported_below_threshold": sum(j < threshold for j in best),
                "lowest_reported_jaccard": min(best, default=1.0)}

    results = {}
    runs = (("lmstack (fast)", "fast", True), ("lmstack (sha1)", "sha1", True),
            ("lmstack (sha1, no verify)", "sha1", False))
    for name, mode, verify in runs:
        t0 = time.perf_counter()
        mh, lsh = MinHasher(num_perm, k, seed=1, hash=mode), LSHIndex(num_perm, threshold, verify=verify)
        matches, sigs = {}, {}
        for d, t in ps.docs:
            sigs[d] = mh.signature(t)
            dup = lsh.add_if_new(d, sigs[d])
            if dup is not None:
                matches[d] = [dup]
        results[name] = {"bands": [lsh.bands, lsh.rows], "verify": verify,
                         **score(matches, time.perf_counter() - t0)}
        # Why a true pair was missed: the band tables only grow, so asking them now gives the
        # candidates the document had when it was queried.
        missed = truth - set(matches)
        rows = {key: i for i, key in enumerate(lsh.keys)}
        not_cand = sum(rows.get(ps.original[d], -1) not in lsh.candidates(sigs[d]) for d in missed)
        results[name]["missed"] = {"not_candidates": not_cand, "rejected_by_estimate": len(missed) - not_cand}
    # datasketch, fed the identical shingles; query-then-insert in stream order like lmstack.
    t0 = time.perf_counter()
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    matches = {}
    for d, t in ps.docs:
        m = MinHash(num_perm=num_perm, seed=1)
        m.update_batch([s.encode() for s in shingles(normalized_words(t), k)])
        found = lsh.query(m)
        if found:
            matches[d] = found
        else:
            lsh.insert(d, m)
    results["datasketch"] = {"bands": [lsh.b, lsh.r], "verify": False,
                             **score(matches, time.perf_counter() - t0)}
    for r in results.values():
        r["speedup_vs_datasketch"] = results["datasketch"]["seconds"] / r["seconds"]
    js = sorted(true_j[d] for d in truth)
    return {"docs": len(ps.docs), "mb": mb, "num_perm": num_perm, "shingle_words": k,
            "threshold": threshold, "planted": len(ps.original), "true_pairs": len(truth),
            "true_jaccard": {"min": js[0], "median": statistics.median(js), "max": js[-1]},
            "pairs_per_band": {b: len(ds) for b, ds in buckets.items()}, "results": results}


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
    from lmstack.data.dedup import DedupConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--num-perm", type=int, default=128)
    ap.add_argument("--shingle", type=int, default=5)
    ap.add_argument("--threshold", type=float, default=DedupConfig.threshold,
                    help="Jaccard threshold (default: the pipeline's, %(default)s)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    out = {"near_dup": near_dup_bench(a.docs, a.num_perm, a.shingle, a.threshold),
           "pipeline": pipeline_bench(a.docs, a.workers)}
    nd = out["near_dup"]
    tj = nd["true_jaccard"]
    print(f"near-duplicates: {nd['docs']} docs ({nd['mb']:.1f} MB), {nd['planted']} planted copies, "
          f"{nd['true_pairs']} with exact Jaccard >= {nd['threshold']} (min {tj['min']:.3f}, median "
          f"{tj['median']:.3f}, max {tj['max']:.3f}); num_perm={nd['num_perm']}, "
          f"{nd['shingle_words']}-word shingles")
    bands = list(nd["pairs_per_band"])
    print("| implementation | (b, r) | seconds | docs/s | MB/s | precision | recall | "
          + " | ".join(f"recall J in {b} ({n})" for b, n in nd["pairs_per_band"].items())
          + " | speed vs datasketch |")
    print("|---|---|" + "---:|" * (6 + len(bands)))
    for name, r in nd["results"].items():
        print(f"| {name} | ({r['bands'][0]}, {r['bands'][1]}) | {r['seconds']:.2f} | {r['docs_per_s']:,.0f} | "
              f"{r['mb_per_s']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | "
              + " | ".join(f"{r['recall_by_jaccard'][b]:.3f}" for b in bands)
              + f" | {r['speedup_vs_datasketch']:.2f}x |")
    for name, r in nd["results"].items():
        line = (f"{name}: {r['reported_below_threshold']} reported pairs under the threshold "
                f"(lowest exact Jaccard {r['lowest_reported_jaccard']:.3f})")
        if "missed" in r:
            line += (f"; missed {r['missed']['not_candidates']} true pairs that were never candidates, "
                     f"{r['missed']['rejected_by_estimate']} whose estimate fell below the threshold")
        print(line)
    pl = out["pipeline"]
    print(f"\npipeline: {pl['docs']} docs, {pl['workers']} workers, {pl['wall_seconds']:.1f} s wall")
    print("| stage | docs/s | MB/s |\n|---|---:|---:|")
    for name, t in pl["throughput"].items():
        print(f"| {name} | {t['docs_per_s']:,.0f} | {t['mb_per_s']:.2f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
