"""Supervised fine-tuning on chat data: ``lmstack sft CONFIG.yaml``.

Data: JSONL, one example per line, either ``{"messages": [{"role", "content"}, ...]}`` (the
common chat format) or ``{"prompt": ..., "completion": ...}``. Chat examples are rendered with
the model's own chat template and the loss covers assistant turns only (their content and the
end-of-turn token); prompt/completion pairs are plain text with the loss on the completion.
Batches are right-padded (causal attention never looks right, so padding needs no attention
mask) or, with ``packing``, several examples share one row with a block-diagonal mask and
positions restarting at each example. A step accumulates ``grad_accum`` micro-batches, or
as many as it takes to reach ``tokens_per_step`` target tokens, and normalises the loss by
the step's target tokens. Full fine-tuning or any ``lmstack.peft`` method.
Deliberately left out: multi-turn loss weighting, sequence-level curriculum, and
tool-call turns in the loss (they train like any assistant turn).
"""

from __future__ import annotations

from lmstack.errors import LMStackError
from lmstack.peft.core import apply_peft, base_loader, describe_params, save_adapter
from lmstack.train.chat_data import collate, encode_dataset, measure, read_jsonl
from lmstack.train.common import EpochOrder, token_loss_sum
from lmstack.train.config import SFTConfig
from lmstack.train.run import Run


def _load_base(cfg: SFTConfig):
    from lmstack.infer.llm import LLM

    llm = LLM.load(cfg.model or None, device=cfg.device, seed=cfg.seed, convert=base_loader(cfg.peft))
    if llm.tokenizer is None:
        raise LMStackError(f"model {cfg.model!r} has no tokenizer; SFT needs one to render chats")
    return llm.model, llm.tokenizer


def _step_items(order: EpochOrder, counts: list[int], rows: int, accum: int, tokens_per_step: int) -> list[list[int]]:
    """The examples of one optimizer step as micro-batches of ``rows`` indices (all processes).

    ``accum`` micro-batches, or with ``tokens_per_step`` as many as it takes for the step to
    hold at least that many target tokens (``counts[i]`` for example ``i``). Every process
    computes the same split from the same order, so they agree on the number of micro-batches.
    """
    micro: list[list[int]] = []
    n = 0
    while (n < tokens_per_step) if tokens_per_step else (len(micro) < accum):
        micro.append([i for _, i in order.take(rows)])
        n += sum(counts[i] for i in micro[-1])
    return micro


def _steps_for_epochs(epochs: float, counts: list[int], seed: int, rows: int, accum: int,
                      tokens_per_step: int) -> int:
    """Optimizer steps that cover ``epochs`` passes over the data (a dry run of the batch order)."""
    order, steps, seen = EpochOrder(len(counts), seed), 0, 0
    while seen < epochs * len(counts):
        seen += sum(len(m) for m in _step_items(order, counts, rows, accum, tokens_per_step))
        steps += 1
    return max(1, steps)


def sft(cfg: SFTConfig, resume: bool = False) -> dict:
    method = cfg.peft.method
    run = Run.start(cfg, f"sft ({method})", resume, trainable_only=method != "full")
    # The data is read before the model loads (seconds to minutes): a wrong path fails at once.
    train_rows = read_jsonl(cfg.data, "data")
    val_rows = read_jsonl(cfg.val_data, "val_data") if cfg.val_data else []
    model, tok = _load_base(cfg)
    apply_peft(model, cfg.peft)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    if run.dist.main:
        print(f"sft: {method}, {describe_params(model)}")
    train = encode_dataset(tok, train_rows, cfg.max_len)
    val = encode_dataset(tok, val_rows, cfg.max_len) if val_rows else []
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    world, rank = run.dist.world, run.dist.rank
    rows = cfg.batch_size * world
    accum = cfg.grad_accum or 1
    counts = [sum(m[1:]) for _, m in train]  # target tokens of each example
    if cfg.epochs > 0:
        steps = _steps_for_epochs(cfg.epochs, counts, cfg.seed, rows, accum, cfg.tokens_per_step)
        if rank == 0:
            print(f"sft: epochs {cfg.epochs} = {steps} optimizer steps (this replaces max_steps {cfg.max_steps})")
        cfg.max_steps = steps

    def evaluate(model) -> dict:
        total, count = 0.0, 0
        for i in range(rank * cfg.batch_size, len(val), rows):
            b = collate(val[i:i + cfg.batch_size], pad)
            s, n = token_loss_sum(model, b["inputs"].to(cfg.device), b["targets"].to(cfg.device),
                                  selective=not run.fsdp, loss_chunk=cfg.loss_chunk)
            total, count = total + float(s), count + n
        return {"val_loss": run.reduce_sum(total) / max(1.0, run.reduce_sum(count))}

    run.resume(model)
    before = None
    if cfg.measure and run.dist.main and val_rows and not resume:
        before = measure(model, tok, val_rows, cfg.max_len, cfg.measure_max_new_tokens,
                         progress=cfg.progress, desc="measure before")
        print(f"before: held-out loss {before['loss']:.4f}, exact match {before['exact_match']:.3f}")
    run.prepare(model, len(train), evaluate=evaluate if val else None)
    if before is not None:
        run.metrics.log({"step": 0, "measure_before": before})
    for _ in run.steps():
        micro_batches = _step_items(run.order, counts, rows, accum, cfg.tokens_per_step)
        n_step = sum(counts[i] for mb in micro_batches for i in mb)  # target tokens of the whole global step
        loss_sum, n_tok = 0.0, 0
        for k, mb in enumerate(micro_batches):
            b = collate([train[i] for i in mb[rank * cfg.batch_size:(rank + 1) * cfg.batch_size]], pad,
                        cfg.packing, cfg.max_len)
            kw = {"doc_ids": b["doc_ids"].to(cfg.device)} if cfg.packing else {}
            with run.micro_batch(last=k == len(micro_batches) - 1):
                s, _ = token_loss_sum(run.model, b["inputs"].to(cfg.device), b["targets"].to(cfg.device),
                                      selective=not run.fsdp, loss_chunk=cfg.loss_chunk, **kw)
                (s * (world / n_step)).backward()
            loss_sum, n_tok = loss_sum + s.item(), n_tok + b["inputs"].numel()
        run.end_step(run.reduce_sum(loss_sum) / n_step, tokens=n_tok,
                     metrics={"target_tokens": n_step, "micro_batches": len(micro_batches)})

    final = run.final_model(lambda: _peft_model(cfg))
    after = None
    if final is not None:
        if cfg.measure and val_rows:
            after = measure(final, tok, val_rows, cfg.max_len, cfg.measure_max_new_tokens,
                            progress=cfg.progress, desc="measure after")
            run.metrics.log({"step": run.step, "measure_after": after})
            print(f"after: held-out loss {after['loss']:.4f}, exact match {after['exact_match']:.3f}")
        _save_final(final, tok, cfg, run)
    summary = run.finish(f"sft {method}")
    if after is not None:
        summary.update(before=before, after=after)
    return summary


def _peft_model(cfg: SFTConfig):
    """A fresh base with the run's PEFT modules: what rank 0 loads an FSDP run's tensors into."""
    model, _ = _load_base(cfg)
    apply_peft(model, cfg.peft)
    return model


def _save_final(final, tok, cfg: SFTConfig, run: Run) -> None:
    """``final/`` (a native model) for full fine-tuning; ``adapter/`` for PEFT, plus a merged
    ``final/`` with ``export_merged``."""
    from lmstack.model.checkpoint import save_native

    if cfg.peft.method == "full":
        save_native(final, run.dir / "final", tok, metadata={"source": "lmstack sft", "steps": run.step})
        return
    save_adapter(final, run.dir / "adapter")
    if cfg.export_merged:
        from lmstack.peft import merge_and_unload

        save_native(merge_and_unload(final), run.dir / "final", tok, metadata={"source": "lmstack sft (merged)"})
