"""Tiny random Hugging Face checkpoints of each supported family, made in the test."""

from __future__ import annotations

import torch


def make_hf_model(family: str, seed: int = 0):
    transformers = __import__("transformers")
    torch.manual_seed(seed)
    common = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=112, max_position_embeddings=128)
    if family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=96, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = transformers.GPT2LMHeadModel(cfg)
    elif family == "llama":
        cfg = transformers.LlamaConfig(num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-6,
                                       tie_word_embeddings=False, **common)
        model = transformers.LlamaForCausalLM(cfg)
    elif family == "llama-tied-mqa":
        cfg = transformers.LlamaConfig(num_key_value_heads=1, rope_theta=100000.0, rms_norm_eps=1e-5,
                                       tie_word_embeddings=True, **common)
        model = transformers.LlamaForCausalLM(cfg)
    elif family == "mistral":
        cfg = transformers.MistralConfig(num_key_value_heads=2, sliding_window=8, rms_norm_eps=1e-5,
                                         tie_word_embeddings=False, **common)
        model = transformers.MistralForCausalLM(cfg)
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6,
                                       tie_word_embeddings=True, **common)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        raise ValueError(family)
    # Random init leaves some tensors at 0/1 (biases, norms): perturb so every weight matters.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


FAMILIES = ["gpt2", "llama", "llama-tied-mqa", "mistral", "qwen2"]
