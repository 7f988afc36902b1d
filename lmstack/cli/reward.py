"""``lmstack rm`` (train a reward model on preference pairs) and ``lmstack ppo`` (RLHF with it).

Like ``lmstack sft``: a YAML recipe (``recipes/align/``) whose every scalar field is also a
flag, ``--resume``, ``--json``, and the same summary and Ctrl-C handling.
"""

from __future__ import annotations

import json


def register(subparsers) -> None:
    from lmstack.cli.train import add_stage
    from lmstack.train.rm_config import PPOConfig, RMConfig

    for name, cls, helptext, fn in (
        ("rm", RMConfig, "train a reward model (scalar head, Bradley-Terry loss) on preference pairs", _rm),
        ("ppo", PPOConfig, "PPO against a trained reward model (value head, GAE, KL to the reference)", _ppo),
    ):
        add_stage(subparsers, name, cls, helptext, fn, recipes="recipes/align/")


def _rm(args) -> int:
    from lmstack.cli.train import STOPPED, run_stage
    from lmstack.train.rm import rm

    cfg, out = run_stage("rm", rm, args)
    if out is None:
        return STOPPED
    extra = {k: out[k] for k in ("val_accuracy", "val_margin") if k in out}
    _finish("rm", out, cfg, args.json, extra)
    if extra and not args.json:
        print(f"  held-out:   accuracy {extra['val_accuracy']:.3f}, mean margin {extra['val_margin']:.3f}")
        print(f"  reward model: {out['run_dir']}/reward_model")
    return 0


def _finish(stage: str, out: dict, cfg, as_json: bool, extra: dict) -> None:
    """``lmstack sft``'s summary; with ``--json`` one line that also holds the stage's ``extra`` figures."""
    from lmstack.cli.train import _main_rank, _report

    if as_json and out.get("losses") and _main_rank():
        print(json.dumps({"run_dir": out["run_dir"], "steps": out["steps"], "final_loss": out["losses"][-1], **extra}))
    else:
        _report(stage, out, cfg, False)


def _ppo(args) -> int:
    from lmstack.cli.train import STOPPED, run_stage
    from lmstack.train.ppo import ppo

    cfg, out = run_stage("ppo", ppo, args)
    if out is None:
        return STOPPED
    extra = {k: out[k] for k in ("before", "after") if k in out}
    _finish("ppo", out, cfg, args.json, extra)
    if extra and not args.json:
        b, a = extra["before"], extra["after"]
        print(f"  held-out:   reward-model score {b['score']:.3f} -> {a['score']:.3f}, KL to the reference "
              f"{a['kl']:.3f} nats/sequence")
    return 0
