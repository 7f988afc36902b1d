"""``lmstack dpo`` and ``lmstack kto``: preference training from a recipe (a YAML saved config).

Every scalar field of the config is also a flag (``--loss ipo --beta 0.5``) and wins over
the file; the run's summary, Ctrl-C handling and ``--resume`` are those of ``lmstack sft``.
"""

from __future__ import annotations


def register(subparsers) -> None:
    from lmstack.cli.train import add_stage
    from lmstack.train.align_config import DPOConfig, KTOConfig

    for name, cls, helptext in (
        ("dpo", DPOConfig, "preference optimisation on chosen/rejected pairs (DPO, cDPO, rDPO, IPO, SLiC, SimPO, ORPO)"),
        ("kto", KTOConfig, "Kahneman-Tversky optimisation on completions labelled desirable or undesirable"),
    ):
        add_stage(subparsers, name, cls, helptext, _run, recipes="recipes/align/", stage=name)


def _run(args) -> int:
    from lmstack.cli.train import STOPPED, _report, run_stage
    from lmstack.train.dpo import dpo
    from lmstack.train.kto import kto

    cfg, out = run_stage(args.stage, {"dpo": dpo, "kto": kto}[args.stage], args)
    if out is None:
        return STOPPED
    _report(args.stage, out, cfg, args.json)
    if "val_reward_acc" in out and not args.json:
        before = out.get("val_reward_acc_before")
        print(f"  held-out preference accuracy: {'' if before is None else f'{before:.3f} -> '}"
              f"{out['val_reward_acc']:.3f}")
    return 0
