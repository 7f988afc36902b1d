"""LoRA parity with Hugging Face PEFT: the same A/B matrices give the same logits."""

import copy

import pytest
import torch

from lmstack.model import Transformer, preset
from lmstack.peft import LoRALinear, PEFTConfig, apply_peft, merge_and_unload

pytest.importorskip("transformers")
peft = pytest.importorskip("peft", reason="parity needs `pip install peft` (the test extra)")

HF_NAMES = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
            "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
            "down_proj": "mlp.down_proj"}


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], list(HF_NAMES)])
def test_lora_logits_match_peft(tmp_path, targets):
    from transformers import AutoModelForCausalLM

    from lmstack.model.checkpoint import export_hf

    torch.manual_seed(0)
    base = Transformer(preset("tiny-llama")).eval()
    export_hf(base, tmp_path / "hf")
    ours = apply_peft(copy.deepcopy(base), PEFTConfig(method="lora", r=4, alpha=12, targets=targets))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in ours.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32, attn_implementation="eager")
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=12, lora_dropout=0.0,
                                                     target_modules=targets)).eval()
    sd = theirs.state_dict()
    with torch.no_grad():
        for name, m in ours.named_modules():
            if isinstance(m, LoRALinear):
                _, i, _, proj = name.split(".")
                pre = f"base_model.model.model.layers.{i}.{HF_NAMES[proj]}"
                sd[f"{pre}.lora_A.default.weight"].copy_(m.lora_A)
                sd[f"{pre}.lora_B.default.weight"].copy_(m.lora_B)
    ids = torch.randint(0, 320, (2, 16), generator=g)
    want = theirs(input_ids=ids).logits
    torch.testing.assert_close(ours(ids), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(merge_and_unload(ours)(ids), theirs.merge_and_unload()(input_ids=ids).logits,
                               rtol=1e-4, atol=1e-5)


# -- adapter files that PEFT itself reads and writes, on tiny random GPT-2, Llama and Qwen2 ------

# PEFT's names for the same layers (GPT-2's c_proj is in both attn and mlp: bare "c_proj" means both).
PEFT_TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"], "llama": list(HF_NAMES), "qwen2": list(HF_NAMES)}


def _hf_base(tmp_path, family):
    from hf_fixtures import make_hf_model

    hf = make_hf_model(family)
    hf.save_pretrained(tmp_path / "hf")
    return hf


def _ids(n=2, T=16, vocab=96, seed=5):
    return torch.randint(0, vocab, (n, T), generator=torch.Generator().manual_seed(seed))


def _train_a_little(model, steps=3):
    """A few AdamW steps on random tokens: A and B both move, differently in every layer."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    ids = _ids(seed=7)
    model.train()
    for _ in range(steps):
        logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("family,targets", [
    ("gpt2", [t for t in HF_NAMES if t != "gate_proj"]), ("gpt2", ["q_proj", "v_proj", "down_proj"]), ("llama", list(HF_NAMES)),
    ("llama", ["k_proj", "up_proj"]), ("qwen2", list(HF_NAMES)), ("qwen2", ["q_proj", "v_proj"])])
def test_peft_loads_an_adapter_lmstack_trained(tmp_path, family, targets):
    """lmstack trains LoRA and saves it; ``PeftModel.from_pretrained`` on the transformers model
    gives the same logits (GPT-2's q/k/v go into the fused c_attn as one update)."""
    from lmstack.model.checkpoint import load_hf
    from lmstack.peft import load_adapter, save_adapter

    hf = _hf_base(tmp_path, family)
    ids = _ids()
    with torch.no_grad():
        base_logits = hf(input_ids=ids).logits
    ours, _, _ = load_hf(tmp_path / "hf")
    torch.manual_seed(0)
    ours = _train_a_little(apply_peft(ours, PEFTConfig(method="lora", r=4, alpha=12, targets=targets)))
    save_adapter(ours, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                          "adapter_model.safetensors"]
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    n_lora = sum(1 for n, _ in theirs.named_modules() if n.endswith("lora_A.default"))
    per_layer = len(targets) if family != "gpt2" else len(set(targets) - {"q_proj", "k_proj", "v_proj"}) + \
        bool(set(targets) & {"q_proj", "k_proj", "v_proj"})
    assert n_lora == 2 * per_layer
    with torch.no_grad():
        want = theirs(input_ids=ids).logits
        assert (want - base_logits).abs().max() > 1e-2  # the adapter matters
        torch.testing.assert_close(ours(ids), want, rtol=1e-4, atol=1e-5)
        # and it reads back into lmstack exactly
        again, _, _ = load_hf(tmp_path / "hf")
        torch.testing.assert_close(load_adapter(again, tmp_path / "adapter")(ids), ours(ids), rtol=0, atol=1e-6)
        # merged into the base weights on both sides (GPT-2: Conv1D's transposed layout in PEFT)
        torch.testing.assert_close(merge_and_unload(ours)(ids), theirs.merge_and_unload()(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_lmstack_loads_an_adapter_peft_saved(tmp_path, family):
    """``get_peft_model(...).save_pretrained`` -> ``LLM.load(hf, adapter=...)``: the same logits."""
    from lmstack import LLM

    hf = _hf_base(tmp_path, family)
    with torch.no_grad():
        base_logits = hf(input_ids=_ids()).logits
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                     target_modules=PEFT_TARGETS[family],
                                                     fan_in_fan_out=family == "gpt2"))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    theirs.save_pretrained(tmp_path / "adapter")
    theirs.eval()
    llm = LLM.load(tmp_path / "hf", adapter=tmp_path / "adapter")
    ids = _ids()
    with torch.no_grad():
        want = theirs(input_ids=ids).logits
        assert (want - base_logits).abs().max() > 1e-2  # the adapter matters
        torch.testing.assert_close(llm.logits(ids), want, rtol=1e-4, atol=1e-5)
    n = sum(isinstance(m, LoRALinear) for m in llm.model.modules())
    assert n == 2 * (6 if family == "gpt2" else 7)
    # saved again by lmstack, PEFT reads it with the same logits (c_attn stays rank 4: one shared A)
    from lmstack.peft import save_adapter

    save_adapter(llm.model, tmp_path / "again")
    import json

    cfg = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {}
    hf2 = _hf_base(tmp_path / "b", family)
    with torch.no_grad():
        torch.testing.assert_close(peft.PeftModel.from_pretrained(hf2, tmp_path / "again").eval()(input_ids=ids).logits,
                                   want, rtol=1e-4, atol=1e-5)
