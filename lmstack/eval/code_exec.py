"""Run untrusted candidate code in a bubblewrap sandbox, and pass@k (Chen et al. 2021).

Candidate programs never run in the harness's interpreter. Each runs in a fresh Python child
inside bubblewrap (``bwrap``), which builds the sandbox from Linux namespaces:

* **a read-only file system of only what Python needs**: ``/usr`` (with the host's ``/lib*``
  links or folders), the base interpreter's prefix, ``/etc/ld.so.cache``, and an
  ``/etc/passwd`` and ``/etc/group`` that name only ``nobody``; a minimal read-only ``/dev``;
  a private, empty, size-limited tmpfs on ``/tmp``, which is also ``HOME`` and the working
  directory. Nothing of the host is writable; its home, temp folder, ``/etc``, ``/proc`` and
  the harness's files and virtual environment are not there at all (no ``/proc``, because a
  uid that maps to host root could write ``/proc/sys``);
* **namespaces** (``--unshare-all``): a user namespace in which the program runs as uid and
  gid 65534 with no capabilities, also when the harness is root; no network (a loopback of
  its own only); its own PID, IPC, UTS and cgroup namespaces; ``--die-with-parent`` and
  ``--new-session``;
* **no new processes**: a seccomp filter (classic BPF handed to bwrap) fails ``fork``,
  ``vfork``, ``clone`` without ``CLONE_THREAD`` (threads still work), ``unshare``, ``setns``,
  ``ptrace``, ``process_vm_*``, ``pidfd_getfd`` and the keyring calls. It is what stops a
  fork loop: when the harness is root the sandbox's uid maps to host uid 0, which
  ``RLIMIT_NPROC`` never limits;
* **limits** (``resource.setrlimit`` in the child): address space, CPU seconds, size of any
  file written (stdout and stderr go to files the sandbox cannot see), no core files; the
  harness kills the sandbox at the wall-time limit;
* **an environment of four variables** (``PATH``, ``LANG``, ``HOME``, ``TMPDIR``) and
  ``python -I``; process-spawning calls (``os.system``, ``subprocess``, ...) raise in the
  child with a clear message, a second layer only.

**Passing.** The program reaches the child on stdin, after a random per-run nonce. The runner
executes it and, only when it has returned, writes the nonce to a pipe the harness holds. A
program passes when the harness reads that nonce; the exit status alone never counts, so
``sys.exit(0)``, ``os._exit(0)``, a crash or ``exec`` of another binary before the end fail.
The nonce lives in the runner's frame: it stops programs that end early, not code written to
dig it out of its own interpreter.

Without a working bubblewrap the harness refuses, naming why, unless
``SandboxConfig.unsafe_no_sandbox`` (``--unsafe-no-sandbox``) is set: then programs run as
plain children with the limits, the Python-level blocks and sockets disabled, and the
isolation line says so and why. Deliberately left out: cgroup accounting (so the number of
threads is bounded by the address-space limit alone), a writable ``/dev/shm`` (so no
``multiprocessing``), languages other than Python.
"""

from __future__ import annotations

import errno
import functools
import math
import os
import platform
import secrets
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Literal, Optional, Sequence

from lmstack.errors import ConfigError, UnsupportedError

Status = Literal["passed", "failed", "timeout"]
SANDBOX_UID = 65534  # nobody
TMP_BYTES = 64 << 20  # size of the private /tmp
_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp", "TMPDIR": "/tmp"}
_PASSWD = b"nobody:x:65534:65534:nobody:/tmp:/usr/sbin/nologin\n"
_GROUP = b"nogroup:x:65534:\n"

# Runs first in the child: read the nonce and the program, set limits, disable spawning, run
# the program, and only then write the nonce to the marker pipe.
_RUNNER = r'''
import os, resource, sys

def main():
    mem, cpu, fsize, marker, block_net = (int(a) for a in sys.argv[1:6])
    write, exit_now = os.write, os._exit  # kept before the program can replace them
    nonce, _, source = sys.stdin.buffer.read().partition(b"\n")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.set_inheritable(marker, False)
    for limit, value in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_CPU, cpu),
                         (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, value))

    def disabled(name):
        def refuse(*args, **kwargs):
            raise PermissionError(f"sandbox: {name} is disabled")
        return refuse

    import posix, subprocess
    for mod in (os, posix):
        for name in ("system", "popen", "fork", "forkpty", "kill", "killpg", "execv", "execve",
                     "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnv",
                     "spawnve", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnvp", "spawnvpe",
                     "posix_spawn", "posix_spawnp"):
            if hasattr(mod, name):
                setattr(mod, name, disabled("os." + name))
    subprocess.Popen = disabled("subprocess.Popen")
    if block_net:
        import socket
        for name in ("socket", "create_connection", "socketpair"):
            setattr(socket, name, disabled("socket." + name))
    code = compile(source, "candidate.py", "exec")
    sys.argv = ["candidate.py"]
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    write(marker, nonce)
    exit_now(0)

main()
'''

@dataclass
class SandboxConfig:
    timeout_s: float = 10.0  # wall time per program
    memory_mb: int = 1024  # address-space limit
    max_output_bytes: int = 1 << 20  # size limit of any file written, stdout/stderr included (kept: the last 4 KiB)
    unsafe_no_sandbox: bool = False  # without a working bubblewrap, run plain children instead of refusing


@dataclass
class ExecResult:
    status: Status
    returncode: Optional[int]  # bwrap reports a signal n as 128 + n; None after a timeout
    stdout: str
    stderr: str
    duration_s: float
    isolation: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# --- the seccomp filter ------------------------------------------------------------------

# (AUDIT_ARCH_*, syscall numbers) per machine, from the kernel's unistd tables.
_SYSCALLS = {
    "x86_64": (0xC000003E, {"clone": 56, "fork": 57, "vfork": 58, "ptrace": 101, "add_key": 248,
                            "request_key": 249, "keyctl": 250, "unshare": 272, "setns": 308,
                            "process_vm_readv": 310, "process_vm_writev": 311, "clone3": 435,
                            "pidfd_getfd": 438}),
    "aarch64": (0xC00000B7, {"unshare": 97, "ptrace": 117, "add_key": 217, "request_key": 218,
                             "keyctl": 219, "clone": 220, "setns": 268, "process_vm_readv": 270,
                             "process_vm_writev": 271, "clone3": 435, "pidfd_getfd": 438}),
}
_LD_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|J*|K, BPF_RET|K
_KILL_PROCESS, _ALLOW, _ERRNO = 0x80000000, 0x7FFF0000, 0x00050000
_CLONE_THREAD = 0x10000


def _bpf(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)  # struct sock_filter


def seccomp_filter(machine: str) -> Optional[bytes]:
    """Classic BPF for seccomp, or None for a machine without a table.

    Reads struct seccomp_data (nr at offset 0, arch at 4, the low half of args[0] at 16):
    other ABIs are killed; clone3 gets ENOSYS so glibc falls back to clone; clone passes only
    with CLONE_THREAD; the rest of the table gets EPERM; everything else is allowed.
    """
    if machine not in _SYSCALLS:
        return None
    arch, nr = _SYSCALLS[machine]
    prog = [_bpf(_LD_ABS, 4), _bpf(_JEQ, arch, 1, 0), _bpf(_RET, _KILL_PROCESS), _bpf(_LD_ABS, 0)]
    if machine == "x86_64":  # x32 calls carry the same numbers with bit 30 set
        prog += [_bpf(_JGE, 0x40000000, 0, 1), _bpf(_RET, _KILL_PROCESS)]
    prog += [_bpf(_JEQ, nr["clone3"], 0, 1), _bpf(_RET, _ERRNO | errno.ENOSYS)]
    for name, n in nr.items():
        if name not in ("clone", "clone3"):
            prog += [_bpf(_JEQ, n, 0, 1), _bpf(_RET, _ERRNO | errno.EPERM)]
    prog += [_bpf(_JEQ, nr["clone"], 0, 3), _bpf(_LD_ABS, 16), _bpf(_JSET, _CLONE_THREAD, 1, 0),
             _bpf(_RET, _ERRNO | errno.EPERM), _bpf(_RET, _ALLOW)]
    return b"".join(prog)


# --- choosing the sandbox ----------------------------------------------------------------


@dataclass(frozen=True)
class _Box:
    bwrap: tuple[str, ...]  # bwrap and its fixed options; () for a plain child
    python: str
    seccomp: bytes
    describe: str  # the isolation line of reports


def _base_python() -> tuple[str, list[str]]:
    """The base interpreter (not the harness's virtual environment) and its folders outside /usr."""
    exe = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    roots: list[str] = []
    for p in (sys.base_prefix, sys.base_exec_prefix, os.path.dirname(os.path.dirname(exe))):
        p = os.path.realpath(p)
        if p != "/" and not any(p == r or p.startswith(r + "/") for r in ["/usr", *roots]):
            roots.append(p)
    return exe, roots


def _bwrap_options(tmp: tuple[str, ...]) -> tuple[str, ...]:
    opts = ["--unshare-all", "--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
            "--hostname", "sandbox", "--die-with-parent", "--new-session", "--ro-bind", "/usr", "/usr"]
    for path in ("/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(path):
            opts += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            opts += ["--ro-bind", path, path]
    for root in _base_python()[1]:
        opts += ["--ro-bind", root, root]
    opts += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache", "--dev", "/dev", "--remount-ro", "/dev",
             *tmp, "--chdir", "/tmp"]
    return tuple(opts)


# Threads must work, the ids must be the unprivileged ones, and chroot must be refused.
_PROBE = """import os, threading
t = threading.Thread(target=print, args=("thread",))
t.start()
t.join()
try:
    os.chroot("/")
    caps = "capabilities"
except PermissionError:
    caps = "none"
print(os.getuid(), os.getgid(), caps)
"""


@functools.lru_cache(maxsize=1)
def _bubblewrap() -> _Box | str:
    """A bubblewrap sandbox that ran the probe, or why there is none."""
    exe = shutil.which("bwrap")
    if exe is None:
        return "bubblewrap (bwrap) is not installed"
    seccomp = seccomp_filter(platform.machine())
    if seccomp is None:
        return f"no seccomp filter for this machine ({platform.machine()})"
    try:
        version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10,
                                 check=False).stdout.split()[-1]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        version = "(unknown version)"
    host = "host uid 0 without capabilities" if os.geteuid() == 0 else f"host uid {os.geteuid()}"
    want = f"thread\n{SANDBOX_UID} {SANDBOX_UID} none"
    problems = []
    # bwrap before 0.7 cannot size a tmpfs: then /tmp stays read-only rather than unbounded.
    for tmp, tmp_line in ((("--size", str(TMP_BYTES), "--tmpfs", "/tmp"), f"private {TMP_BYTES >> 20} MiB /tmp"),
                          (("--dir", "/tmp"), "read-only /tmp (this bwrap has no --size)")):
        box = _Box((exe, *_bwrap_options(tmp)), _base_python()[0], seccomp,
                   f"bubblewrap {version}: read-only /usr and Python, {tmp_line}, no network, own PID/IPC/UTS "
                   f"namespaces, no new processes (seccomp), uid {SANDBOX_UID} in a user namespace ({host})")
        r = _run(box, _PROBE, SandboxConfig(timeout_s=30))
        if r.passed and r.stdout.strip() == want:
            return box
        lines = (r.stderr.strip() or r.status).splitlines()
        problems.append(f"probe printed {r.stdout.strip()!r}" if r.passed else lines[-1].rstrip("."))
    return f"bubblewrap {version} could not start a sandbox: {problems[0]}"


def _box(cfg: SandboxConfig) -> _Box:
    found = _bubblewrap()
    if isinstance(found, _Box):
        return found
    if not cfg.unsafe_no_sandbox:
        raise UnsupportedError(
            f"code sandbox: {found}; refusing to run untrusted code without it. Install bubblewrap "
            "(./setup.sh does, or apt-get install bubblewrap) on a machine that allows user namespaces, "
            "or pass --unsafe-no-sandbox to run candidate programs without isolation")
    return _Box((), sys.executable, b"", f"none (--unsafe-no-sandbox; {found}): plain child processes as host uid "
                f"{os.geteuid()}, resource limits and Python-level blocks only")


def isolation_mode(cfg: Optional[SandboxConfig] = None) -> str:
    """How candidate code is isolated on this machine (one line, for reports); raises
    ``UnsupportedError`` where bubblewrap does not work and ``cfg`` does not allow running unsandboxed."""
    return _box(cfg or SandboxConfig()).describe


# --- running one program -----------------------------------------------------------------


def _data_fd(data: bytes) -> int:
    """The read end of a pipe that holds ``data`` (a few hundred bytes: within the pipe buffer)."""
    r, w = os.pipe()
    try:
        os.write(w, data)
    finally:
        os.close(w)
    return r


def _run(box: _Box, code: str, cfg: SandboxConfig) -> ExecResult:
    nonce = secrets.token_hex(16).encode()
    outdir = tempfile.mkdtemp(prefix="lmstack-sandbox-")  # stdout and stderr; not inside the sandbox
    marker_r, marker_w = os.pipe()
    fds = [marker_w]  # the child's; ours are closed as soon as it holds them
    try:
        if box.bwrap:
            for data in (_PASSWD, _GROUP, box.seccomp):
                fds.append(_data_fd(data))
            argv = [*box.bwrap, "--ro-bind-data", str(fds[1]), "/etc/passwd", "--ro-bind-data", str(fds[2]),
                    "/etc/group", "--remount-ro", "/", "--seccomp", str(fds[3]), box.python]
            env, cwd = dict(_ENV), "/"
        else:
            argv, env, cwd = [box.python], dict(_ENV, HOME=outdir, TMPDIR=outdir), outdir
        cpu = max(1, math.ceil(cfg.timeout_s)) + 1
        argv += ["-I", "-B", "-c", _RUNNER, str(cfg.memory_mb << 20), str(cpu), str(cfg.max_output_bytes),
                 str(marker_w), str(int(not box.bwrap))]
        out_path, err_path = os.path.join(outdir, "stdout"), os.path.join(outdir, "stderr")
        start = time.monotonic()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=out, stderr=err,
                                    pass_fds=fds, start_new_session=True)
            while fds:
                os.close(fds.pop())
            timed_out = False
            try:
                proc.communicate(nonce + b"\n" + code.encode("utf-8", "surrogatepass"), timeout=cfg.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # bwrap; --die-with-parent takes the sandbox along
                except ProcessLookupError:
                    pass
                proc.wait()
                try:
                    proc.stdin.close()
                except OSError:
                    pass
        duration = time.monotonic() - start
        os.set_blocking(marker_r, False)
        try:
            seen = os.read(marker_r, 64)
        except BlockingIOError:
            seen = b""
        status: Status = "passed" if seen == nonce else "timeout" if timed_out else "failed"

        def tail(path: str) -> str:
            with open(path, "rb") as f:
                f.seek(max(0, os.path.getsize(path) - 4096))
                return f.read().decode("utf-8", "replace")

        return ExecResult(status, None if timed_out else proc.returncode, tail(out_path), tail(err_path),
                          duration, box.describe)
    finally:
        for fd in fds + [marker_r]:
            os.close(fd)
        shutil.rmtree(outdir, ignore_errors=True)


def run_python(code: str, cfg: Optional[SandboxConfig] = None) -> ExecResult:
    """Run one Python program in the sandbox; never raises for anything the program does."""
    if not isinstance(code, str):
        raise ConfigError(f"run_python: code is {type(code).__name__}, expected a string")
    cfg = cfg or SandboxConfig()
    return _run(_box(cfg), code, cfg)


def run_many(programs: Sequence[str], cfg: Optional[SandboxConfig] = None, workers: int = 2,
             progress: bool = True) -> list[ExecResult]:
    """Run programs in parallel (``workers`` children at a time); results in input order."""
    if workers < 1:
        raise ConfigError(f"run_many: workers={workers}, expected >= 1")
    cfg = cfg or SandboxConfig()
    _box(cfg)  # probe (or refuse) once, before the threads start
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
    return CodeEvalResult(pass_at, per_task, isolation_mode(cfg))
