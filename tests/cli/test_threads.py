# OpenMP on a shared machine: a passive wait policy that libgomp sees (set before torch loads it) unless the user
# chose one; --threads, and one thread by default for small models.
import os
import subprocess
import sys

import pytest
import torch

from chatglm.cli import main
from conftest import GOLDEN, ROOT, needs_shared


@pytest.mark.parametrize("env,shown", [
    ({}, "OMP_WAIT_POLICY = 'PASSIVE'"),
    ({"OMP_WAIT_POLICY": "active"}, "OMP_WAIT_POLICY = 'ACTIVE'"),
    ({"GOMP_SPINCOUNT": "10000"}, "GOMP_SPINCOUNT = '10000'"),
])
def test_libgomp_sees_the_wait_policy(env, shown):
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    # libgomp prints the settings it read, once, when torch loads it
    r = subprocess.run([sys.executable, "-c", "import chatglm, torch"], capture_output=True, text=True, cwd=ROOT,
                       timeout=300, env={**base, **env, "OMP_DISPLAY_ENV": "verbose"})
    assert r.returncode == 0, r.stderr
    assert shown in r.stderr
    if "OMP_WAIT_POLICY" in env:
        assert "OMP_WAIT_POLICY = 'PASSIVE'" not in r.stderr


def threads_after(argv) -> int:
    torch.set_num_threads(2)
    try:
        assert main(argv) == 0
        return torch.get_num_threads()
    finally:
        torch.set_num_threads(1)


@needs_shared
@pytest.mark.parametrize("extra,expected", [([], 1), (["--threads", "2"], 2), (["--threads", "1"], 1)])
def test_threads(extra, expected, capsys):
    argv = ["generate", str(GOLDEN / "chatglm3-6b-tiny"), "--prompt", "hi", "--greedy", "--max-length", "30"]
    assert threads_after(argv + extra) == expected


@needs_shared
def test_threads_reach_the_kernels(capsys):
    from chatglm import kernels
    if kernels.library() is None:
        pytest.skip("no C compiler: no kernels")
    try:
        assert main(["generate", str(GOLDEN / "chatglm3-6b-tiny"), "--prompt", "hi", "--max-length", "30",
                     "--threads", "2"]) == 0
        assert kernels.library().cg_num_threads() == 2
    finally:
        torch.set_num_threads(1)
        kernels.library().cg_set_num_threads(1)


def test_big_models_keep_one_thread_per_core(tmp_path):
    import argparse

    from chatglm.cli import default_threads
    assert default_threads(argparse.Namespace(model=str(ROOT.parent / "shared" / "tokenizers" / "chatglm3-6b"),
                                              random=False)) is None
    assert default_threads(argparse.Namespace(model=None, random=False)) == 1  # the demo model


@needs_shared
def test_the_server_keeps_one_thread_per_core_for_small_models():
    import argparse

    from chatglm.cli import cmd_generate, cmd_serve, default_threads
    model = str(GOLDEN / "chatglm3-6b-tiny")
    assert default_threads(argparse.Namespace(model=model, func=cmd_generate)) == 1
    assert default_threads(argparse.Namespace(model=model, func=cmd_serve)) is None
