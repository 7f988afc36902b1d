"""Run untrusted candidate code in a subprocess sandbox, and pass@k (Chen et al. 2021).

Candidate programs never run in the harness's interpreter. Each runs in a fresh Python child:

* **limits** (``resource.setrlimit`` in the child): address space (memory), CPU seconds,
  size of files written (stdout/stderr go to files, so endless output stops there too),
  no core files; the harness also kills the whole process group at the wall-time limit;
* **a temp working directory** that is removed afterwards, and ``HOME``/``TMPDIR`` inside it;
* **a scrubbed environment**: only ``PATH``, ``LANG``, ``HOME``, ``TMPDIR``; Python runs with
  ``-I`` (no ``PYTHON*`` variables, no user site);
* **isolation from the OS where it allows**: with ``unshare`` (util-linux) the child gets its
  own network namespace (no interface but a down loopback: no network) and its own PID
  namespace with a fresh ``/proc`` (the harness's process and its environment are not
  visible); as root it also drops to user ``nobody``. Without ``unshare``, sockets are
  disabled inside the child, it drops to ``nobody`` when the harness is root, and otherwise
  the harness marks itself non-dumpable so ``/proc/<pid>/environ`` of the harness is not
  readable; ``isolation_mode()`` says which applied, for reports;
* **process-spawning calls disabled** in the child before the candidate runs
  (``os.system``, ``os.popen``, ``os.fork``, ``os.exec*``, ``os.spawn*``, ``os.kill``,
  ``subprocess.Popen``): a second layer only, since Python code can find its way around it;
  the limits and namespaces above are what contain it.

A program passes when it exits with status 0 within the limits. Deliberately left out:
seccomp filters, read-only bind mounts of the file system, and languages other than Python.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Literal, Optional, Sequence

from lmstack.errors import ConfigError

Status = Literal["passed", "failed", "timeout"]
NOBODY = 65534

# Runs first in the child: limits, privileges, disabled calls, then the candidate file.
_RUNNER = r'''
import os, sys, resource
mem, cpu, fsize, drop_uid, block_net = (int(a) for a in sys.argv[2:7])
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
with open(sys.argv[1], encoding="utf-8") as f:
    source = f.read()
if drop_uid:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)

def _disabled(name):
    def refuse(*args, **kwargs):
        raise PermissionError(f"sandbox: {name} is disabled")
    return refuse

import posix, subprocess, shutil
for _mod in (os, posix):
    for _name in ("system", "popen", "fork", "forkpty", "kill", "killpg", "execv", "execve",
                  "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnv", "spawnve",
                  "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnvp", "spawnvpe", "posix_spawn",
                  "posix_spawnp", "putenv", "setuid", "setgid"):
        if hasattr(_mod, _name):
            setattr(_mod, _name, _disabled("os." + _name))
subprocess.Popen = _disabled("subprocess.Popen")
shutil.rmtree = _disabled("shutil.rmtree")
if block_net:
    import socket
    socket.socket = _disabled("socket.socket")
    socket.create_connection = _disabled("socket.create_connection")
    socket.socketpair = _disabled("socket.socketpair")
del _mod, _name, _disabled, posix, subprocess, shutil
sys.argv = ["candidate.py"]
exec(compile(source, "candidate.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
'''


@dataclass
class SandboxConfig:
    timeout_s: float = 10.0  # wall time per program
    memory_mb: int = 1024  # address-space limit
    max_output_bytes: int = 1 << 20  # file-size limit for stdout/stderr (kept: the last 4 KiB)


@dataclass
class ExecResult:
    status: Status
    returncode: Optional[int]
    stdout: str
    stderr: str
    duration_s: float
    isolation: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class _Mode:
    unshare: tuple[str, ...]  # command prefix, () when not used
    drop_uid: bool
    block_net: bool
    describe: str


def _unshare_prefix() -> Optional[tuple[str, ...]]:
    exe = shutil.which("unshare")
    if exe is None:
        return None
    base = (exe, "--net", "--pid", "--fork", "--mount-proc", "--kill-child")
    for prefix in ((base,) if os.geteuid() == 0 else ((exe, "--map-root-user") + base[1:],)):
        try:
            ok = subprocess.run(prefix + ("true",), capture_output=True, timeout=10).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if ok:
            return prefix
    return None


# The probe imports from the standard library: after dropping to `nobody` the interpreter's
# own files must still be readable, which is not so when Python lives in a private home.
_PROBE = "import json, typing, collections\nprint('ok')"


@functools.lru_cache(maxsize=1)
def _mode() -> _Mode:
    """Pick the strongest isolation this machine allows and check it runs a program."""
    root = os.geteuid() == 0
    prefix = _unshare_prefix()
    candidates = []
    if prefix:
        candidates.append(_Mode(prefix, root, False, "unshare: no network, own PID namespace and /proc"
                                + (", user nobody" if root else "")))
        if root:
            candidates.append(_Mode(prefix, False, False, "unshare: no network, own PID namespace and /proc"))
    candidates.append(_Mode((), root, True, "subprocess: sockets disabled in the child"
                            + (", user nobody" if root else ", harness non-dumpable")))
    candidates.append(_Mode((), False, True, "subprocess: sockets disabled in the child, harness non-dumpable"))
    for mode in candidates:
        if _run(mode, _PROBE, SandboxConfig(timeout_s=30)).stdout.strip() == "ok":
            if not mode.drop_uid and not mode.unshare:
                _make_harness_nondumpable()
            return mode
    raise RuntimeError("code sandbox: could not start a sandboxed Python child on this machine")


def _make_harness_nondumpable() -> None:
    """prctl(PR_SET_DUMPABLE, 0): /proc/<harness pid>/environ becomes root-only."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def isolation_mode() -> str:
    """How candidate code is isolated on this machine (one line, for reports)."""
    return _mode().describe


def _run(mode: _Mode, code: str, cfg: SandboxConfig) -> ExecResult:
    workdir = tempfile.mkdtemp(prefix="lmstack-sandbox-")
    try:
        runner = os.path.join(workdir, "_runner.py")
        candidate = os.path.join(workdir, "candidate.py")
        with open(runner, "w", encoding="utf-8") as f:
            f.write(_RUNNER)
        with open(candidate, "w", encoding="utf-8") as f:
            f.write(code)
        if mode.drop_uid:
            os.chown(workdir, NOBODY, NOBODY)  # the child may write in its own directory only
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
        mem = cfg.memory_mb << 20
        cpu = max(1, math.ceil(cfg.timeout_s)) + 1
        argv = list(mode.unshare) + [sys.executable, "-I", "-B", runner, candidate, str(mem), str(cpu),
                                     str(cfg.max_output_bytes), str(int(mode.drop_uid)), str(int(mode.block_net))]
        out_path, err_path = os.path.join(workdir, "stdout"), os.path.join(workdir, "stderr")
        start = time.monotonic()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=err, start_new_session=True)
            try:
                rc: Optional[int] = proc.wait(timeout=cfg.timeout_s)
                status: Status = "passed" if rc == 0 else "failed"
            except subprocess.TimeoutExpired:
                status, rc = "timeout", None
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # whatever the program left behind
                except ProcessLookupError:
                    pass
                proc.wait()
        duration = time.monotonic() - start

        def tail(path: str) -> str:
            with open(path, "rb") as f:
                f.seek(max(0, os.path.getsize(path) - 4096))
                return f.read().decode("utf-8", "replace")

        return ExecResult(status, rc, tail(out_path), tail(err_path), duration, mode.describe)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_python(code: str, cfg: Optional[SandboxConfig] = None) -> ExecResult:
    """Run one Python program in the sandbox; never raises for anything the program does."""
    if not isinstance(code, str):
        raise ConfigError(f"run_python: code is {type(code).__name__}, expected a string")
    return _run(_mode(), code, cfg or SandboxConfig())


def run_many(programs: Sequence[str], cfg: Optional[SandboxConfig] = None, workers: int = 2,
             progress: bool = True) -> list[ExecResult]:
    """Run programs in parallel (``workers`` children at a time); results in input order."""
    if workers < 1:
        raise ConfigError(f"run_many: workers={workers}, expected >= 1")
    _mode()  # probe once before the threads start
    cfg = cfg or SandboxConfig()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        it = pool.map(lambda c: run_python(c, cfg), programs)
        if progress:
            from tqdm import tqdm

            it = tqdm(it, total=len(programs), desc="sandbox", unit="prog")
        return list(it)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass (Chen et al. 2021, Eq. 1 and Fig. 3).

    1 - C(n - c, k) / C(n, k), computed as a product so large n does not overflow.
    """
    if not (0 <= c <= n) or k < 1:
        raise ConfigError(f"pass_at_k: got n={n}, c={c}, k={k}; expected 0 <= c <= n and k >= 1")
    if k > n:
        raise ConfigError(f"pass_at_k: k={k} is larger than the number of samples n={n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


# --- HumanEval-format problems ----------------------------------------------------------


def humaneval_program(problem: dict, completion: str) -> str:
    """Prompt + completion + the problem's tests + the call of ``check`` on the entry point."""
    return (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n"
            + f"check({problem['entry_point']})\n")


@dataclass
class CodeEvalResult:
    pass_at: dict[str, float]  # "pass@1" -> value
    per_task: dict[str, list[str]] = field(default_factory=dict)  # task id -> statuses
    isolation: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_completions(problems: Sequence[dict], completions: dict[str, Sequence[str]],
                         ks: Sequence[int] = (1,), cfg: Optional[SandboxConfig] = None, workers: int = 2,
                         progress: bool = True) -> CodeEvalResult:
    """Run every completion against its problem's tests; pass@k averaged over problems.

    ``completions[task_id]`` holds the n samples for that task; every problem needs at
    least max(ks) samples.
    """
    by_id = {p["task_id"]: p for p in problems}
    unknown = sorted(set(completions) - set(by_id))
    if unknown:
        raise ConfigError(f"code eval: completions for unknown task ids {unknown[:5]}")
    jobs = [(tid, humaneval_program(by_id[tid], c)) for tid, cs in completions.items() for c in cs]
    results = run_many([prog for _, prog in jobs], cfg, workers, progress)
    per_task: dict[str, list[str]] = {tid: [] for tid in completions}
    for (tid, _), res in zip(jobs, results):
        per_task[tid].append(res.status)
    pass_at = {}
    for k in ks:
        vals = [pass_at_k(len(st), st.count("passed"), k) for st in per_task.values()]
        pass_at[f"pass@{k}"] = sum(vals) / len(vals) if vals else 0.0
    return CodeEvalResult(pass_at, per_task, isolation_mode())
