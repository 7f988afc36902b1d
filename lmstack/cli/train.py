"""``lmstack pretrain`` and ``lmstack sft``: run a training recipe (a YAML saved config).

Every scalar field of the config is also a flag (``--max-steps 20``), and wins over the file.
The same command runs under ``torchrun --nproc_per_node N`` (DDP, or FSDP with
``--distributed fsdp``). A run ends with a short summary (``--json``: one JSON line); a run
stopped with Ctrl-C names its last checkpoint and the command that resumes from it.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path


def register(subparsers) -> None:
    from lmstack.train.config import PretrainConfig, SFTConfig

    for name, cls, helptext, fn in (
        ("pretrain", PretrainConfig, "pre-train a model from scratch on token shards", _pretrain),
        ("sft", SFTConfig, "supervised fine-tuning (full, LoRA, QLoRA, prefix, adapters) on chat JSONL", _sft),
    ):
        add_stage(subparsers, name, cls, helptext, fn)


def add_stage(subparsers, name: str, cls, helptext: str, fn, recipes: str = "recipes/train/", **defaults):
    """The parser of a training stage: a recipe, ``--resume``, ``--json`` and a flag per config field."""
    from lmstack.config import add_config_args

    p = subparsers.add_parser(name, help=helptext, description=helptext)
    p.add_argument("config", nargs="?", help=f"YAML recipe (see {recipes}); flags override it")
    p.add_argument("--resume", action="store_true", help="continue from the latest good checkpoint")
    p.add_argument("--json", action="store_true", help="end with the summary as one JSON line")
    add_config_args(p, cls)
    p.set_defaults(func=fn, config_cls=cls, **defaults)
    return p


def _config(args):
    from lmstack.config import config_from_recipe, given_flags
    from lmstack.errors import ConfigError

    cfg = config_from_recipe(args.config_cls, args.config, args)
    flags = given_flags(args.config_cls, args)
    if getattr(cfg, "epochs", 0) > 0 and "max_steps" in flags:
        # epochs sets max_steps when the run starts; a --max-steps typed here must still win
        if "epochs" in flags:
            raise ConfigError(f"got --max-steps {cfg.max_steps} and --epochs {cfg.epochs}; expected one of them")
        print(f"--max-steps {cfg.max_steps} replaces the recipe's epochs: {cfg.epochs}", file=sys.stderr)
        cfg.epochs = 0.0
    return cfg


def run_stage(stage: str, fn, args, note: bool = True):
    """The config from the recipe and flags, then ``fn(cfg, resume=args.resume)``: ``(cfg, out)``,
    or ``(cfg, None)`` when Ctrl-C stopped the run, after ``_stopped`` said how to resume it (the
    caller then exits with ``STOPPED``). ``note`` says so when ``cfg.model`` is a random preset."""
    cfg = _config(args)
    if note:
        from lmstack.cli._common import note_model

        note_model(cfg.model)
    try:
        return cfg, fn(cfg, resume=args.resume)
    except KeyboardInterrupt:
        _stopped(stage, args, cfg)
        return cfg, None


STOPPED = 130  # the exit status of a run stopped with Ctrl-C (128 + SIGINT)


def _pretrain(args) -> int:
    from lmstack.train.pretrain import pretrain

    cfg, out = run_stage("pretrain", pretrain, args, note=False)
    if out is None:
        return STOPPED
    _report("pretrain", out, cfg, args.json)
    return 0


def _sft(args) -> int:
    from lmstack.train.sft import sft

    cfg, out = run_stage("sft", sft, args)
    if out is None:
        return STOPPED
    _report("sft", out, cfg, args.json)
    return 0


def _main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _report(stage: str, out: dict, cfg, as_json: bool) -> None:
    """What the run made and where: run folder, steps, final loss, the loss plot, the model or
    adapter, and how to try it."""
    if not out.get("losses") or not _main_rank():
        return
    if as_json:
        print(json.dumps({"run_dir": out["run_dir"], "steps": out["steps"], "final_loss": out["losses"][-1]}))
        return
    run = Path(out["run_dir"])
    lines = [f"{stage}: {out['steps']} steps, final loss {out['losses'][-1]:.4f}", f"  run folder: {run}"]
    if out.get("plot"):
        lines.append(f"  loss plot:  {out['plot']}")
    if (run / "adapter").is_dir():
        base = getattr(cfg, "model", "") or "default"
        lines.append(f"  adapter:    {run / 'adapter'}")
        adapter = shlex.quote(str(run / "adapter"))
        lines.append(f"  try it:     lmstack chat --model {shlex.quote(base)} --adapter {adapter}")
    if (run / "final").is_dir():
        lines.append(f"  model:      {run / 'final'}")
        verb = "chat --model" if stage == "sft" else "generate --prompt 'Once upon a time' --model"
        lines.append(f"  try it:     lmstack {verb} {shlex.quote(str(run / 'final'))}")
    print("\n".join(lines))


def _resume_command(stage: str, args) -> str:
    """The command line that continues this run: the recipe, the flags given, and --resume."""
    from lmstack.config import given_flags

    words = ["lmstack", stage] + ([args.config] if args.config else [])
    for k, v in given_flags(args.config_cls, args).items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            words.append(flag if v else "--no-" + flag[2:])
        elif isinstance(v, list):
            words += [flag, *map(str, v)]
        else:
            words += [flag, str(v)]
    return " ".join(shlex.quote(w) for w in words + ["--resume"])


def _stopped(stage: str, args, cfg) -> None:
    """Ctrl-C: where the last complete checkpoint is and how to go on from it."""
    from lmstack.train.checkpoint import latest_checkpoint

    if _main_rank():
        ckpt = latest_checkpoint(Path(cfg.out_dir) / "checkpoints")
        if ckpt is None:
            print(f"\n{stage} stopped before its first checkpoint (one every {cfg.ckpt_interval} steps); "
                  "nothing to resume, run it again to start over", file=sys.stderr)
        else:
            print(f"\n{stage} stopped; last checkpoint: {ckpt}\nresume with: {_resume_command(stage, args)}",
                  file=sys.stderr)
