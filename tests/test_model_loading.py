"""Loading Hugging Face folders: sharded checkpoints, and the refusals of what the model
leaves out (RoPE scaling, mixture of experts), each named with the field that asks for it."""

import json

import pytest
import torch

from hf_fixtures import make_hf_model
from lmstack import LLM
from lmstack.errors import LMStackError, UnsupportedError
from lmstack.model.checkpoint import load_checkpoint

transformers = pytest.importorskip("transformers")


# -- sharded checkpoints ----------------------------------------------------------------------


@pytest.fixture(scope="module", params=["gpt2", "llama", "qwen2"])
def sharded(request, tmp_path_factory):
    """(family, transformers model, folder) with the weights saved in several shards."""
    hf = make_hf_model(request.param)
    folder = tmp_path_factory.mktemp(f"sharded-{request.param}")
    hf.save_pretrained(folder, max_shard_size="100KB")
    return request.param, hf, folder


def _shards(folder):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return sorted(set(index["weight_map"].values()))


def test_the_fixture_is_sharded(sharded):
    _, hf, folder = sharded
    shards = _shards(folder)
    assert len(shards) >= 3 and not (folder / "model.safetensors").exists()
    assert sorted(p.name for p in folder.glob("*.safetensors")) == shards
    saved = hf.state_dict().keys() - ({"lm_head.weight"} if hf.config.tie_word_embeddings else set())
    assert json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].keys() == saved


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "one-tensor-at-a-time"])
def test_sharded_checkpoint_logits_equal_transformers(sharded, streamed):
    """Both readers: all shards at once, and the stream a quantising loader goes through
    (``convert`` that takes no tensor leaves every one to the model)."""
    _, hf, folder = sharded
    seen = []

    def convert(model, key, t):
        seen.append(key)
        return False

    model, _, meta = load_checkpoint(folder, convert=convert if streamed else None)
    assert meta["source_format"] == "huggingface"
    if streamed:
        assert sorted(seen) == sorted(model.state_dict())  # every tensor came through the stream
    torch.manual_seed(0)
    ids = torch.randint(0, 96, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=0)


def test_llm_load_reads_a_sharded_folder(sharded):
    _, hf, folder = sharded
    llm = LLM.load(folder)
    ids = [[5, 6, 7, 8, 9]]
    with torch.no_grad():
        torch.testing.assert_close(llm.logits(ids), hf(torch.tensor(ids)).logits, atol=1e-4, rtol=0)


def test_a_missing_shard_is_named(tmp_path):
    make_hf_model("llama").save_pretrained(tmp_path, max_shard_size="100KB")
    gone = _shards(tmp_path)[1]
    (tmp_path / gone).unlink()
    with pytest.raises(LMStackError, match=rf"model.safetensors.index.json names {gone}, which is missing"):
        load_checkpoint(tmp_path)


# -- refusals -----------------------------------------------------------------------------------


def _folder_with_config(tmp_path, config) -> str:
    """A folder with only a config.json: the refusal must come before any weight is read."""
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict() if hasattr(config, "to_dict") else config))
    return str(tmp_path)


def _llama_dict(**extra) -> dict:
    base = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=96, hidden_size=64,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=112,
                max_position_embeddings=128, rope_theta=10000.0)
    return {**base, **extra}


@pytest.mark.parametrize("kind", ["linear", "dynamic", "yarn", "llama3", "longrope"])
def test_rope_scaling_is_refused_naming_the_field(tmp_path, kind):
    """As older configs write it (``rope_scaling``, with ``type`` or ``rope_type``)."""
    for key in ("type", "rope_type"):
        folder = _folder_with_config(tmp_path, _llama_dict(rope_scaling={key: kind, "factor": 4.0}))
        with pytest.raises(UnsupportedError, match=rf"^config.json rope_scaling: rope_type '{kind}' is not "
                                                   r"supported; expected plain RoPE"):
            LLM.load(folder)


def test_rope_scaling_written_by_transformers_is_refused(tmp_path):
    """transformers 5 writes the scaling into ``rope_parameters``: the message names that field."""
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=112, rope_scaling={"rope_type": "linear", "factor": 2.0})
    cfg.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    field = "rope_parameters" if "rope_parameters" in written else "rope_scaling"
    with pytest.raises(UnsupportedError, match=rf"^config.json {field}: rope_type 'linear' is not supported"):
        LLM.load(tmp_path)


def test_plain_rope_in_either_field_loads():
    from lmstack.model.checkpoint import config_from_hf

    for cfg in (_llama_dict(rope_scaling=None, rope_theta=5e5),
                _llama_dict(rope_theta=None, rope_parameters={"rope_type": "default", "rope_theta": 5e5})):
        assert config_from_hf({k: v for k, v in cfg.items() if v is not None}).rope_theta == 5e5


@pytest.mark.parametrize("config,field,value", [
    (lambda: transformers.MixtralConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=112), "num_local_experts", 8),
    (lambda: transformers.Qwen2MoeConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=112, num_experts=4),
     "num_experts", 4),
    (lambda: {**_llama_dict(), "model_type": "qwen2", "num_experts": 16, "num_experts_per_tok": 2}, "num_experts", 16),
    (lambda: _llama_dict(n_routed_experts=64), "n_routed_experts", 64),
], ids=["mixtral", "qwen2-moe", "qwen2-with-experts", "llama-with-routed-experts"])
def test_mixture_of_experts_is_refused_naming_the_field(tmp_path, config, field, value):
    folder = _folder_with_config(tmp_path, config())
    with pytest.raises(UnsupportedError, match=rf"^config.json {field}: got {value} \(model_type '.+'\), expected "
                                               r"no experts: mixture of experts is not supported"):
        LLM.load(folder)
