"""The ``lmstack`` command line: ``lmstack <stage> <verb>``.

Each module in this package defines ``register(subparsers)`` that adds its commands; the
handlers import heavy libraries lazily so ``lmstack --help`` stays fast.
"""
