"""Waiting threads sleep instead of spinning (bench/threads.py measures why), unless the user
chose otherwise."""

import os
import subprocess
import sys


def _policy_after_import(env_extra: dict) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(env_extra)
    code = "import lmstack, os; print(os.environ.get('OMP_WAIT_POLICY'))"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_importing_lmstack_makes_openmp_threads_wait_passively():
    assert _policy_after_import({}) == "PASSIVE"


def test_a_wait_policy_the_user_set_wins():
    assert _policy_after_import({"OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"
