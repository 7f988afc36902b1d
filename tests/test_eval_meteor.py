"""METEOR against nltk's meteor_score, and our WordNet reader against nltk's WordNet reader."""

import shutil
import warnings

import pytest

from lmstack.eval import meteor as MT
from lmstack.eval.datasets import load_summarization, load_translation
from lmstack.eval.wordnet import WordNet, find_wordnet_dir

nltk_meteor = pytest.importorskip("nltk.translate.meteor_score")

# nltk's WordNet reader wants a `lexnames` file and an `index.sense` file, which Debian's
# wordnet-base leaves out; the lexicographer file names are fixed by WordNet 3.0 (lexnames(5WN)).
LEXNAMES = ("adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute "
            "noun.body noun.cognition noun.communication noun.event noun.feeling noun.food noun.group "
            "noun.location noun.motive noun.object noun.person noun.phenomenon noun.plant "
            "noun.possession noun.process noun.quantity noun.relation noun.shape noun.state "
            "noun.substance noun.time verb.body verb.change verb.cognition verb.communication "
            "verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion "
            "verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl").split()


class NoSynsets:
    """Stands in for nltk's WordNet when the synonym stage is off."""

    def synsets(self, word):
        return []


@pytest.fixture(scope="module")
def our_wordnet():
    root = find_wordnet_dir()
    if root is None:
        pytest.skip("WordNet files not found (apt-get install wordnet-base, or scripts/fetch_eval_assets.sh)")
    return WordNet(root)


@pytest.fixture(scope="module")
def nltk_wordnet(our_wordnet, tmp_path_factory):
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    base = tmp_path_factory.mktemp("nltk_data")
    dest = base / "corpora" / "wordnet"
    dest.mkdir(parents=True)
    for f in our_wordnet.root.iterdir():
        if f.is_file():
            shutil.copy(f, dest / f.name)
    (dest / "lexnames").write_text("".join(f"{i:02d}\t{n}\t1\n" for i, n in enumerate(LEXNAMES)))
    (dest / "index.sense").write_text("")
    nltk.data.path.insert(0, str(base))  # nltk only reads corpora under its data path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return WordNetCorpusReader(str(dest), None)


def pairs_from_sets():
    tr = load_translation()
    hyps = [" ".join(it.references[0].split()[::-1]) if i % 2 else it.references[-1] for i, it in enumerate(tr)]
    out = [(h, it.references) for h, it in zip(hyps, tr)]
    for it in load_summarization():
        first = it.document.split(". ")[0]
        out.append((first, [it.summary]))
    out.append(("It is a guide to action which ensures that the military always obeys the commands of the party",
                ["It is a guide to action that ensures that the military will forever heed Party commands"]))
    return out


def test_meteor_without_synonyms_equals_nltk():
    pairs = pairs_from_sets()
    ours = MT.meteor_scores([h for h, _ in pairs], [r for _, r in pairs], synonyms=False)
    want = [nltk_meteor.meteor_score([MT.tokenize(x) for x in refs], MT.tokenize(h), wordnet=NoSynsets())
            for h, refs in pairs]
    assert ours == pytest.approx(want, abs=1e-12)
    assert len({round(x, 6) for x in ours}) > 20  # a varied set, not a constant
    assert ours[-1] == pytest.approx(0.6944, abs=5e-5)  # nltk's documented example


def test_wordnet_reader_matches_nltk(our_wordnet, nltk_wordnet):
    words = ("dogs happier running went geese better quickly ran mice children larger automobile "
             "car big wolves buses flies was data axes leaves saw swimming fastest oxen bank "
             "ice_cream New_York zzzz").split()
    for w in words:
        want = [(s.pos().replace("s", "a"), s.offset()) for s in nltk_wordnet.synsets(w)]
        assert our_wordnet.synsets(w) == want, w
        assert our_wordnet.synonyms(w) == {l.name() for s in nltk_wordnet.synsets(w) for l in s.lemmas()}, w
    assert "auto" in our_wordnet.synonyms("car") and "large" in our_wordnet.synonyms("big")
    assert our_wordnet.synonyms("zzzz") == frozenset()


def test_meteor_with_synonyms_equals_nltk_where_stems_are_words(our_wordnet, nltk_wordnet):
    # nltk looks synonyms up by stem; where every word is its own Porter stem both agree.
    stem = MT._stemmer()
    cases = [("the car is fast", "the auto is quick"), ("a big dog", "a great hound"),
             ("the sick kid went home", "the ill child went home"), ("begin the film", "start a pic")]
    for h, r in cases:
        ht, rt = MT.tokenize(h), MT.tokenize(r)
        assert all(stem(w) == w for w in ht + rt), (h, r)
        ours = MT.meteor_tokens(ht, rt, our_wordnet)
        want = nltk_meteor.meteor_score([rt], ht, wordnet=nltk_wordnet)
        assert ours == pytest.approx(want, abs=1e-12)
        assert ours > MT.meteor_tokens(ht, rt, None)  # the synonym stage found something


def test_synonym_stage_uses_surface_words(our_wordnet):
    # "quickly" stems to "quickli", which WordNet does not know; the word itself has the
    # synonym "rapidly". Our stage finds it, nltk's stem-based lookup does not.
    ht, rt = MT.tokenize("he ran quickly"), MT.tokenize("he ran rapidly")
    assert "rapidly" in our_wordnet.synonyms("quickly")
    assert MT.meteor_tokens(ht, rt, our_wordnet) > MT.meteor_tokens(ht, rt, None)


def test_synonym_stage_only_adds_matches(our_wordnet):
    grew = 0
    for h, refs in pairs_from_sets():
        ht, rt = MT.tokenize(h), MT.tokenize(refs[0])
        base, more = MT.align(ht, rt, None), MT.align(ht, rt, our_wordnet)
        assert set(base) <= set(more)  # exact and stem stages are unchanged
        assert len({i for i, _ in more}) == len(more) == len({j for _, j in more})  # one-to-one
        grew += len(more) > len(base)
    assert grew >= 1


def test_chunks_and_edge_cases():
    assert MT.count_chunks([]) == 0
    assert MT.count_chunks([(0, 0), (1, 1), (2, 5), (3, 6), (5, 7)]) == 3
    assert MT.meteor_tokens(["a"], ["b"]) == 0.0
    same = MT.tokenize("the cat sat on the mat")
    assert MT.meteor_tokens(same, same) == pytest.approx(0.9 * (1 - 0.5 * (1 / 6) ** 3) / 0.9)


def test_synonym_note_says_what_ran(monkeypatch, tmp_path):
    monkeypatch.setenv("LMSTACK_WORDNET", str(tmp_path))  # empty: falls through to the next place
    note = MT.synonym_stage_note()
    assert note.startswith("METEOR:")
    assert ("skipped" in note) == (find_wordnet_dir() is None)
