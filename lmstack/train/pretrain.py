"""Pre-training from scratch on token shards: ``lmstack pretrain CONFIG.yaml``.

One flat loop: batch, forward, loss, backward (with gradient accumulation), clip, step,
schedule, log, eval, checkpoint. Windows of ``seq_len + 1`` tokens are read from the shards
of the data pipeline at a per-epoch random offset in a per-epoch random order, so the data
position is (epoch, cursor) and a resumed run sees the same batches as an uninterrupted one.
Under ``torchrun`` every process reads its slice of the same global batch (DDP or FSDP).
Deliberately left out: mixed-length curriculum, data mixing at train time (the data stage
owns the mixture), and fp16 loss scaling (bf16 needs none).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from lmstack.config import config_to_dict
from lmstack.errors import ConfigError, LMStackError
from lmstack.model import Transformer, preset
from lmstack.train.checkpoint import ensure_fresh, latest_checkpoint, load_checkpoint_state
from lmstack.train.config import PretrainConfig
from lmstack.train.common import (EpochOrder, MetricsLog, all_reduce_sum, autocast, flops_per_token,
                                  full_state_dict, grad_norm_and_clip, init_distributed, load_model_tensors,
                                  lr_at, nonfinite_step, peak_flops, prepare_training, save_training_state,
                                  seed_all, token_loss_sum)


def _windows(data, order_items: list[tuple[int, int]], seq_len: int, seed: int) -> torch.Tensor:
    rows = []
    for epoch, i in order_items:
        offset = int(np.random.default_rng([seed, epoch, 7]).integers(0, seq_len))
        rows.append(data.get_window(offset + i * seq_len, seq_len + 1))
    return torch.from_numpy(np.stack(rows))  # (B, seq_len + 1)


def _samples(model, tok, prompts: list[str], n: int, temperature: float, seed: int) -> list[dict]:
    from lmstack.infer.generate import stream_generate
    from lmstack.infer.sampling import SamplingParams

    if tok is None:
        return []
    was = model.training
    model.eval()
    ids = [tok.encode(p) for p in prompts]
    out = [""] * len(prompts)
    rng = torch.get_rng_state()  # sampling must not move the training RNG (resume stays exact)
    params = SamplingParams(max_new_tokens=n, temperature=temperature, top_k=50, seed=seed)
    for ev in stream_generate(model, tok, ids, params):
        out[ev.row] += ev.text
    torch.set_rng_state(rng)
    model.train(was)
    return [{"prompt": p, "completion": c} for p, c in zip(prompts, out)]


def pretrain(cfg: PretrainConfig, resume: bool = False) -> dict:
    from lmstack.data.shards import TokenShards

    cfg.check()
    dist_ = init_distributed(cfg.device)
    run = Path(cfg.out_dir)
    ckpts = run / "checkpoints"
    if not resume:
        ensure_fresh(ckpts)
    seed_all(cfg.seed)
    train = TokenShards(cfg.data, "train")
    try:
        val: Optional[TokenShards] = TokenShards(cfg.data, "val")
    except ConfigError:
        val = None
    mcfg = dataclasses.replace(preset(cfg.model), vocab_size=train.vocab_size, **cfg.model_overrides)
    if cfg.seq_len > mcfg.block_size:
        raise ConfigError(f"PretrainConfig.seq_len: got {cfg.seq_len}, expected <= the model's "
                          f"block_size {mcfg.block_size}")
    tok = None
    tok_path = Path(cfg.data) / "tokenizer"
    if (tok_path / "tokenizer.json").is_file():
        from lmstack.tokenizer import Tokenizer

        tok = Tokenizer.load(tok_path)
    model = Transformer(mcfg).to(cfg.device)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    n_params = model.num_params()

    rows = cfg.batch_size * dist_.world  # rows of one global micro-batch
    accum = cfg.grad_accum or max(1, cfg.tokens_per_step // (rows * cfg.seq_len))
    if cfg.tokens_per_step and accum * rows * cfg.seq_len != cfg.tokens_per_step:
        raise ConfigError(f"PretrainConfig.tokens_per_step: {cfg.tokens_per_step} is not a multiple of "
                          f"batch_size x processes x seq_len = {rows * cfg.seq_len}")
    n_windows = (train.num_tokens - cfg.seq_len - 1) // cfg.seq_len
    order = EpochOrder(n_windows, cfg.seed)
    step, state, train_state = 0, None, None
    if resume:
        ck = latest_checkpoint(ckpts)
        if ck is None:
            raise LMStackError(f"--resume: no complete checkpoint under {ckpts}")
        tensors, train_state, state = load_checkpoint_state(ck)
        load_model_tensors(model, tensors, trainable_only=False)
        step = state["step"]
        order = EpochOrder(n_windows, cfg.seed, epoch=state["data"]["epoch"], cursor=state["data"]["cursor"])
    model, core, fsdp, opt, params = prepare_training(model, cfg, dist_, state, train_state)
    log = MetricsLog(run, enabled=dist_.main, resume_step=step if resume else None)
    peak = cfg.peak_flops or peak_flops(cfg.device, torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32)
    fpt = flops_per_token(mcfg, n_params, cfg.seq_len)
    tokens_per_step = accum * rows * cfg.seq_len
    if dist_.main:
        print(f"pretrain: {cfg.model} {n_params / 1e6:.2f}M params, {train.num_tokens:,} train tokens, "
              f"{tokens_per_step:,} tokens/step ({accum} x {rows} x {cfg.seq_len}), {dist_.world} process(es)")
    if dist_.main and not resume and not fsdp:
        log.log({"step": 0, "samples": _samples(core, tok, cfg.sample_prompts, cfg.sample_tokens,
                                                cfg.sample_temperature, cfg.seed)})

    def evaluate() -> Optional[float]:
        if val is None:
            return None
        model.eval()
        n_val = min(cfg.eval_batches * rows, (val.num_tokens - 1) // cfg.seq_len)
        total, count = 0.0, 0
        with torch.no_grad(), autocast(cfg.device, cfg.dtype):
            for b in range(dist_.rank * cfg.batch_size, n_val, rows):
                idx = range(b, min(b + cfg.batch_size, n_val))
                x = torch.from_numpy(np.stack([val.get_window(i * cfg.seq_len, cfg.seq_len + 1) for i in idx]))
                x = x.to(cfg.device)
                s, n = token_loss_sum(model, x[:, :-1], x[:, 1:], selective=not fsdp, loss_chunk=cfg.loss_chunk)
                total, count = total + float(s), count + n
        model.train()
        return all_reduce_sum(total, dist_) / max(1.0, all_reduce_sum(count, dist_))

    bar = None
    if dist_.main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_steps, initial=step, desc="pretrain", dynamic_ncols=True)
    losses: list[float] = []
    best = state["metrics"].get("best_val_loss", float("inf")) if state else float("inf")
    model.train()
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        loss_sum = 0.0
        for micro in range(accum):
            items = order.take(rows)[dist_.rank * cfg.batch_size:(dist_.rank + 1) * cfg.batch_size]
            x = _windows(train, items, cfg.seq_len, cfg.seed).to(cfg.device)
            sync = micro == accum - 1 or dist_.world == 1 or fsdp
            ctx = model.no_sync() if not sync else torch.enable_grad()
            with ctx, autocast(cfg.device, cfg.dtype):
                s, _ = token_loss_sum(model, x[:, :-1], x[:, 1:], selective=not fsdp, loss_chunk=cfg.loss_chunk)
                (s * (dist_.world / tokens_per_step)).backward()
            loss_sum += s.item()
        loss = all_reduce_sum(loss_sum, dist_) / tokens_per_step
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
        dt = time.perf_counter() - t0
        tps = tokens_per_step / dt
        rec = {"step": step, "loss": loss, "lr": lr, "grad_norm": gnorm, "tokens_per_s": tps,
               "mfu": tps * fpt / (peak * dist_.world) if peak else None, "epoch": order.epoch}
        losses.append(loss)
        last_step = step == cfg.max_steps
        if step % cfg.eval_interval == 0 or last_step:
            v = evaluate()
            if v is not None:
                rec.update(val_loss=v, val_ppl=float(np.exp(min(v, 50.0))))
                best = min(best, v)
        log.log(rec)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}", mfu=f"{rec['mfu'] or 0:.1%}")
        if step % cfg.ckpt_interval == 0 or last_step:
            save_training_state(model, opt, dist_, ckpts, step, False, rec, best, order.state(),
                                {"config": config_to_dict(cfg), "model": mcfg.to_dict()}, cfg.keep_last)
    if bar is not None:
        bar.close()
    summary = {"run_dir": str(run), "steps": step, "losses": losses}
    if dist_.main:
        from lmstack.model.checkpoint import save_native

        final = core
        if fsdp:
            final = Transformer(mcfg)
            final.load_state_dict(full_state_dict(model, dist_, trainable_only=False))
        else:
            log.log({"step": step, "samples": _samples(core, tok, cfg.sample_prompts, cfg.sample_tokens,
                                                       cfg.sample_temperature, cfg.seed)})
        save_native(final, run / "final", tok, metadata={"source": "lmstack pretrain", "steps": step})
        summary["plot"] = str(log.plot(f"pretrain {cfg.model}") or "")
    elif fsdp:
        full_state_dict(model, dist_, trainable_only=False)
    log.close()
    return summary
