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

import time
from pathlib import Path
from typing import Any, Optional

import torch

from lmstack.config import config_to_dict
from lmstack.errors import LMStackError
from lmstack.peft.core import apply_peft, base_loader, describe_params, save_adapter
from lmstack.train.chat_data import collate, encode_dataset, measure, read_jsonl
from lmstack.train.checkpoint import ensure_fresh, latest_checkpoint, load_checkpoint_state
from lmstack.train.config import SFTConfig
from lmstack.train.common import (EpochOrder, MetricsLog, all_reduce_sum, autocast, full_state_dict,
                                  grad_norm_and_clip, init_distributed, load_model_tensors, lr_at,
                                  nonfinite_step, prepare_training, save_training_state, seed_all,
                                  token_loss_sum)


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
    cfg.check()
    dist_ = init_distributed(cfg.device)
    run = Path(cfg.out_dir)
    ckpts = run / "checkpoints"
    if not resume:
        ensure_fresh(ckpts)
    seed_all(cfg.seed)
    model, tok = _load_base(cfg)
    apply_peft(model, cfg.peft)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    trainable_only = cfg.peft.method != "full"
    if dist_.main:
        print(f"sft: {cfg.peft.method}, {describe_params(model)}")
    train = encode_dataset(tok, read_jsonl(cfg.data), cfg.max_len)
    val_rows = read_jsonl(cfg.val_data) if cfg.val_data else []
    val = encode_dataset(tok, val_rows, cfg.max_len) if val_rows else []
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    rows = cfg.batch_size * dist_.world
    accum = cfg.grad_accum or 1
    counts = [sum(m[1:]) for _, m in train]  # target tokens of each example
    if cfg.epochs > 0:
        cfg.max_steps = _steps_for_epochs(cfg.epochs, counts, cfg.seed, rows, accum, cfg.tokens_per_step)
    order = EpochOrder(len(train), cfg.seed)
    step, state, train_state = 0, None, None
    if resume:
        ck = latest_checkpoint(ckpts)
        if ck is None:
            raise LMStackError(f"--resume: no complete checkpoint under {ckpts}")
        tensors, train_state, state = load_checkpoint_state(ck)
        load_model_tensors(model, tensors, trainable_only)
        step = state["step"]
        order = EpochOrder(len(train), cfg.seed, epoch=state["data"]["epoch"], cursor=state["data"]["cursor"])
    before = None
    if cfg.measure and dist_.main and val_rows and not resume:
        before = measure(model, tok, val_rows, cfg.max_len, cfg.measure_max_new_tokens)
        print(f"before: held-out loss {before['loss']:.4f}, exact match {before['exact_match']:.3f}")
    model, core, fsdp, opt, params = prepare_training(model, cfg, dist_, state, train_state)
    log = MetricsLog(run, enabled=dist_.main, resume_step=step if resume else None)
    if before is not None:
        log.log({"step": 0, "measure_before": before})

    def evaluate() -> Optional[float]:
        if not val:
            return None
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad(), autocast(cfg.device, cfg.dtype):
            for i in range(dist_.rank * cfg.batch_size, len(val), rows):
                b = collate(val[i:i + cfg.batch_size], pad)
                s, n = token_loss_sum(model, b["inputs"].to(cfg.device), b["targets"].to(cfg.device),
                                      selective=not fsdp, loss_chunk=cfg.loss_chunk)
                total, count = total + float(s), count + n
        model.train()
        return all_reduce_sum(total, dist_) / max(1.0, all_reduce_sum(count, dist_))

    bar = None
    if dist_.main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_steps, initial=step, desc=f"sft ({cfg.peft.method})", dynamic_ncols=True)
    losses: list[float] = []
    best = state["metrics"].get("best_val_loss", float("inf")) if state else float("inf")
    model.train()
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        micro_batches = _step_items(order, counts, rows, accum, cfg.tokens_per_step)
        n_step = sum(counts[i] for mb in micro_batches for i in mb)  # target tokens of the whole global step
        loss_sum, n_tok = 0.0, 0
        for k, mb in enumerate(micro_batches):
            mine = mb[dist_.rank * cfg.batch_size:(dist_.rank + 1) * cfg.batch_size]
            b = collate([train[i] for i in mine], pad, cfg.packing, cfg.max_len)
            kw = {"doc_ids": b["doc_ids"].to(cfg.device)} if cfg.packing else {}
            sync = k == len(micro_batches) - 1 or dist_.world == 1 or fsdp
            ctx = model.no_sync() if not sync else torch.enable_grad()
            with ctx, autocast(cfg.device, cfg.dtype):
                s, n = token_loss_sum(model, b["inputs"].to(cfg.device), b["targets"].to(cfg.device),
                                      selective=not fsdp, loss_chunk=cfg.loss_chunk, **kw)
                (s * (dist_.world / n_step)).backward()
            loss_sum, n_tok = loss_sum + s.item(), n_tok + b["inputs"].numel()
        loss = all_reduce_sum(loss_sum, dist_) / n_step
        gnorm = grad_norm_and_clip(params, cfg.grad_clip)
        skipped = nonfinite_step(loss, gnorm, step, cfg, ckpts)
        if skipped:
            opt.zero_grad(set_to_none=True)
            step += 1
            log.log({"step": step, "skipped": skipped})
            continue
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tps = all_reduce_sum(n_tok, dist_) / (time.perf_counter() - t0)
        rec = {"step": step, "loss": loss, "lr": lr, "grad_norm": gnorm, "tokens_per_s": tps,
               "step_time_s": time.perf_counter() - t0, "epoch": order.epoch, "target_tokens": n_step,
               "micro_batches": len(micro_batches)}
        losses.append(loss)
        last_step = step == cfg.max_steps
        if step % cfg.eval_interval == 0 or last_step:
            v = evaluate()
            if v is not None:
                rec["val_loss"] = v
                best = min(best, v)
        log.log(rec)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}")
        if step % cfg.ckpt_interval == 0 or last_step:
            save_training_state(model, opt, dist_, ckpts, step, trainable_only, rec, best, order.state(),
                                {"config": config_to_dict(cfg)}, cfg.keep_last)
    if bar is not None:
        bar.close()
    summary: dict[str, Any] = {"run_dir": str(run), "steps": step, "losses": losses}
    final = core
    if fsdp:  # gather the trained tensors (collective) into an unsharded copy on rank 0
        tensors = full_state_dict(model, dist_, trainable_only)
        if dist_.main:
            final, _ = _load_base(cfg)
            apply_peft(final, cfg.peft)
            load_model_tensors(final, tensors, trainable_only)
    if dist_.main:
        if cfg.measure and val_rows:
            after = measure(final, tok, val_rows, cfg.max_len, cfg.measure_max_new_tokens)
            log.log({"step": step, "measure_after": after})
            print(f"after: held-out loss {after['loss']:.4f}, exact match {after['exact_match']:.3f}")
            summary.update(before=before, after=after)
        from lmstack.model.checkpoint import save_native

        if cfg.peft.method == "full":
            save_native(final, run / "final", tok, metadata={"source": "lmstack sft", "steps": step})
        else:
            save_adapter(final, run / "adapter")
            if cfg.export_merged:
                from lmstack.peft import merge_and_unload

                save_native(merge_and_unload(final), run / "final", tok, metadata={"source": "lmstack sft (merged)"})
        summary["plot"] = str(log.plot(f"sft {cfg.peft.method}") or "")
    log.close()
    return summary
