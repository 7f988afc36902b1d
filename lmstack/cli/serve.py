"""``lmstack serve``: the OpenAI-compatible server over the continuous-batching engine."""

from __future__ import annotations

import argparse

from lmstack.config import add_config_args, config_from_recipe


def register(sub) -> None:
    from lmstack.serve.config import ServeConfig

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat, completions, embeddings, metrics)",
                       description="Serve a model over an OpenAI-compatible API with continuous batching. "
                                   "Every flag is a ServeConfig field; --config reads them from YAML.")
    p.add_argument("--config", default=None, help="YAML file of ServeConfig fields (flags override it)")
    add_config_args(p, ServeConfig)
    p.set_defaults(func=cmd_serve)


def cmd_serve(a: argparse.Namespace) -> int:
    from lmstack.cli._common import note_model
    from lmstack.serve.config import ServeConfig
    from lmstack.serve.server import serve

    cfg = config_from_recipe(ServeConfig, a.config, a)
    if not cfg.upstream:
        note_model(cfg.model)
    extend = None
    if cfg.rag:
        from lmstack.rag.pipeline import RAG
        from lmstack.rag.server import mount

        rag = RAG.open(cfg.rag, create=False)
        print(f"lmstack serve: RAG over {cfg.rag} ({rag.store.stats()['chunks']:,} chunks): "
              "POST /v1/rag/search, POST /v1/rag/chat/completions", flush=True)
        extend = lambda app: mount(app, rag)  # noqa: E731
    return serve(cfg, extend=extend)
