"""``lmstack pretrain`` and ``lmstack sft``: run a training recipe (a YAML saved config).

Every scalar field of the config is also a flag (``--max-steps 20``), and wins over the file.
The same command runs under ``torchrun --nproc_per_node N`` (DDP, or FSDP with
``--distributed fsdp``).
"""

from __future__ import annotations

import json


def register(subparsers) -> None:
    from lmstack.config import add_config_args
    from lmstack.train.config import PretrainConfig, SFTConfig

    for name, cls, helptext, fn in (
        ("pretrain", PretrainConfig, "pre-train a model from scratch on token shards", _pretrain),
        ("sft", SFTConfig, "supervised fine-tuning (full, LoRA, QLoRA, prefix, adapters) on chat JSONL", _sft),
    ):
        p = subparsers.add_parser(name, help=helptext, description=helptext)
        p.add_argument("config", nargs="?", help="YAML recipe (see recipes/train/); flags override it")
        p.add_argument("--resume", action="store_true", help="continue from the latest good checkpoint")
        add_config_args(p, cls)
        p.set_defaults(func=fn, config_cls=cls)


def _config(args):
    import sys

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


def _pretrain(args) -> int:
    from lmstack.train.pretrain import pretrain

    out = pretrain(_config(args), resume=args.resume)
    _report(out)
    return 0


def _sft(args) -> int:
    from lmstack.train.sft import sft

    out = sft(_config(args), resume=args.resume)
    _report(out)
    return 0


def _report(out: dict) -> None:
    import os

    if out.get("losses") and os.environ.get("RANK", "0") == "0":
        print(json.dumps({"run_dir": out["run_dir"], "steps": out["steps"], "final_loss": out["losses"][-1]}))
