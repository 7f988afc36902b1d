"""``prepare`` end to end: shards decode to the kept documents, resume is byte-identical,
mixtures follow their weights, every recipe loads, the CLI reports errors without a trace; a run
that keeps nothing is an error; quality overrides, decontamination flags and custom scrubbers
do what docs/data.md says."""

from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

from lmstack.cli.main import main
from lmstack.config import load_config
from lmstack.data.dedup import normalized_words
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
    assert main(["data", "info", str(tmp_path / "cli"), "--json"]) == 0
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


# ---- documented behaviour of smaller features, on documents-only runs (no tokenizer) --------

def _docs_run(tmp_path: Path, sources: dict[str, list[str]], **kw) -> PrepareConfig:
    """A run over one JSONL file per source (ids ``name:i``) that stops after phase 1."""
    from lmstack.config import config_from_dict

    tmp_path.mkdir(parents=True, exist_ok=True)
    specs = []
    for name, texts in sources.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(texts)))
        specs.append({"name": name, "kind": "jsonl", "paths": [str(path)], "id_field": "id"})
    return config_from_dict(PrepareConfig, {"output": str(tmp_path / "out"), "workers": 1,
                                            "progress": False, "sources": specs, **kw})


def test_nothing_kept_is_an_error_that_says_why(corpus, tmp_path, capsys):
    import yaml

    from lmstack.errors import LMStackError

    rng = random.Random(21)
    leaked = random_text(rng, 120)
    (tmp_path / "eval.jsonl").write_text(json.dumps({"text": leaked}) + "\n")
    texts = ["Too short to keep."] * 3 + ["Also far too short, and a list:\n- a\n- b"] + [leaked, leaked.upper()]
    cfg = _docs_run(tmp_path, {"web": texts}, tokenizer=corpus["tokenizer"],
                    decontam={"eval_sets": [{"name": "bench", "kind": "jsonl",
                                             "paths": [str(tmp_path / "eval.jsonl")]}]})
    with pytest.raises(LMStackError) as e:
        prepare(cfg)
    assert str(e.value).startswith("all 6 documents were removed: quality 4 (too_few_words), "
                                   "exact_dedup 1 (duplicate), decontam 1 (contaminated); nothing to write")
    out = tmp_path / "out"
    assert not out.exists()  # nothing that could pass for a finished (or resumable) run
    # The same run from the CLI: one line on stderr, exit status 2, no traceback.
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    out.mkdir()
    assert main(["data", "prepare", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "all 6 documents were removed: quality 4" in err
    assert not list(out.iterdir())  # the folder existed before, so it stays, empty
    # Several reasons in one step are listed with their counts; an empty source says so.
    texts = ["Too short to keep."] * 2 + ["zzz " * 60]
    with pytest.raises(LMStackError, match=r"all 3 documents were removed: quality 3 "
                                           r"\(too_few_words 2, (\w+) 1\)"):
        prepare(_docs_run(tmp_path, {"web": texts}, overwrite=True))
    with pytest.raises(LMStackError, match=r"no documents were read from the sources \['web'\]"):
        prepare(_docs_run(tmp_path, {"web": []}))


def test_quality_overrides_apply_per_source(tmp_path):
    rng = random.Random(22)
    # 44 words, under the Gopher minimum of 50; the last sentence supplies its stop words.
    short = [random_text(rng, 30) + " The end of the story was told to the family, and that is all."
             for _ in range(4)]
    assert all(len(t.split()) == 44 for t in short)
    long = [random_text(rng, 120) for _ in range(3)]
    sources = {"web": short[:2] + long, "notes": short[2:]}
    report = prepare(_docs_run(tmp_path, sources, quality_overrides={"notes": {"min_words": 10}}))
    kept = {k["id"] for k in _kept(tmp_path / "out")}
    assert kept == {"notes:0", "notes:1", "web:2", "web:3", "web:4"}  # web keeps the default of 50
    assert report["removed"]["quality/too_few_words"]["docs"] == 2
    # null turns a rule off for that source only; other rules of the source stay as they were.
    report = prepare(_docs_run(tmp_path / "b", {**sources, "notes": short[2:] + ["x" * 5000]},
                               quality_overrides={"notes": {"min_words": None}}))
    assert {k["id"] for k in _kept(tmp_path / "b" / "out")} == kept
    assert report["sources"]["notes"]["docs_read"] == 3 and report["sources"]["notes"]["docs_kept"] == 2
    with pytest.raises(ConfigError, match="min_wrds"):
        _docs_run(tmp_path, sources, quality_overrides={"notes": {"min_wrds": 10}})
    with pytest.raises(ConfigError, match="unknown source"):
        _docs_run(tmp_path, sources, quality_overrides={"blog": {"min_words": 10}})


def test_decontam_flag_keeps_and_lists_contaminated_documents(tmp_path):
    rng = random.Random(23)
    items = [random_text(rng, 30) for _ in range(3)]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({"id": str(i), "q": q}) + "\n"
                                                 for i, q in enumerate(items)))
    texts = [random_text(rng, 100) for _ in range(4)]
    texts[1] = random_text(rng, 60) + " " + items[2] + " " + random_text(rng, 60)
    eval_sets = [{"name": "bench", "kind": "jsonl", "paths": [str(tmp_path / "eval.jsonl")],
                  "fields": ["q"], "id_field": "id"}]
    report = prepare(_docs_run(tmp_path, {"web": texts}, decontam={"eval_sets": eval_sets, "action": "flag"}))
    kept = _kept(tmp_path / "out")
    assert [k["id"] for k in kept] == ["web:0", "web:1", "web:2", "web:3"]  # nothing dropped
    assert kept[1]["contaminated"] == ["bench:2"]
    assert all("contaminated" not in k for i, k in enumerate(kept) if i != 1)
    hits = len(normalized_words(items[2])) - 13 + 1
    assert report["flagged"] == [{"id": "web:1", "ngram_hits": hits, "eval_items": ["bench:2"]}]
    assert not any(r.startswith("decontam/") for r in report["removed"])
    assert report["steps"]["decontam"]["docs_in"] == report["steps"]["decontam"]["docs_out"] == 4
    # The default action drops the same document.
    report = prepare(_docs_run(tmp_path / "d", {"web": texts}, decontam={"eval_sets": eval_sets}))
    assert [k["id"] for k in _kept(tmp_path / "d" / "out")] == ["web:0", "web:2", "web:3"]
    assert report["removed"]["decontam/contaminated"]["docs"] == 1 and not report["flagged"]


_TICKET = re.compile(r"\bTICKET-\d+\b")


def scrub_tickets(text: str) -> tuple[str, int]:
    """A custom scrubber: ``text -> (text, replacements)``."""
    return _TICKET.subn("<TICKET>", text)


@pytest.mark.parametrize("pii", [False, True])
def test_custom_scrubbers_run_in_the_workers(tmp_path, pii):
    rng = random.Random(24)
    texts = [f"{random_text(rng, 60)} Write to ann@example.org about TICKET-{i} and TICKET-9{i}. "
             f"{random_text(rng, 60)}" for i in range(6)]
    report = prepare(_docs_run(tmp_path, {"web": texts}, workers=2, batch_docs=2, clean={"pii": pii}),
                     scrubbers={"ticket": scrub_tickets})
    kept = _kept(tmp_path / "out")
    assert len(kept) == 6
    assert all("TICKET-" not in k["text"] and k["text"].count("<TICKET>") == 2 for k in kept)
    assert report["pii_replacements"]["ticket"] == 12
    # Custom scrubbers come in addition to the built-in ones, which still follow clean.pii.
    assert all(("ann@example.org" in k["text"]) != pii for k in kept)
    assert report["pii_replacements"].get("email", 0) == (6 if pii else 0)
