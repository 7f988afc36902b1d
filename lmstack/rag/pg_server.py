"""A local PostgreSQL server with pgvector, for tests, docs and users who want one without set-up.

``start_local(folder)`` starts (or reuses) a self-contained PostgreSQL with the pgvector
extension from the ``pgserver`` wheel (0.1.4: its pgvector needs no AVX-512), with its data in ``folder``, and returns a
``postgresql://`` URL over a Unix socket; ``stop(folder)`` stops it. The first start runs
``initdb`` (a few seconds); later starts reuse the data. By default the server stops when the
Python process that started it exits; ``keep_running=True`` leaves it up for later processes
(stop it with ``stop``).

The store (``lmstack.rag.pg_store``) never depends on this module: it takes any
``postgresql://`` URL, so a managed or system PostgreSQL with pgvector works the same.

Deliberately left out: TCP listening, users and passwords (the local server trusts its own
socket), and upgrades of a data folder made by another PostgreSQL major version.
"""

from __future__ import annotations

import json
import os
import subprocess
import warnings
from pathlib import Path

from lmstack.errors import LMStackError

INSTALL_HINT = "pip install 'pgserver==0.1.4' 'psycopg[binary]'  (or: pip install 'lmstack[rag]')"


def _pgserver():
    try:
        with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
            warnings.simplefilter("ignore")
            import pgserver
    except ImportError as e:
        raise LMStackError(f"a local PostgreSQL server needs the pgserver package ({e}); "
                           f"install it with: {INSTALL_HINT}") from None
    return pgserver


def _forget_dead_handles(folder: Path) -> None:
    """pgserver keeps the pids of the processes using a server, and stops it when the last one
    exits; a process killed without cleaning up would keep it running forever, so drop the pids
    of processes that no longer exist."""
    path = folder / ".handle_pids.json"
    try:
        pids = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    alive = [p for p in pids if isinstance(p, int) and _pid_alive(p)]
    if alive != pids:
        path.write_text(json.dumps(alive))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start_local(folder: str | os.PathLike, keep_running: bool = False) -> str:
    """Start a local PostgreSQL + pgvector with its data in ``folder``; returns its URL."""
    pgserver = _pgserver()
    folder = Path(folder).expanduser().resolve()
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LMStackError(f"local PostgreSQL: cannot create {folder.parent}: {e.strerror}") from None
    if folder.exists() and not folder.is_dir():
        raise LMStackError(f"local PostgreSQL: {folder} exists and is not a folder; "
                           "expected a folder for the server's data")
    if folder.is_dir():
        _forget_dead_handles(folder)
    try:
        server = pgserver.get_server(folder, cleanup_mode=None if keep_running else "stop")
    except (subprocess.SubprocessError, OSError, AssertionError) as e:  # pgserver asserts the server is ready
        log = folder / "log"
        raise LMStackError(f"local PostgreSQL in {folder} did not start ({type(e).__name__}: {e}); "
                           f"see the server log {log}") from None
    url = server.get_uri()
    if folder not in _probed:
        _probe_pgvector(url, folder)
        _probed.add(folder)
    return url


_probed: set[Path] = set()


def _probe_pgvector(url: str, folder: Path) -> None:
    """Run one 64-dimensional distance: a pgvector build compiled for a newer CPU (some wheels
    are built with AVX-512) kills the server process with an illegal instruction here, and
    would otherwise do so on the first real insert."""
    try:
        import psycopg
    except ImportError as e:
        raise LMStackError(f"the local PostgreSQL needs the psycopg package ({e}); install it with: "
                           f"{INSTALL_HINT}") from None
    v = "array_fill(1.0::real, ARRAY[64])::vector"
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            conn.execute(f"SELECT {v} <=> {v}").fetchone()
    except psycopg.OperationalError as e:
        stop(folder, immediate=True)
        raise LMStackError(
            f"the local PostgreSQL in {folder} crashed in its first pgvector distance "
            f"({str(e).strip().splitlines()[0]}); the pgvector bundled with the installed pgserver "
            "package was compiled for CPU instructions this machine lacks (see 'Illegal instruction' "
            f"in {folder / 'log'}). Install a build that runs here (pip install pgserver==0.1.4) or "
            "use another PostgreSQL with pgvector through its postgresql:// URL") from None
    except psycopg.Error as e:
        raise LMStackError(f"the local PostgreSQL in {folder} has no working pgvector extension "
                           f"({' '.join(str(e).split())[:200]}); reinstall: {INSTALL_HINT}") from None


def stop(folder: str | os.PathLike, immediate: bool = False) -> bool:
    """Stop the local server whose data is in ``folder``; returns whether one was running.
    Sessions are ended and the data flushed (``immediate`` skips the flush: recovery runs at
    the next start); a server that does not stop in 15 s is stopped immediately."""
    import subprocess

    pgserver = _pgserver()
    from pgserver.utils import PostmasterInfo

    folder = Path(folder).expanduser().resolve()
    server = pgserver.PostgresServer._instances.pop(folder, None)
    if server is not None:
        import atexit

        atexit.unregister(server._cleanup)
    info = PostmasterInfo.read_from_pgdata(folder) if folder.is_dir() else None
    running = info is not None and info.is_running()
    if running:
        user = "pgserver" if os.name == "posix" and os.geteuid() == 0 else None
        try:
            pgserver.pg_ctl(["-w", "-t", "15", "-m", "immediate" if immediate else "fast", "stop"],
                            pgdata=folder, user=user)
        except subprocess.CalledProcessError:
            pgserver.pg_ctl(["-w", "-t", "15", "-m", "immediate", "stop"], pgdata=folder, user=user)
    if folder.is_dir():
        (folder / ".handle_pids.json").write_text("[]")
    return running
