"""PEFT by module swap: LoRA algebra, disabled/merge invariants, adapter save/load, QLoRA, prefix, adapters."""

import copy

import pytest
import torch

from lmstack.model import Transformer, preset
from lmstack.peft import (AdapterLinear, LoRALinear, PEFTConfig, PrefixAttention, apply_peft, load_adapter,
                          merge_and_unload, merge_lora, param_counts, peft_disabled, peft_state_dict,
                          save_adapter, unmerge_lora)
from lmstack.quant import QuantEmbedding, QuantLinear, dequantize, quantize_int4, quantize_int8
from lmstack.train.common import token_loss_sum


def _model(name="tiny-llama", seed=0):
    torch.manual_seed(seed)
    return Transformer(preset(name)).eval()


def _ids(seed=1, B=2, T=12, V=320):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g)


def _randomise_lora(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-qwen2"])
def test_lora_keeps_base_keys_and_starts_as_identity(name):
    base = _model(name)
    keys = set(base.state_dict())
    ids = _ids()
    ref = base(ids)
    model = apply_peft(copy.deepcopy(base), PEFTConfig(method="lora", r=4, alpha=8))
    sd = model.state_dict()
    assert keys <= set(sd)
    assert set(sd) - keys == set(peft_state_dict(model))
    assert all(k.endswith(("lora_A", "lora_B")) for k in set(sd) - keys)
    torch.testing.assert_close(model(ids), ref, rtol=0, atol=0)  # B = 0 at init
    trainable, total = param_counts(model)
    n_lora = sum(m.lora_A.numel() + m.lora_B.numel() for m in model.modules() if isinstance(m, LoRALinear))
    assert trainable == n_lora and total == base.num_params() + n_lora


def test_lora_forward_and_merge_equal_w_plus_scaled_ba():
    model = apply_peft(_model(), PEFTConfig(method="lora", r=4, alpha=12, targets=["q_proj", "down_proj"]))
    _randomise_lora(model)
    m = model.blocks[0].attn.q_proj
    x = torch.randn(3, 64)
    w0 = m.weight.detach().clone()
    expected_w = w0 + (12 / 4) * (m.lora_B @ m.lora_A)
    torch.testing.assert_close(m(x), x @ expected_w.t(), rtol=1e-5, atol=1e-6)
    ids = _ids()
    before = model(ids)
    merge_lora(model)
    torch.testing.assert_close(m.weight, expected_w, rtol=0, atol=0)
    torch.testing.assert_close(model(ids), before, rtol=1e-4, atol=1e-5)
    unmerge_lora(model)
    rel = ((m.weight - w0).abs().max() / w0.abs().max()).item()
    assert rel < 1e-6


def test_unmerge_is_exact_with_base_copy():
    model = apply_peft(_model(), PEFTConfig(method="lora", r=4, alpha=8, keep_base_copy=True))
    _randomise_lora(model)
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    merge_lora(model)
    assert not torch.equal(model.blocks[1].mlp.up_proj.weight, w0["blocks.1.mlp.up_proj.weight"])
    unmerge_lora(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, w0[k]), k


def test_disabled_gives_base_logits_merged_or_not():
    base = _model()
    ids = _ids()
    ref = base(ids)
    model = apply_peft(copy.deepcopy(base), PEFTConfig(method="lora", r=4, alpha=8))
    _randomise_lora(model)
    assert (model(ids) - ref).abs().max() > 1e-3
    with peft_disabled(model):
        torch.testing.assert_close(model(ids), ref, rtol=0, atol=0)
    merge_lora(model)
    with peft_disabled(model):
        torch.testing.assert_close(model(ids), ref, rtol=1e-4, atol=1e-5)
    assert not any(getattr(m, "disabled", False) for m in model.modules())


@pytest.mark.parametrize("fmt,weights", [(None, "adapter_model.safetensors"), ("peft", "adapter_model.safetensors"),
                                         ("lmstack", "adapter.safetensors")])
def test_lora_only_save_reloads_onto_base(tmp_path, fmt, weights):
    """Both folder formats (PEFT's, the default for LoRA, and lmstack's own) reload exactly."""
    base = _model()
    model = apply_peft(copy.deepcopy(base), PEFTConfig(method="lora", r=4, alpha=8, targets=["q_proj", "v_proj"]))
    _randomise_lora(model)
    ids = _ids()
    want = model(ids)
    save_adapter(model, tmp_path / "adapter", format=fmt)
    from safetensors.torch import load_file

    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == sorted(["adapter_config.json", weights])
    saved = load_file(str(tmp_path / "adapter" / weights))
    assert len(saved) == 2 * 2 * 2 and all("lora_" in k for k in saved)  # 2 layers x q,v x A,B
    fresh = load_adapter(copy.deepcopy(base), tmp_path / "adapter")
    assert fresh.peft_config == model.peft_config
    torch.testing.assert_close(fresh(ids), want, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["qlora", "prefix", "adapter"])
def test_other_methods_save_and_reload(tmp_path, method):
    """QLoRA goes into PEFT's format (its quantisation travels in lmstack's header entry);
    prefix tuning and bottleneck adapters, which PEFT's LoRA files cannot hold, into lmstack's."""
    base = _model()
    cfg = PEFTConfig(method=method, r=4, alpha=8, group_size=32, n_prefix=4, adapter_size=8)
    model = apply_peft(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for k, t in peft_state_dict(model).items():
            t.add_(torch.randn(t.shape, generator=torch.Generator().manual_seed(len(k))) * 0.1)
    ids = _ids()
    want = model(ids)
    save_adapter(model, tmp_path / "a")
    weights = "adapter_model.safetensors" if method == "qlora" else "adapter.safetensors"
    assert (tmp_path / "a" / weights).is_file()
    fresh = load_adapter(copy.deepcopy(base), tmp_path / "a")
    assert fresh.peft_config == cfg
    torch.testing.assert_close(fresh(ids), want, rtol=0, atol=0)
    if method != "qlora":
        from lmstack.errors import UnsupportedError

        with pytest.raises(UnsupportedError, match="format='lmstack'"):
            save_adapter(model, tmp_path / "b", format="peft")
        assert not (tmp_path / "b").exists()


def test_peft_folder_errors_name_the_field(tmp_path):
    import json

    from lmstack.errors import ConfigError, LMStackError, UnsupportedError

    model = apply_peft(_model(), PEFTConfig(method="lora", r=2, alpha=2, targets=["q_proj"]))
    with pytest.raises(ConfigError, match="format: got 'gguf'"):
        save_adapter(model, tmp_path / "x", format="gguf")
    save_adapter(model, tmp_path / "a")
    cfg_file = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    assert cfg["target_modules"] == ["q_proj"] and cfg["peft_type"] == "LORA"
    for key, value, match in (("use_dora", True, "use_dora=True"), ("peft_type", "IA3", "peft_type 'IA3'"),
                              ("modules_to_save", ["lm_head"], "modules_to_save")):
        cfg_file.write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(UnsupportedError, match=match):
            load_adapter(_model(), tmp_path / "a")
    cfg_file.write_text(json.dumps({**cfg, "r": 3}))  # rank 3 claimed, tensors of rank 2
    with pytest.raises(LMStackError, match="expects rank 3"):
        load_adapter(_model(), tmp_path / "a")


def test_adapter_refuses_other_base(tmp_path):
    from lmstack.errors import LMStackError

    model = apply_peft(_model(), PEFTConfig(method="lora", r=2, alpha=2))
    save_adapter(model, tmp_path / "a")
    with pytest.raises(LMStackError, match="different base model"):
        load_adapter(_model("tiny-qwen2"), tmp_path / "a")


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_merge_and_unload_exports_plain_model(tmp_path, method):
    from lmstack.model.checkpoint import load_checkpoint, save_native

    model = apply_peft(_model(), PEFTConfig(method=method, r=4, alpha=8, group_size=32))
    _randomise_lora(model)
    ids = _ids()
    want = model(ids)
    merged = merge_and_unload(model)
    assert not any(isinstance(m, (LoRALinear, QuantEmbedding)) for m in merged.modules())
    assert isinstance(merged.tok_emb, torch.nn.Embedding)
    save_native(merged, tmp_path / "m")
    loaded, _, _ = load_checkpoint(tmp_path / "m")
    torch.testing.assert_close(loaded(ids), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantisation_error_is_bounded(bits):
    torch.manual_seed(0)
    w = torch.randn(48, 128)
    if bits == "int8":
        q, s = quantize_int8(w)
        bound = s / 2
        deq = dequantize(q, s, "int8", 0)
    else:
        q, s = quantize_int4(w, 32)
        assert q.dtype == torch.uint8 and q.shape == (48, 64) and s.shape == (48, 4)
        bound = s.repeat_interleave(32, dim=1) / 2
        deq = dequantize(q, s, "int4", 32)
    assert ((deq - w).abs() <= bound + 1e-6).all()


def test_qlora_trains_adapters_only_and_saves_memory():
    base = _model()
    ids = _ids()
    ref = base(ids)
    model = apply_peft(copy.deepcopy(base), PEFTConfig(method="qlora", r=4, alpha=8, quant_bits="int4", group_size=32))
    q = model.blocks[0].mlp.down_proj
    assert isinstance(q, LoRALinear) and q.bits == "int4" and q.weight.dtype == torch.uint8
    assert "blocks.0.mlp.down_proj.weight" in model.state_dict()
    out = model(ids)
    assert isinstance(model.tok_emb, QuantEmbedding) and "tok_emb.qweight" in model.state_dict()
    deq = copy.deepcopy(base)  # the reference: the base with each weight replaced by its dequantised copy
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, LoRALinear):
                deq.get_submodule(name).weight.copy_(dequantize(m.weight, m.scales, "int4", 32))
        deq.tok_emb.weight.copy_(dequantize(model.tok_emb.qweight, model.tok_emb.scales, "int4", 32))
    torch.testing.assert_close(out, deq(ids), rtol=1e-5, atol=1e-5)
    assert 0 < (out - ref).abs().max() < 0.1 * ref.abs().max()
    out.logsumexp(-1).mean().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == ("lora_" in n), n
    lin = sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, LoRALinear))
    lin_fp32 = sum(m.in_features * m.out_features * 4 for m in model.modules() if isinstance(m, LoRALinear))
    assert lin * 8 == lin_fp32


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quant_embedding_lookup_and_slices_equal_the_dequantised_table(bits):
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 64)
    q = QuantEmbedding(emb, bits, 32)
    table = q.weight
    assert table.shape == (50, 64) and table.dtype == torch.float32
    assert (table - emb.weight).abs().max() < 0.1 * emb.weight.abs().max()
    idx = torch.tensor([[3, 49, 0], [3, 7, 7]])
    torch.testing.assert_close(q(idx), torch.nn.functional.embedding(idx, table), rtol=0, atol=0)
    torch.testing.assert_close(q.rows(10, 17), table[10:17], rtol=0, atol=0)
    torch.testing.assert_close(q.to_embedding().weight, table, rtol=0, atol=0)
    fp32_bytes = emb.weight.numel() * 4
    assert q.qweight.numel() * q.qweight.element_size() * (4 if bits == "int8" else 8) == fp32_bytes


def test_qlora_keeps_no_dequantised_weight_for_backward():
    """The activations QLoRA saves for backward are LoRA's; the full-precision weights are
    rebuilt in backward, never kept (nor is the quantised tied embedding's table)."""
    model = apply_peft(_model(), PEFTConfig(method="qlora", r=4, alpha=8, group_size=32)).train()
    weight_shapes = {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, LoRALinear)}
    weight_shapes.add(tuple(model.tok_emb.weight.shape))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        s, n = token_loss_sum(model, _ids(B=2, T=11)[:, :-1], _ids(B=2, T=11)[:, 1:])
    assert saved and not [tuple(x.shape) for x in saved if x.is_floating_point() and tuple(x.shape) in weight_shapes]
    s.backward()
    assert all(m.lora_B.grad is not None for m in model.modules() if isinstance(m, LoRALinear))


def test_qlora_model_generates_with_a_quantised_tied_embedding():
    from lmstack.infer.generate import stream_generate
    from lmstack.infer.sampling import SamplingParams

    model = apply_peft(_model(), PEFTConfig(method="qlora", r=4, alpha=8, group_size=32))
    assert model.new_cache(1).k[0].dtype == torch.float32
    ids = _ids(B=1, T=6)[0].tolist()
    toks = [ev.token_id for ev in stream_generate(model, None, [ids], SamplingParams(max_new_tokens=5))]
    with torch.no_grad():
        for t in toks:  # greedy: each token is the argmax of the uncached forward
            assert int(model(torch.tensor([ids]))[0, -1].argmax()) == t
            ids.append(t)
    trainable, total = param_counts(model)  # quantised tensors count their logical size
    assert total == param_counts(_model())[1] + trainable


def test_qlora_backward_matches_dequantised_reference():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    ql = QuantLinear(lin, "int4", 16)
    x = torch.randn(5, 64, requires_grad=True)
    ql(x).square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x2, ql.dequantize(), ql.bias).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


def _saved_base(tmp_path, fmt):
    """A tiny base on disk: native, or Hugging Face (llama keys; GPT-2's fused, transposed qkv)."""
    from lmstack.model.checkpoint import export_hf, save_native

    base = _model("tiny-gpt2" if fmt == "hf-gpt2" else "tiny-llama")
    for p in base.parameters():  # every weight non-trivial (norms, biases)
        torch.nn.init.normal_(p, std=0.05)
    (save_native if fmt == "native" else export_hf)(base, tmp_path / fmt)
    return tmp_path / fmt


@pytest.mark.parametrize("fmt", ["native", "hf-llama", "hf-gpt2"])
@pytest.mark.parametrize("bits", ["int4", "int8"])
def test_quantised_while_loading_equals_quantised_after_loading(tmp_path, fmt, bits):
    """``base_loader`` quantises each weight as it is read: the same codes, scales and logits as
    quantising the fully loaded model, and ``apply_peft`` then takes the base as it is."""
    from lmstack.model.checkpoint import load_checkpoint
    from lmstack.peft import base_loader

    folder = _saved_base(tmp_path, fmt)
    cfg = PEFTConfig(method="qlora", r=4, alpha=8, quant_bits=bits, group_size=32)
    torch.manual_seed(5)
    streamed = apply_peft(load_checkpoint(folder, convert=base_loader(cfg))[0], cfg)
    torch.manual_seed(5)
    after = apply_peft(load_checkpoint(folder)[0], cfg)
    assert isinstance(streamed.tok_emb, QuantEmbedding)
    a, b = streamed.state_dict(), after.state_dict()
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    ids = _ids(B=2, T=9)
    torch.testing.assert_close(streamed(ids), after(ids), rtol=0, atol=0)


def test_quantised_load_frees_each_full_precision_weight_before_reading_the_next(tmp_path):
    import weakref

    from lmstack.model.checkpoint import load_checkpoint
    from lmstack.quant import quantizing_loader

    inner = quantizing_loader("int4", 32, embeddings=True)
    taken: list[weakref.ref] = []

    def convert(model, key, t):
        import gc

        gc.collect()
        assert all(r() is None for r in taken), f"a quantised weight is still alive when {key} is read"
        done = inner(model, key, t)
        if done:
            taken.append(weakref.ref(t))
        return done

    model = load_checkpoint(_saved_base(tmp_path, "native"), convert=convert)[0]
    assert len(taken) == 1 + 7 * model.config.n_layer  # the embedding and every linear layer


def test_quantised_base_with_other_settings_is_an_error(tmp_path):
    from lmstack.errors import ConfigError
    from lmstack.model.checkpoint import load_checkpoint
    from lmstack.peft import base_loader

    folder = _saved_base(tmp_path, "native")
    model = load_checkpoint(folder, convert=base_loader(PEFTConfig(method="qlora", quant_bits="int4",
                                                                   group_size=32)))[0]
    with pytest.raises(ConfigError, match="already quantised as int4 .*asked for int8"):
        apply_peft(model, PEFTConfig(method="qlora", quant_bits="int8"))
    with pytest.raises(ConfigError, match="not a multiple of group_size=48"):
        load_checkpoint(folder, convert=base_loader(PEFTConfig(method="qlora", group_size=48)))


def test_prefix_tuning_keeps_keys_and_caches():
    from lmstack.infer.generate import stream_generate
    from lmstack.infer.sampling import SamplingParams

    base = _model()
    keys = set(base.state_dict())
    model = apply_peft(copy.deepcopy(base), PEFTConfig(method="prefix", n_prefix=5))
    assert all(isinstance(b.attn, PrefixAttention) for b in model.blocks)
    assert keys <= set(model.state_dict())
    with torch.no_grad():
        for b in model.blocks:
            b.attn.prefix_v.normal_(0, 0.5)
    ids = _ids(B=1, T=10)
    full = model(ids)
    assert (full - base(ids)).abs().max() > 1e-3
    with peft_disabled(model):
        torch.testing.assert_close(model(ids), base(ids), rtol=1e-5, atol=1e-5)
    # cached prefill + one decode step == uncached forward
    cache = model.new_cache(1)
    a = model(ids[:, :7], cache=cache)
    b = model(ids[:, 7:8], cache=cache)
    torch.testing.assert_close(torch.cat([a, b], 1), full[:, :8], rtol=1e-4, atol=1e-5)
    toks = [ev.token_id for ev in stream_generate(model, None, [ids[0].tolist()], SamplingParams(max_new_tokens=4))]
    assert len(toks) == 4


def test_bottleneck_adapter_identity_at_init_and_trainable():
    base = _model()
    ids = _ids()
    model = apply_peft(copy.deepcopy(base), PEFTConfig(method="adapter", adapter_size=8))
    assert sum(isinstance(m, AdapterLinear) for m in model.modules()) == 4
    torch.testing.assert_close(model(ids), base(ids), rtol=0, atol=0)
    trainable, _ = param_counts(model)
    assert trainable == 4 * (64 * 8 + 8 + 8 * 64 + 64)


@pytest.mark.parametrize("method", ["lora", "qlora", "prefix", "adapter", "full"])
def test_train_step_changes_every_trainable_param_and_no_frozen(method):
    model = apply_peft(_model(), PEFTConfig(method=method, r=4, alpha=8, group_size=32, n_prefix=4, adapter_size=8))
    model.train()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = _ids(T=16)
    for _ in range(2):  # LoRA's A gets no gradient while B is still zero: take two steps
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    for k, v in before.items():
        changed = not torch.equal(v, after[k])
        assert changed == (k in trainable), f"{k}: changed={changed}, trainable={k in trainable}"


@pytest.mark.parametrize("name,method,bits,ckpt,targets", [
    ("tiny-llama", "lora", "int4", False, None), ("tiny-gpt2", "lora", "int4", False, None),
    ("tiny-llama", "lora", "int4", True, None), ("tiny-llama", "qlora", "int4", False, None),
    ("tiny-qwen2", "qlora", "int8", True, None),
    ("tiny-llama", "lora", "int4", False, ["q_proj", "v_proj", "up_proj"])])
def test_lora_training_node_equals_the_plain_expression(monkeypatch, name, method, bits, ckpt, targets):
    """Training on the CPU runs each LoRA layer as one autograd node (``_LoRAFunction``, its
    rank-r products in BLAS's fast layouts), layers that read the same input (q/k/v, gate/up)
    as one node together: the same loss and gradients as the per-op expression, for dense and
    quantised bases, with biases (GPT-2, Qwen2's q/k/v), with activation checkpointing, and
    with only some projections adapted (no group then)."""
    from lmstack.model.model import shared_input

    kw = {"targets": targets} if targets else {}
    model = apply_peft(_model(name), PEFTConfig(method=method, r=4, alpha=8, group_size=32, quant_bits=bits, **kw))
    _randomise_lora(model)
    model.train()
    model.gradient_checkpointing = ckpt
    ids = _ids(T=16)

    def run(m):
        s, n = token_loss_sum(m, ids[:, :-1], ids[:, 1:])
        (s / n).backward()
        return s.detach(), {k: p.grad for k, p in m.named_parameters() if p.requires_grad}

    plain = copy.deepcopy(model)
    x = torch.randn(2, 5, 64, requires_grad=True)
    attn = model.blocks[0].attn
    assert type(attn.q_proj(x).grad_fn).__name__ == "_LoRAFunctionBackward"
    nodes = {id(t.grad_fn) for t in shared_input([attn.q_proj, attn.k_proj, attn.v_proj], x)}
    assert len(nodes) == (3 if targets else 1)
    s1, g1 = run(model)
    with monkeypatch.context() as mp:
        mp.setattr(LoRALinear, "_fused", lambda self, x: False)
        assert type(plain.blocks[0].attn.q_proj(x).grad_fn).__name__ != "_LoRAFunctionBackward"
        s0, g0 = run(plain)
    torch.testing.assert_close(s1, s0, rtol=1e-6, atol=1e-5)
    assert g0.keys() == g1.keys() and all(k.endswith(("lora_A", "lora_B")) for k in g0)
    for k in g0:
        assert g1[k] is not None and g1[k].abs().sum() > 0, k
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-6)


def test_lora_training_node_is_not_used_where_it_does_not_apply():
    model = apply_peft(_model(), PEFTConfig(method="lora", r=4, alpha=8, dropout=0.1)).train()
    m = model.blocks[0].attn.q_proj
    x = torch.randn(2, 5, 64, requires_grad=True)
    assert not m._fused(x)  # dropout active: the plain expression draws the mask
    model.eval()
    assert m._fused(x)
    with torch.no_grad():
        assert not m._fused(x)  # inference: the plain path (and its decoding kernels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not m._fused(x)
    with peft_disabled(model):
        assert not m._fused(x)
