"""Running the server: load the model, start the engine, serve with uvicorn, drain on SIGTERM.

``serve(cfg)`` blocks until SIGTERM/SIGINT. On the signal the server marks itself draining
and keeps listening: ``/ready`` and new generating requests get 503 with ``Retry-After``
(so a load balancer moves on instead of seeing refused connections) while in-flight requests
and streams finish. Once none is left, or ``drain_timeout`` seconds have passed (streams
still open are then cut), uvicorn closes the listener and the connections, the engine is
stopped without waiting on a step that never ends, and ``serve`` returns 0. A second
signal stops at once. ``ServerThread`` runs the same server in a background thread
(tests, benchmarks, notebooks).
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Callable, Optional

from lmstack.errors import ConfigError, LMStackError
from lmstack.serve.app import create_app
from lmstack.serve.config import ServeConfig
from lmstack.serve.context import ServerState


def build_backend(cfg: ServeConfig):
    """Load the model named by ``cfg.model`` and start an engine over it (or front ``cfg.upstream``)."""
    import torch

    from lmstack.infer.engine import Engine
    from lmstack.serve.backend import LocalBackend

    if cfg.adapter is not None and (cfg.upstream or (cfg.model or "").startswith("fake")):
        raise ConfigError(f"adapter: got {cfg.adapter!r}, but an adapter attaches to a loaded model, "
                          "not to --upstream or the fake model")
    if cfg.upstream:
        if cfg.model is not None:
            raise ConfigError(f"model: got {cfg.model!r} together with upstream {cfg.upstream!r}; give one of them")
        from lmstack.serve.upstream import UpstreamBackend

        return UpstreamBackend(cfg.upstream, api_key=cfg.upstream_api_key, model=cfg.upstream_model,
                               model_name=cfg.model_name, request_timeout=cfg.request_timeout or None,
                               max_concurrency=cfg.max_slots, max_queue=cfg.max_queue)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.model is not None and cfg.model.startswith("fake"):
        from lmstack.infer.engine_fake import FakeModel
        from lmstack.tokenizer.byte_level import byte_level_tokenizer

        step = float(cfg.model.split(":", 1)[1]) / 1000 if ":" in cfg.model else 0.0  # fake:<ms per step>
        model, tok, name = FakeModel(step_seconds=step), byte_level_tokenizer(), "fake"
    else:
        from lmstack.infer.llm import LLM, resolve_model

        llm = LLM.load(cfg.model, dtype=cfg.dtype, adapter=cfg.adapter)
        model, tok = llm.model, llm.tokenizer
        default = not cfg.model or resolve_model(cfg.model) != cfg.model  # None, "default" or its name
        name = cfg.model_name or ("SmolLM2-135M-Instruct" if default else str(cfg.model).rstrip("/").split("/")[-1])
    engine = Engine(model, tok, cfg.engine()).start()
    return LocalBackend(engine, tok, cfg.model_name or name,
                        request_timeout=cfg.request_timeout if cfg.request_timeout > 0 else None)


ENGINE_STOP_S = 1.0  # at exit, how long to wait for the engine's step in progress


def _uvicorn_server(app, cfg: ServeConfig, state: ServerState, on_shutdown: Optional[Callable[[], None]] = None):
    import uvicorn

    class _DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM / SIGINT: drain, then exit
            if state.draining or self.should_exit:  # a second signal: stop now
                self.should_exit = self.force_exit = True
                return
            state.drain_deadline = time.monotonic() + cfg.drain_timeout
            state.draining = True
            if sig != signal.SIGTERM:  # a drained SIGTERM is a clean exit (0); SIGINT is raised again at the end
                self._captured_signals.append(sig)

        async def on_tick(self, counter: int) -> bool:
            if state.drain_deadline is not None and not self.should_exit:  # a signal started the drain
                left = state.drain_deadline - time.monotonic()
                if state.in_flight == 0 or left <= 0:  # drained, or out of time: uvicorn's shutdown
                    self.config.timeout_graceful_shutdown = max(0.1, left)  # for requests not counted in flight
                    self.should_exit = True
            return await super().on_tick(counter)

        async def shutdown(self, sockets=None) -> None:
            await super().shutdown(sockets)
            if on_shutdown is not None:  # before asyncio.run waits for worker threads that wait on the engine
                on_shutdown()

    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=cfg.drain_timeout, timeout_keep_alive=5, lifespan="off")
    return _DrainingServer(config)


def serve(cfg: ServeConfig, backend=None, extend=None) -> int:
    """Run the server until SIGTERM/Ctrl-C. ``extend(app)`` may add routes (``--rag`` does)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise LMStackError("lmstack serve needs fastapi and uvicorn: pip install -e '.[serve]'") from None
    backend = backend or build_backend(cfg)
    state = ServerState()
    app = create_app(backend, cfg, state)
    if extend is not None:
        extend(app)
    stopped = threading.Event()

    def stop_backend() -> None:
        if not stopped.is_set():
            stopped.set()
            state.draining = True
            backend.close(timeout=ENGINE_STOP_S)

    server = _uvicorn_server(app, cfg, state, on_shutdown=stop_backend)
    print(f"lmstack serve: {backend.model_name} on http://{cfg.host}:{cfg.port} (Ctrl-C or SIGTERM to stop)",
          flush=True)
    try:
        server.run()
    finally:
        stop_backend()
    return 0


class ServerThread:
    """``with ServerThread(backend, cfg) as s: ... s.url ...``: a server on a free local port."""

    def __init__(self, backend, cfg: Optional[ServeConfig] = None, extend=None):
        import socket

        self.cfg = cfg or ServeConfig()
        self.backend = backend
        self.state = ServerState()
        self.app = create_app(backend, self.cfg, self.state)
        if extend is not None:
            extend(self.app)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.cfg.host, self.cfg.port = "127.0.0.1", sock.getsockname()[1]
        sock.close()
        self.server = _uvicorn_server(self.app, self.cfg, self.state)
        self.server.install_signal_handlers = lambda: None  # not the main thread
        self._thread = threading.Thread(target=self.server.run, name="lmstack-serve", daemon=True)
        self.url = f"http://127.0.0.1:{self.cfg.port}"

    def __enter__(self) -> "ServerThread":
        self._thread.start()
        import time

        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(30)

    def __exit__(self, *exc) -> None:
        self.stop()
