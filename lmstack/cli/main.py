"""Entry point of the ``lmstack`` command. Discovers the command modules of this package."""

from __future__ import annotations

import argparse
import difflib
import importlib
import pkgutil
import sys

from lmstack.errors import LMStackError


class _Parser(argparse.ArgumentParser):
    """No prefix matching of long flags (``--max-step`` is not ``--max-steps``), in every
    sub-command: ``add_subparsers`` builds its parsers with this same class. A mistyped
    sub-command or choice gets the closest one suggested (``caht``: did you mean 'chat'?)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def _check_value(self, action, value):
        if action.choices is not None and value not in action.choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in action.choices], n=1)
            if close:
                raise argparse.ArgumentError(action, f"invalid choice: {value!r}; did you mean {close[0]!r}?")
        super()._check_value(action, value)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lmstack",
        description="The LLM lifecycle on one model core. `lmstack <stage> <verb> --help` for details.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    import lmstack.cli as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.name == "main":
            continue
        module = importlib.import_module(f"lmstack.cli.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except LMStackError as e:
        print(f"lmstack: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
