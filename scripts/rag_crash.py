"""Kill RAG ingestion at random moments and check that the store stays sound.

    python scripts/rag_crash.py --kills 200 [--store-kind sqlite|pg] [--seed 0]

A corpus of text and Markdown files (cut from the offline Wikipedia sample when it is
installed, else generated) is ingested again and again by a child process that is sent SIGKILL
after a random delay: 50% to 95% of the time an uninterrupted round takes (measured on a
first round, then a running estimate). Before every round about 30% of the files are edited and a few deleted or added, so
each round has real writes to do and kills land in adds, updates and deletes alike. After every kill the store is reopened and checked
(``Store.check``: chunks without vectors, vectors without chunks, duplicates, chunks without a
document, graph/full-text index mismatches must all be 0). At the end one uninterrupted ingest
runs, and the store must hold exactly the chunks that a fresh store built from the final
folder holds (same chunk ids, same vectors).

The child embeds with the torch-free hashing embedder so a round costs a process start, not a
model load; half of the rounds use the embedded store's HNSW graph (``hnsw_min`` low), half its
exact search. Prints one JSON summary line; exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = """
import sys
from lmstack.rag.ingest import IngestConfig, ingest
from lmstack.rag.embed import get_embedder
store_spec, src, hnsw_min = sys.argv[1], sys.argv[2], int(sys.argv[3])
if store_spec.startswith("postgresql://"):
    from lmstack.rag.pg_store import PGStore
    store = PGStore.open(store_spec, create=True, table_prefix="crash")
else:
    from lmstack.rag.sqlite_store import SQLiteStore
    store = SQLiteStore.open(store_spec, hnsw_min=hnsw_min)
ingest(store, [src], get_embedder("hash:64"), IngestConfig(embedder="hash:64", batch_size=16, chunk_tokens=64,
       overlap_tokens=8), progress=False)
store.close()
"""


def corpus_texts(n: int, rng: random.Random) -> list[str]:
    try:
        from lmstack.data.readers import SourceConfig, read_source

        texts = [d.text for d in read_source(SourceConfig(name="wiki", kind="wikipedia"))]
    except Exception:  # noqa: BLE001 -- the sample is optional here; fall back to generated text
        texts = []
    if not texts:
        words = "river castle engine violin harbour lantern quartz meadow signal orbit canyon ledger".split()
        texts = [". ".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(40)) for _ in range(30)]
    pieces = []
    for t in texts:
        for s in range(0, len(t), 3000):
            pieces.append(t[s:s + 3000])
    rng.shuffle(pieces)
    return pieces[:n]


def mutate(src: Path, pool: list[str], rng: random.Random, share: float = 0.3) -> None:
    """Edit about ``share`` of the files (so the next ingest has real writes to do), delete or
    add a few."""
    files = sorted(src.iterdir())
    removed = 0
    for f in rng.sample(files, k=max(1, int(share * len(files)))):
        if rng.random() < 0.1 and len(files) - removed > 10:
            f.unlink()
            removed += 1
        else:
            f.write_text(f.read_text() + "\n\nAppended paragraph number " + str(rng.randint(0, 10**6)) + ".")
    for _ in range(removed + rng.randint(0, 1)):  # the folder keeps about its size
        name = f"new-{rng.randint(0, 10**9)}.{rng.choice(['txt', 'md'])}"
        (src / name).write_text(rng.choice(pool))


def open_store(spec: str, hnsw_min: int):
    if spec.startswith("postgresql://"):
        from lmstack.rag.pg_store import PGStore

        return PGStore.open(spec, create=True, table_prefix="crash")
    from lmstack.rag.sqlite_store import SQLiteStore

    return SQLiteStore.open(spec, hnsw_min=hnsw_min)


def snapshot(store) -> dict[str, str]:
    """chunk id -> a digest of its vector, over every document."""
    import hashlib

    out = {}
    for key in store.documents():
        chunks = store.doc_chunks(key)
        vecs = store.get_vectors([c.id for c in chunks])
        for c, v in zip(chunks, vecs):
            out[c.id] = hashlib.sha1(v.round(5).tobytes()).hexdigest()
    return out


def run(kills: int, seed: int, store_kind: str, files: int, max_delay: float) -> dict:
    rng = random.Random(seed)
    work = Path(tempfile.mkdtemp(prefix="rag-crash-"))
    src = work / "docs"
    src.mkdir()
    pool = corpus_texts(files * 2, rng)
    for i, text in enumerate(pool[:files]):
        (src / f"doc-{i:04d}.{'md' if i % 3 == 0 else 'txt'}").write_text(text)
    server = None
    if store_kind == "pg":
        from lmstack.rag.pg_server import start_local

        server = work / "pg"
        spec = start_local(server)
    else:
        spec = str(work / "store")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    failures, killed, finished, t0 = [], 0, 0, time.time()
    mid_write, last_gen = 0, None  # kills after the child had committed at least one write
    # One uninterrupted round first: its time (and later finished rounds') aims the kills inside a round.
    mutate(src, pool, rng)
    started = time.time()
    subprocess.run([sys.executable, "-c", CHILD, spec, str(src), str(10**9)], env=env, capture_output=True)
    duration = time.time() - started
    for round_ in range(kills):
        hnsw_min = 20 if round_ % 2 else 10**9
        mutate(src, pool, rng)
        started = time.time()
        child = subprocess.Popen([sys.executable, "-c", CHILD, spec, str(src), str(hnsw_min)], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(0.5, 0.95) * min(duration, max_delay))
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
            killed += 1
        else:
            finished += 1
            duration = 0.7 * duration + 0.3 * (time.time() - started)
        _, err = child.communicate()
        if child.returncode not in (0, -signal.SIGKILL):
            failures.append(f"round {round_}: child exited {child.returncode}: {err.decode()[-300:]}")
        try:
            store = open_store(spec, hnsw_min)
            problems = {k: v for k, v in store.check().items() if v}
            gen = getattr(store, "generation", None)
            if gen is not None and last_gen is not None and gen > last_gen and child.returncode == -signal.SIGKILL:
                mid_write += 1
            last_gen = gen
            store.close()
            if problems:
                failures.append(f"round {round_}: check found {problems}")
        except Exception as e:  # noqa: BLE001 -- any reopen failure is what this script looks for
            failures.append(f"round {round_}: reopen failed: {type(e).__name__}: {e}")
    # one uninterrupted ingest completes the corpus; it must equal a fresh build of the same folder
    final = subprocess.run([sys.executable, "-c", CHILD, spec, str(src), "20"], env=env, capture_output=True)
    if final.returncode:
        failures.append(f"final ingest exited {final.returncode}: {final.stderr.decode()[-300:]}")
    fresh = str(work / "fresh")
    subprocess.run([sys.executable, "-c", CHILD, fresh, str(src), "20"], env=env, check=True, capture_output=True)
    store, ref = open_store(spec, 20), open_store(fresh, 20)
    got, want = snapshot(store), snapshot(ref)
    n_docs, n_files = len(store.documents()), len(list(src.iterdir()))
    problems = {k: v for k, v in store.check().items() if v}
    store.close()
    ref.close()
    if problems:
        failures.append(f"after the final ingest, check found {problems}")
    if got != want:
        failures.append(f"after the final ingest the store differs from a fresh build: {len(set(got) - set(want))} "
                        f"extra chunks, {len(set(want) - set(got))} missing, "
                        f"{sum(got[k] != want[k] for k in set(got) & set(want))} different vectors")
    if n_docs != n_files:
        failures.append(f"{n_docs} documents stored for {n_files} files")
    if server is not None:
        from lmstack.rag.pg_server import stop

        stop(server)
    shutil.rmtree(work, ignore_errors=True)
    return {"rounds": kills, "killed": killed, "killed_after_a_commit": mid_write, "finished_before_kill": finished, "store": store_kind,
            "files": n_files, "chunks": len(want), "failures": failures[:20], "n_failures": len(failures),
            "seconds": round(time.time() - t0, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--store-kind", choices=("sqlite", "pg"), default="sqlite")
    ap.add_argument("--files", type=int, default=60)
    ap.add_argument("--max-delay", type=float, default=4.0, help="longest wait before the kill, seconds")
    a = ap.parse_args(argv)
    res = run(a.kills, a.seed, a.store_kind, a.files, a.max_delay)
    print(json.dumps(res))
    return 1 if res["n_failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
