"""``lmstack grpo``: Group Relative Policy Optimization from a recipe (a YAML saved config).

Every scalar field of the config is also a flag (``--num-generations 4 --beta 0.04``) and wins
over the file; the run's summary, Ctrl-C handling and ``--resume`` are those of ``lmstack sft``.
The rewards are a list in the recipe (built-in names or ``module:function``, each with a
weight); ``--rewards exact_match my_pkg.rewards:brevity`` replaces it, every weight 1.
"""

from __future__ import annotations


def register(subparsers) -> None:
    from lmstack.cli.train import add_stage
    from lmstack.train.grpo_config import GRPOConfig

    helptext = "GRPO: online RL with group-normalised advantages on verifiable or learned rewards"
    add_stage(subparsers, "grpo", GRPOConfig, helptext, _grpo, recipes="recipes/align/")


def _grpo(args) -> int:
    from lmstack.cli.train import STOPPED, _report, run_stage
    from lmstack.train.grpo import grpo

    cfg, out = run_stage("grpo", grpo, args)
    if out is None:
        return STOPPED
    _report("grpo", out, cfg, args.json)
    if "after" in out and not args.json:
        before = out.get("before")
        start = "" if before is None else f"{before['accuracy']:.3f} -> "
        print(f"  held-out accuracy: {start}{out['after']['accuracy']:.3f}")
    return 0
