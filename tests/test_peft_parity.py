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
