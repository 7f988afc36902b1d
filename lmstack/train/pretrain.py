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
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from lmstack.errors import ConfigError
from lmstack.model import Transformer, preset
from lmstack.train.common import flops_per_token, token_loss_sum
from lmstack.train.config import PretrainConfig
from lmstack.train.run import Run


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


def _check_data(folder: str) -> None:
    """A token-shard folder that is not there yet is the usual first stumble (the data stage
    makes it): say which folder, and the command that writes it."""
    p = Path(folder)
    if (p / "meta.json").is_file():
        return
    what = "does not exist" if not p.exists() else "holds no meta.json, so it is not a token-shard folder"
    recipe = _data_recipe(p)
    make = (f"`lmstack data prepare {recipe}`" if recipe else
            f"`lmstack data prepare RECIPE.yaml`, RECIPE.yaml being a data recipe whose output is {p} "
            "(examples in recipes/data/)")
    raise ConfigError(f"PretrainConfig.data: {p} {what}; expected token shards written by `lmstack data prepare`. "
                      f"Make them with {make}, or pass --data with a prepared folder")


def _data_recipe(folder: Path) -> str:
    """The data recipe under ``recipes/data/`` whose ``output`` is ``folder``; '' when none is."""
    import yaml

    for recipe in sorted(Path("recipes/data").glob("*.yaml")):
        try:
            out = (yaml.safe_load(recipe.read_text()) or {}).get("output")
        except (OSError, yaml.YAMLError, AttributeError):
            continue
        if out and Path(out) == folder:
            return str(recipe)
    return ""


def pretrain(cfg: PretrainConfig, resume: bool = False) -> dict:
    from lmstack.data.shards import TokenShards

    run = Run.start(cfg, "pretrain", resume)
    _check_data(cfg.data)
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

    world, rank = run.dist.world, run.dist.rank
    rows = cfg.batch_size * world  # rows of one global micro-batch
    accum = cfg.grad_accum or max(1, cfg.tokens_per_step // (rows * cfg.seq_len))
    if cfg.tokens_per_step and accum * rows * cfg.seq_len != cfg.tokens_per_step:
        raise ConfigError(f"PretrainConfig.tokens_per_step: {cfg.tokens_per_step} is not a multiple of "
                          f"batch_size x processes x seq_len = {rows * cfg.seq_len}")
    tokens_per_step = accum * rows * cfg.seq_len
    n_windows = (train.num_tokens - cfg.seq_len - 1) // cfg.seq_len
    if run.dist.main:
        print(f"pretrain: {cfg.model} {n_params / 1e6:.2f}M params, {train.num_tokens:,} train tokens, "
              f"{tokens_per_step:,} tokens/step ({accum} x {rows} x {cfg.seq_len}), {world} process(es)")

    def evaluate(model) -> dict:
        n_val = min(cfg.eval_batches * rows, (val.num_tokens - 1) // cfg.seq_len)
        total, count = 0.0, 0
        for b in range(rank * cfg.batch_size, n_val, rows):
            idx = range(b, min(b + cfg.batch_size, n_val))
            x = torch.from_numpy(np.stack([val.get_window(i * cfg.seq_len, cfg.seq_len + 1) for i in idx]))
            x = x.to(cfg.device)
            s, n = token_loss_sum(model, x[:, :-1], x[:, 1:], selective=not run.fsdp, loss_chunk=cfg.loss_chunk)
            total, count = total + float(s), count + n
        v = run.reduce_sum(total) / max(1.0, run.reduce_sum(count))
        return {"val_loss": v, "val_ppl": float(np.exp(min(v, 50.0)))}

    run.resume(model)
    run.prepare(model, n_windows, evaluate=evaluate if val is not None else None, meta={"model": mcfg.to_dict()},
                flops_per_token=flops_per_token(mcfg, n_params, cfg.seq_len))
    if run.dist.main and not resume and not run.fsdp:
        run.metrics.log({"step": 0, "samples": _samples(run.core, tok, cfg.sample_prompts, cfg.sample_tokens,
                                                        cfg.sample_temperature, cfg.seed)})
    for _ in run.steps():
        loss_sum = 0.0
        for micro in range(accum):
            items = run.order.take(rows)[rank * cfg.batch_size:(rank + 1) * cfg.batch_size]
            x = _windows(train, items, cfg.seq_len, cfg.seed).to(cfg.device)
            with run.micro_batch(last=micro == accum - 1):
                s, _ = token_loss_sum(run.model, x[:, :-1], x[:, 1:], selective=not run.fsdp,
                                      loss_chunk=cfg.loss_chunk)
                (s * (world / tokens_per_step)).backward()
            loss_sum += s.item()
        run.end_step(run.reduce_sum(loss_sum) / tokens_per_step, tokens=accum * cfg.batch_size * cfg.seq_len)

    final = run.final_model(lambda: Transformer(mcfg))
    if final is not None:
        from lmstack.model.checkpoint import save_native

        if not run.fsdp:
            run.metrics.log({"step": run.step, "samples": _samples(final, tok, cfg.sample_prompts, cfg.sample_tokens,
                                                                   cfg.sample_temperature, cfg.seed)})
        save_native(final, run.dir / "final", tok, metadata={"source": "lmstack pretrain", "steps": run.step})
    return run.finish(f"pretrain {cfg.model}")
