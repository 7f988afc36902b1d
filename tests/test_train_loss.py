"""Fused output projection + cross-entropy: parity with the unfused loss, gradients, memory."""

import copy

import pytest
import torch
import torch.nn.functional as F

from lmstack.model import Transformer, preset
from lmstack.peft import PEFTConfig, apply_peft
from lmstack.quant import QuantEmbedding
from lmstack.train.common import IGNORE, token_loss_sum
from lmstack.train.loss import linear_cross_entropy


def _data(N=37, C=64, V=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, C, generator=g)
    w = torch.randn(V, C, generator=g) * 0.5
    t = torch.randint(0, V, (N,), generator=g)
    return h, w, t


@pytest.mark.parametrize("chunk", [1000, 300, 4096, 7])
def test_fused_loss_and_gradients_equal_unfused(chunk):
    h, w, t = _data()
    h1, w1 = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref = F.cross_entropy(F.linear(h1, w1), t, reduction="sum")
    (3 * ref).backward()
    h2, w2 = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = linear_cross_entropy(h2, w2, t, chunk)
    (3 * out).backward()  # the incoming gradient is scaled through
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [1000, 300, 7])
def test_fused_loss_with_a_frozen_table_forms_the_gradient_in_one_walk(chunk):
    # The PEFT case: the table needs no gradient, so d loss / d h is accumulated during the
    # forward (one walk over the vocabulary) and the backward only scales it.
    h, w, t = _data()
    h1 = h.clone().requires_grad_(True)
    ref = F.cross_entropy(F.linear(h1, w), t, reduction="sum")
    (3 * ref).backward()
    h2 = h.clone().requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(tuple(x.shape)) or x, lambda x: x):
        out = linear_cross_entropy(h2, w, t, chunk)
    assert saved == [tuple(h.shape)]  # the gradient itself: no table, no logits, no h
    (3 * out).backward()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-5, atol=1e-5)


def test_fused_loss_with_a_frozen_table_under_bf16_autocast():
    h, w, t = _data()
    h0, h1, h2 = (h.clone().requires_grad_(True) for _ in range(3))
    F.cross_entropy(F.linear(h0, w), t, reduction="sum").backward()  # fp32 reference
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(h1, w).float(), t, reduction="sum")
        out = linear_cross_entropy(h2, w, t, 256)
    ref.backward()
    out.backward()
    assert h2.grad.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-3)
    # bf16 products, summed in another order than torch's: no further from fp32 than torch's bf16 gradient
    err = (h2.grad - h0.grad).abs().max()
    torch_err = (h1.grad - h0.grad).abs().max()
    assert 0 < err <= 2 * torch_err


def test_fused_loss_reads_a_quantised_table_in_slices():
    h, w, t = _data()
    emb = torch.nn.Embedding(*w.shape)
    with torch.no_grad():
        emb.weight.copy_(w)
    q = QuantEmbedding(emb, "int4", 32)
    h1, h2 = h.clone().requires_grad_(True), h.clone().requires_grad_(True)
    ref = F.cross_entropy(F.linear(h1, q.weight), t, reduction="sum")
    ref.backward()
    out = linear_cross_entropy(h2, None, t, 128, q.rows, q.num_embeddings)
    out.backward()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-5, atol=1e-5)


def test_fused_loss_under_bf16_autocast_matches_bf16_logits():
    h, w, t = _data()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(h, w).float(), t, reduction="sum")
        out = linear_cross_entropy(h, w, t, 256)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-3)


def test_fused_loss_keeps_no_logits_for_backward():
    h, w, t = _data(V=5000)
    h.requires_grad_(True)
    w.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
        linear_cross_entropy(h, w, t, 512)
    # h, the weight itself (no copy), the targets and one log-sum-exp per token: no N x vocab block
    assert sorted(saved) == sorted([h.numel(), w.numel(), h.shape[0], h.shape[0]])


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_token_loss_sum_fused_equals_unfused(method):
    torch.manual_seed(0)
    model = apply_peft(Transformer(preset("tiny-llama")), PEFTConfig(method=method, r=4, alpha=8, group_size=32))
    if method == "qlora":
        assert isinstance(model.tok_emb, QuantEmbedding)  # the tied output projection is read quantised
    model.train()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 320, (3, 17), generator=g)
    y = torch.randint(0, 320, (3, 17), generator=g)
    y[:, :5] = IGNORE
    runs = []
    for m, chunk in ((model, 0), (copy.deepcopy(model), 100)):
        s, n = token_loss_sum(m, x, y, loss_chunk=chunk)
        (s / n).backward()
        runs.append((s.detach(), n, {k: p.grad for k, p in m.named_parameters() if p.requires_grad}))
    (s0, n0, g0), (s1, n1, g1) = runs
    assert n0 == n1 == 36
    torch.testing.assert_close(s1, s0, rtol=1e-6, atol=1e-4)
    assert g0.keys() == g1.keys() and g0
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-6)
