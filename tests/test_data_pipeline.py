"""``prepare`` end to end: shards decode to the kept documents, resume is byte-identical,
mixtures follow their weights, every recipe loads, the CLI reports errors without a trace."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest

from lmstack.cli.main import main
from lmstack.config import load_config
from lmstack.data.pipeline import PrepareConfig, mix_sources, prepare, split_of
from lmstack.data.readers import ReadStats, SourceConfig
from lmstack.data.shards import TokenShards
from lmstack.data.synthetic import planted_duplicates, random_text
from lmstack.errors import ConfigError
from lmstack.tokenizer.tokenizer import Tokenizer
from lmstack.tokenizer.train import TokenizerTrainConfig, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """A JSONL corpus with planted duplicates, a text folder with a bad file, an eval set."""
    root = tmp_path_factory.mktemp("corpus")
    ps = planted_duplicates(n_docs=120, n_near=15, n_exact=8, n_partial=10, words=(80, 250), seed=11)
    rng = random.Random(12)
    eval_items = [random_text(rng, 30) for _ in range(5)]
    lines = [json.dumps({"id": d, "text": t}) for d, t in ps.docs]
    contaminated = "Intro words here. " + eval_items[2] + " " + random_text(rng, 100)
    lines.insert(50, json.dumps({"id": "contaminated", "text": contaminated}))
    lines.insert(20, json.dumps({"id": "short", "text": "Too short to keep."}))
    (root / "web.jsonl").write_text("\n".join(lines) + "\n")
    (root / "books").mkdir()
    for i in range(6):
        (root / "books" / f"b{i}.txt").write_text(random_text(rng, 600))
    (root / "books" / "broken.txt").write_bytes(b"\xff\xfe broken")
    (root / "eval.jsonl").write_text("".join(json.dumps({"question": q}) + "\n" for q in eval_items))
    tok = train_tokenizer((t for _, t in ps.docs), TokenizerTrainConfig(vocab_size=600))
    tok.save(root / "tok")
    return {"root": root, "planted": ps, "tokenizer": str(root / "tok")}


def _config(corpus: dict, out: Path, **kw) -> PrepareConfig:
    root = corpus["root"]
    d = {
        "output": str(out), "tokenizer": corpus["tokenizer"], "shard_tokens": 4000,
        "val_fraction": 0.1, "workers": 1, "progress": False,
        "sources": [{"name": "web", "kind": "jsonl", "paths": [str(root / "web.jsonl")], "id_field": "id"},
                    {"name": "books", "kind": "text", "paths": [str(root / "books")]}],
        "dedup": {"threshold": 0.7},
        "decontam": {"eval_sets": [{"name": "bench", "kind": "jsonl", "paths": [str(root / "eval.jsonl")],
                                    "fields": ["question"]}]},
    }
    d.update(kw)
    from lmstack.config import config_from_dict

    return config_from_dict(PrepareConfig, d)


def _kept(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "documents.jsonl").read_text().splitlines()]


def test_prepare_end_to_end(corpus, tmp_path):
    out = tmp_path / "run"
    report = prepare(_config(corpus, out, workers=2))
    ps = corpus["planted"]
    removed = {r: v["docs"] for r, v in report["removed"].items()}
    kept = _kept(out)
    kept_ids = {k["id"] for k in kept}
    # Every planted exact copy is gone, most near copies too, the eval text and short doc are gone.
    assert not {f"web:{d}" for d in ps.exact_duplicates} & kept_ids
    assert len({f"web:{d}" for d in ps.near_duplicates} - kept_ids) >= 12
    assert "web:contaminated" not in kept_ids and "web:short" not in kept_ids
    assert removed["decontam/contaminated"] == 1 and removed["quality/too_few_words"] == 1
    # Near copies that happened to get no edit are exact copies too.
    n_exact = removed["exact_dedup/duplicate"]
    assert len(ps.exact_duplicates) <= n_exact <= len(ps.exact_duplicates | ps.near_duplicates)
    assert all(f"web:doc{i}" in kept_ids for i in range(120))  # no original was lost
    assert len(report["read_errors"]) == 1 and "broken.txt" in report["read_errors"][0]["where"]
    # The steps form a chain: what leaves one step enters the next.
    steps = report["steps"]
    chain = ["read", "clean", "quality", "exact_dedup", "near_dedup", "decontam", "tokenize"]
    for a, b in zip(chain, chain[1:]):
        assert steps[a]["docs_out"] == steps[b]["docs_in"]
    assert steps["tokenize"]["docs_out"] == len(kept)
    assert sum(v["docs"] for v in report["removed"].values()) == steps["read"]["docs_in"] - len(kept)

    # Shards decode back to exactly the kept documents, split by split, in order.
    tok = Tokenizer.load(out / "tokenizer")
    for split in ("train", "val"):
        data = TokenShards(out, split)
        expected = [k for k in kept if split_of(k["id"], 0.1, 0) == split]
        assert data.doc_ids() == [k["id"] for k in expected]
        decoded = [tok.decode(ids.tolist()) for ids in data.documents()]
        assert decoded == [k["text"] for k in expected]
        assert data.num_docs == len(expected)
    train = TokenShards(out, "train")
    meta = train.meta
    assert len(meta["shards"]) > 3 and meta["complete"] and train.dtype == np.dtype("<u2")
    assert meta["splits"]["train"]["num_tokens"] == train.num_tokens
    assert sum(s["tokens"] for s in meta["sources"].values()) == train.num_tokens + meta["splits"]["val"]["num_tokens"]
    # A window across a shard boundary equals the concatenated shards.
    full = np.concatenate([np.fromfile(out / f"{n}.bin", dtype="<u2") for n in train.names]).astype(np.int64)
    border = meta["shards"][0]["num_tokens"]
    np.testing.assert_array_equal(train.get_window(border - 7, 20), full[border - 7:border + 13])
    assert int((full == train.eos_token_id).sum()) == meta["splits"]["train"]["num_docs"]
    windows = train.random_windows(4, 33, np.random.default_rng(0))
    assert windows.shape == (4, 33)
    with pytest.raises(IndexError):
        train.get_window(train.num_tokens - 5, 10)
    for name in ("report.json", "report.md", "report.html", "report.png"):
        assert (out / name).is_file()
    assert "decontam/contaminated" in (out / "report.md").read_text()


def test_worker_count_does_not_change_output_and_resume_is_byte_identical(corpus, tmp_path):
    ref = tmp_path / "ref"
    prepare(_config(corpus, ref, workers=1))

    run = tmp_path / "run"
    written = []

    def crash_after_three(info):
        written.append(info["name"])
        if len(written) == 3:
            raise KeyboardInterrupt  # the run dies right after its third shard is listed

    with pytest.raises(KeyboardInterrupt):
        prepare(_config(corpus, run, workers=2), on_shard=crash_after_three)
    meta = json.loads((run / "meta.json").read_text())
    assert not meta["complete"] and len(meta["shards"]) == 3
    with pytest.raises(ConfigError, match="did not finish"):
        TokenShards(run)
    # Debris of a half-written shard: it must neither be listed nor survive into the result.
    (run / ".train_00009.bin.123.tmp").write_bytes(b"partial")
    (run / "train_00009.bin").write_bytes(b"half a shard")

    resumed = []
    report = prepare(_config(corpus, run, workers=2), on_shard=lambda i: resumed.append(i["name"]))
    assert not set(resumed) & set(written)  # finished shards were not written again
    assert any("resumed" in n for n in report["notes"])
    ref_meta, run_meta = (json.loads((d / "meta.json").read_text()) for d in (ref, run))
    assert ref_meta["shards"] == run_meta["shards"]
    for s in ref_meta["shards"]:
        for ext in (".bin", ".idx.npy", ".ids.txt"):
            assert (ref / (s["name"] + ext)).read_bytes() == (run / (s["name"] + ext)).read_bytes()
    # Running a finished config again does nothing; a different config in the same folder is refused.
    assert prepare(_config(corpus, run, workers=2))["steps"] == report["steps"]
    with pytest.raises(ConfigError, match="different config"):
        prepare(_config(corpus, run, shard_tokens=999))


def test_mixture_follows_weights(tmp_path):
    rng = random.Random(3)
    for name, n in (("a", 300), ("b", 300)):
        (tmp_path / f"{name}.jsonl").write_text(
            "".join(json.dumps({"text": random_text(rng, rng.randint(20, 200))}) + "\n" for _ in range(n)))
    a = SourceConfig(name="a", kind="jsonl", paths=[str(tmp_path / "a.jsonl")], weight=0.7)
    b = SourceConfig(name="b", kind="jsonl", paths=[str(tmp_path / "b.jsonl")], weight=0.3)
    docs = list(mix_sources([a, b], ReadStats(), "first_exhausted"))
    chars = {s: sum(len(d.text) for d in docs if d.source == s) for s in ("a", "b")}
    assert abs(chars["a"] / (chars["a"] + chars["b"]) - 0.7) < 0.01
    assert sum(d.source == "a" for d in docs) == 300  # a, the scarcer by weight, ran out first
    first_b = next(i for i, d in enumerate(docs) if d.source == "b")
    assert first_b < 5  # interleaved, not one source after the other
    both = list(mix_sources([a, b], ReadStats(), "all_exhausted"))
    assert len(both) == 600
    unweighted = list(mix_sources([dataclasses.replace(a, weight=None), dataclasses.replace(b, weight=None)],
                                  ReadStats()))
    assert [d.source for d in unweighted] == ["a"] * 300 + ["b"] * 300
    with pytest.raises(ConfigError, match="every source a weight"):
        PrepareConfig(output="x", sources=[a, dataclasses.replace(b, weight=None)])


def test_split_is_stable_and_close_to_fraction():
    ids = [f"doc{i}" for i in range(20000)]
    val = sum(split_of(i, 0.05, 0) == "val" for i in ids)
    assert abs(val / len(ids) - 0.05) < 0.006
    assert [split_of(i, 0.05, 0) for i in ids[:50]] == [split_of(i, 0.05, 0) for i in ids[:50]]
    assert [split_of(i, 0.05, 0) for i in ids] != [split_of(i, 0.05, 1) for i in ids]


def test_every_shipped_recipe_loads():
    recipes = sorted((ROOT / "recipes" / "data").glob("*.yaml"))
    assert len(recipes) == 3, [r.name for r in recipes]
    for r in recipes:
        cfg = load_config(PrepareConfig, r)
        assert cfg.sources and cfg.output


def test_cli_prepare_and_errors(corpus, tmp_path, capsys):
    import yaml

    cfg = dataclasses.asdict(_config(corpus, tmp_path / "cli"))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["data", "prepare", str(path), "--workers", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "kept" in out and "train:" in out and "report.md" in out
    assert main(["data", "info", str(tmp_path / "cli")]) == 0
    assert json.loads(capsys.readouterr().out)["complete"] is True

    cfg["dedup"]["threshold"] = 1.5
    path.write_text(yaml.safe_dump(cfg))
    assert main(["data", "prepare", str(path)]) == 2
    assert "threshold" in capsys.readouterr().err
    cfg["dedup"]["threshold"] = 0.8
    cfg["sources"][0]["paths"] = [str(tmp_path / "missing.jsonl")]
    path.write_text(yaml.safe_dump(cfg))
    assert main(["data", "prepare", str(path), "--output", str(tmp_path / "other")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
