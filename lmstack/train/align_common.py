"""What the alignment stages share: a prompt and a completion as token ids, right-padded
batches with a completion mask, and the per-sequence log-probability of each completion.

A conversational example is rendered with the model's chat template: the prompt with the
generation prompt appended, the completion as whatever the template adds after it for the
completion's messages (their content and end-of-turn tokens; whitespace after the last
end-of-turn is dropped, as in SFT). A plain example is the prompt (with BOS when the model
wants one) followed by the completion and EOS. Truncation follows TRL: the prompt keeps its
last ``max_prompt_len`` tokens, then the completion is cut so the pair fits ``max_len``.

``completion_logps`` never forms the ``(B, T, vocab)`` logits: the model returns the final
hidden states of completion positions only, and each sequence's log-likelihood is the
fused, vocabulary-chunked cross-entropy of ``lmstack.train.loss`` (which, for a frozen
output table as under LoRA, also forms the hidden-state gradient in its one forward walk).
The reference policy of a LoRA/QLoRA run is the same model under
``lmstack.peft.core.peft_disabled``; no second copy exists unless a stage is given one.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from lmstack.errors import LMStackError
from lmstack.quant.linear import QuantEmbedding
from lmstack.train.align_data import Text, is_conversational
from lmstack.train.loss import compute_dtype, linear_cross_entropy, vocab_walk

Encoded = tuple[list[int], list[int]]  # (prompt ids, completion ids)


def render(tok, prompt: Text, completion: Text) -> tuple[str, str]:
    """``(prompt text, completion text)`` of a conversational example, by the chat template."""
    head = tok.apply_chat_template(prompt, add_generation_prompt=True) if prompt else ""
    whole = tok.apply_chat_template(list(prompt) + list(completion), add_generation_prompt=False)
    if not whole.startswith(head):
        raise LMStackError("the chat template does not render the prompt as a prefix of prompt + completion; "
                           "preference training needs such a template")
    return head, whole[len(head):].rstrip()


def encode(tok, prompt: Text, completion: Text, max_len: int, max_prompt_len: int = 0) -> Optional[Encoded]:
    """Prompt and completion token ids, truncated; None when no completion token fits."""
    if is_conversational(prompt) or is_conversational(completion):
        head, tail = render(tok, prompt, completion)
        p = tok.hf.encode(head, add_special_tokens=False).ids if head else []
        c = tok.hf.encode(tail, add_special_tokens=False).ids
    else:
        p = tok.encode(prompt, add_special_tokens=True)
        c = tok.encode(completion) + ([tok.eos_token_id] if tok.eos_token_id is not None else [])
    if max_prompt_len and len(p) > max_prompt_len:
        p = p[len(p) - max_prompt_len:]
    c = c[:max(0, max_len - len(p))]
    if not p or not c:  # the first token has no prediction: a completion needs a token before it
        return None
    return list(p), list(c)


def collate(items: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` (B, T) and ``completion_mask`` (B, T), True on completion tokens."""
    T = max(len(p) + len(c) for p, c in items)
    input_ids = torch.full((len(items), T), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((len(items), T), dtype=torch.bool)
    for b, (p, c) in enumerate(items):
        input_ids[b, :len(p) + len(c)] = torch.tensor(p + c)
        completion_mask[b, len(p):len(p) + len(c)] = True
    return {"input_ids": input_ids, "completion_mask": completion_mask}


def pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)


class _TokenLogps(torch.autograd.Function):
    """``log softmax(h @ W.T)[target]`` per token ``(N,)``, one walk over the vocabulary for all
    tokens, for a table that gets no gradient (PEFT, or no gradient at all).

    The walk is ``lmstack.train.loss``'s (online log-sum-exp; with ``h`` needing a gradient,
    ``d logp / d h = W[target] - softmax(z) W`` accumulated chunk by chunk), returning each
    token's value instead of their sum, so one call serves every sequence of the batch (a call
    per sequence would read the whole table once per sequence)."""

    @staticmethod
    def forward(ctx, h, weight, targets, rows, vocab_size: int, chunk: int, dt: torch.dtype):
        want = ctx.needs_input_grad[0]
        lse, target_logit, acc, w_target = vocab_walk(h, weight, rows, targets, vocab_size, chunk, dt, want)
        if want:
            ctx.save_for_backward(w_target.sub_(acc))  # d logp / d h, (N, C)
        ctx.h_dtype = h.dtype
        return target_logit - lse

    @staticmethod
    def backward(ctx, grad):
        (grad_h,) = ctx.saved_tensors
        return (grad_h * grad[:, None]).to(ctx.h_dtype), None, None, None, None, None, None


def completion_logps(model, input_ids: torch.Tensor, completion_mask: torch.Tensor, loss_chunk: int = 4096,
                     selective: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of log pi(y_t | x, y_<t) over completion tokens (B,), completion tokens (B,))``.

    ``selective`` runs the last block's MLP, the final norm and the output projection on the
    completion positions only and walks the vocabulary in chunks of ``loss_chunk`` rows, so the
    ``(N, vocab)`` logits never exist; ``selective=False`` (FSDP, whose wrapped forward must own
    the projection) forms the logits and a float32 log-softmax.
    """
    inputs, targets, keep = input_ids[:, :-1], input_ids[:, 1:], completion_mask[:, 1:]  # predict t+1 from <= t
    n_tokens = keep.sum(dim=1)  # (B,)
    if not selective:
        logp = F.log_softmax(model(inputs).float(), dim=-1).gather(-1, targets[..., None])[..., 0]  # (B, T-1)
        return (logp * keep).sum(dim=1), n_tokens
    h = model(inputs, return_hidden=True, keep=keep)[0]  # (N, C), the completion positions in row-major order
    t = targets[keep]  # (N,)
    row = keep.nonzero()[:, 0]  # (N,) the sequence of each token
    core = model.module if hasattr(model, "module") else model
    table = core.tok_emb if core.config.tie_embeddings else None
    chunk = loss_chunk or 4096
    if isinstance(table, QuantEmbedding):
        tok = _TokenLogps.apply(h, None, t, table.rows, table.num_embeddings, chunk, compute_dtype(h))
    elif not core.output_weight.requires_grad or not torch.is_grad_enabled():
        tok = _TokenLogps.apply(h, core.output_weight.detach(), t, None, core.output_weight.shape[0], chunk, compute_dtype(h))
    else:  # full fine-tuning: the table's gradient too, through the fused loss, one sequence at a time
        sums = [-linear_cross_entropy(hb, core.output_weight, tb, chunk) if len(tb) else h.new_zeros(())
                for hb, tb in zip(h.split(n_tokens.tolist()), t.split(n_tokens.tolist()))]
        return torch.stack(sums).float(), n_tokens
    return torch.zeros(len(n_tokens), device=h.device).index_add(0, row, tok), n_tokens



# -- the policy, its reference and its outputs -------------------------------------------------


def load_policy(cfg):
    """``(model, tokenizer)``: ``cfg.model`` (empty: the embedded default) with ``cfg.peft`` attached."""
    from lmstack.infer.llm import LLM
    from lmstack.peft.core import apply_peft, base_loader

    llm = LLM.load(cfg.model or None, device=cfg.device, seed=cfg.seed, convert=base_loader(cfg.peft))
    if llm.tokenizer is None:
        raise LMStackError(f"model {cfg.model!r} has no tokenizer; preference training needs one")
    apply_peft(llm.model, cfg.peft)
    llm.model.gradient_checkpointing = cfg.gradient_checkpointing
    return llm.model, llm.tokenizer


def load_reference(name: str, cfg):
    """A separate frozen reference model (``ref_model``), in eval mode."""
    from lmstack.infer.llm import LLM

    ref = LLM.load(name, device=cfg.device, seed=cfg.seed).model.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


@torch.no_grad()
def reference_logps(model, b: dict[str, torch.Tensor], ref_model=None, loss_chunk: int = 4096,
                    selective: bool = True) -> torch.Tensor:
    """Sequence log-probs ``(B,)`` under the reference: ``ref_model`` when given, else ``model``
    with its PEFT modules passed through (the base weights the adapters started from)."""
    from lmstack.peft.core import peft_disabled

    if ref_model is not None:
        return completion_logps(ref_model, b["input_ids"], b["completion_mask"], loss_chunk, selective)[0]
    with peft_disabled(model):
        return completion_logps(model, b["input_ids"], b["completion_mask"], loss_chunk, selective)[0]


def cached_logps(path, items: list[Encoded], compute, batch_size: int, reuse: bool, main: bool = True
                 ) -> torch.Tensor:
    """``compute(batch)`` over ``items`` in batches, as one ``(len(items),)`` tensor, kept in
    ``path``: with ``reuse`` (a resumed run) it is read back instead of recomputed. Only the
    ``main`` process writes it."""
    from pathlib import Path

    from lmstack.files import atomic_write

    path = Path(path)
    if reuse and path.is_file():
        out = torch.load(path, weights_only=True)
        if out.shape == (len(items),):
            return out
    out = torch.cat([compute(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]).float()
    if main:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: torch.save(out, f))
    return out


def save_final(final, tok, cfg, run, source: str) -> None:
    """``final/`` (a native model) for full fine-tuning; ``adapter/`` for PEFT, plus a merged
    ``final/`` with ``export_merged``. Both load with ``LLM.load``."""
    from lmstack.model.checkpoint import save_native
    from lmstack.peft.core import save_adapter

    if cfg.peft.method == "full":
        save_native(final, run.dir / "final", tok, metadata={"source": source, "steps": run.step})
        return
    save_adapter(final, run.dir / "adapter")
    if cfg.export_merged:
        from lmstack.peft import merge_and_unload

        save_native(merge_and_unload(final), run.dir / "final", tok, metadata={"source": f"{source} (merged)"})


def plot_metrics(records: list[dict], out, keys: list[str], title: str = ""):
    """``keys`` of the metrics records against the step, one line each, to ``out`` (PNG);
    None when matplotlib is not installed or no record has them."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None or not any(k in r for r in records for k in keys):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmstack.files import atomic_write

    fig, ax = plt.subplots(figsize=(7, 4))
    for k in keys:
        pts = [(r["step"], r[k]) for r in records if isinstance(r.get(k), (int, float))]
        if pts:
            ax.plot(*zip(*pts), "o-" if k.startswith("val_") else "-", label=k, lw=1, ms=3)
    ax.set_xlabel("optimizer step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return out
