"""The CUDA paths: SDPA attention, bf16, KV-cache decoding, torch.compile, LoRA/QLoRA, the
training loops. Skipped (with the reason) on machines without a CUDA device; every test
compares the GPU against a reference (transformers on the same GPU, or our CPU path, which
the rest of the suite checks against transformers)."""

import copy

import pytest
import torch

from hf_fixtures import make_hf_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device (torch.cuda.is_available() is False)")
transformers = pytest.importorskip("transformers")

CUDA = "cuda"


@pytest.fixture(scope="module", params=["llama", "gpt2", "qwen2"])
def pair(request, tmp_path_factory):
    from lmstack.model.checkpoint import load_checkpoint

    hf = make_hf_model(request.param)
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d)
    ours, _, _ = load_checkpoint(d, device=CUDA)
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa").to(CUDA).eval()
    return hf, ours


def test_logits_match_transformers_fp32(pair):
    hf, ours = pair
    ids = torch.randint(0, 96, (3, 24), device=CUDA)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=0)


def test_bf16_error_is_no_worse_than_transformers(pair):
    hf, ours = pair
    ids = torch.randint(0, 96, (3, 24), device=CUDA)
    with torch.no_grad():
        ref = hf(ids).logits.float()
        hf_bf16 = (copy.deepcopy(hf).to(torch.bfloat16)(ids).logits.float() - ref).abs().max().item()
        ours_bf16 = (copy.deepcopy(ours).to(torch.bfloat16)(ids).float() - ref).abs().max().item()
    assert ours_bf16 <= 2 * hf_bf16 + 1e-3, (ours_bf16, hf_bf16)


def test_greedy_decoding_with_kv_cache_matches_transformers(pair):
    from lmstack.infer import SamplingParams, generate_ids

    hf, ours = pair
    torch.manual_seed(2)
    prompt = torch.randint(0, 96, (1, 7), device=CUDA)
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0,
                          attention_mask=torch.ones_like(prompt))
    got = generate_ids(ours, [prompt[0].tolist()], SamplingParams(max_new_tokens=20, temperature=0.0))
    assert got[0] == ref[0, 7:].tolist()


def test_compiled_forward_matches_eager():
    from lmstack.model import Transformer, preset

    torch.manual_seed(0)
    model = Transformer(preset("tiny-llama")).to(CUDA).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 32), device=CUDA)
    with torch.no_grad():
        eager = model(ids)
        compiled = torch.compile(model)(ids)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


def _shards(tmp_path):
    from test_train_pretrain import make_shards

    return make_shards(tmp_path / "shards")


def _pretrain_cfg(shards, out, **kw):
    from test_train_pretrain import _cfg

    return _cfg(shards, out, **kw)


def test_pretrain_on_cuda_matches_cpu_and_runs_bf16_and_compiled(tmp_path):
    from lmstack.train.pretrain import pretrain

    shards = _shards(tmp_path)
    cpu = pretrain(_pretrain_cfg(shards, tmp_path / "cpu", max_steps=4))
    gpu = pretrain(_pretrain_cfg(shards, tmp_path / "gpu", max_steps=4, device=CUDA))
    assert gpu["losses"] == pytest.approx(cpu["losses"], abs=1e-4)
    bf16 = pretrain(_pretrain_cfg(shards, tmp_path / "bf16", max_steps=4, device=CUDA, dtype="bfloat16"))
    assert bf16["losses"] == pytest.approx(cpu["losses"], abs=3e-2)
    compiled = pretrain(_pretrain_cfg(shards, tmp_path / "compiled", max_steps=4, device=CUDA, compile=True))
    assert compiled["losses"] == pytest.approx(gpu["losses"], abs=1e-4)


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_sft_on_cuda_matches_cpu(tmp_path, method):
    from test_train_sft import _cfg, _write

    from lmstack.train.sft import sft

    data = _write(tmp_path)
    peft = {"method": method, "r": 4, "alpha": 8}
    cpu = sft(_cfg(tmp_path / "cpu", data, max_steps=4, peft=peft))
    gpu = sft(_cfg(tmp_path / "gpu", data, max_steps=4, peft=peft, device=CUDA))
    assert gpu["losses"] == pytest.approx(cpu["losses"], abs=1e-4)
    ckpt = sft(_cfg(tmp_path / "ckpt", data, max_steps=4, peft=peft, device=CUDA, gradient_checkpointing=True,
                    dtype="bfloat16"))
    assert ckpt["losses"] == pytest.approx(cpu["losses"], abs=5e-2)


@pytest.mark.parametrize("method", ["lora", "prefix", "adapter"])
def test_a_seed_gives_the_same_adapter_on_every_device(method):
    from lmstack.model import Transformer, preset
    from lmstack.peft import PEFTConfig, apply_peft

    got = []
    for dev in ("cpu", CUDA):
        torch.manual_seed(0)
        m = Transformer(preset("tiny-llama")).to(dev)
        torch.manual_seed(3)
        apply_peft(m, PEFTConfig(method=method, r=4, alpha=8))
        got.append({n: p.detach().cpu() for n, p in m.named_parameters() if p.requires_grad})
    assert got[0].keys() == got[1].keys() and got[0]
    for n in got[0]:
        assert torch.equal(got[0][n], got[1][n]), n


def test_qlora_dequantised_matmul_matches_cpu_and_trains_only_lora():
    from lmstack.model import Transformer, preset
    from lmstack.peft import PEFTConfig, apply_peft

    torch.manual_seed(0)
    base = Transformer(preset("tiny-llama"))
    ids = torch.randint(0, base.config.vocab_size, (2, 16))
    outs = {}
    for dev in ("cpu", CUDA):
        m = Transformer(preset("tiny-llama"))
        m.load_state_dict(base.state_dict())
        torch.manual_seed(2)  # the same lora_A on both devices (drawn on the CPU)
        m = apply_peft(m.to(dev), PEFTConfig(method="qlora", r=4, alpha=8, quant_bits="int4", group_size=32))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for mod in m.modules():  # non-zero B (the same on both devices) so the adapters matter
                if hasattr(mod, "lora_B"):
                    mod.lora_B.copy_(torch.randn(mod.lora_B.shape, generator=g) * 0.02)
        m.train()
        loss = m(ids.to(dev)).float().logsumexp(-1).mean()
        loss.backward()
        trainable = {n for n, p in m.named_parameters() if p.requires_grad}
        assert trainable and all("lora_" in n for n in trainable)
        assert all(p.grad is not None for n, p in m.named_parameters() if p.requires_grad)
        outs[dev] = (loss.item(), {n: p.grad.cpu() for n, p in m.named_parameters() if p.requires_grad})
    assert outs[CUDA][0] == pytest.approx(outs["cpu"][0], abs=1e-4)
    for n, g in outs["cpu"][1].items():
        torch.testing.assert_close(outs[CUDA][1][n], g, atol=1e-4, rtol=1e-3)
