# scripts/check_imports.py: the package passes it, and it catches a cycle and an upward import (lazy ones too).
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPT = ROOT / "scripts" / "check_imports.py"


def run(root=None):
    return subprocess.run([sys.executable, str(SCRIPT), *([str(root)] if root else [])], capture_output=True,
                          text=True)


def test_the_package_has_no_cycle_and_no_upward_import():
    r = run()
    assert r.returncode == 0, r.stderr


def _package(tmp_path, files: dict):
    root = tmp_path / "chatglm"
    for name, text in {"__init__.py": "", "models/__init__.py": "", **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize("files,message", [
    ({"cache.py": "from . import generate\n", "generate.py": "from .cache import KVCache\n"},
     "import cycle: chatglm.cache <-> chatglm.generate"),
    ({"kernels.py": "def f():\n    from .quantize import dequantize\n", "quantize.py": ""},
     "chatglm.kernels (layer 0) imports chatglm.quantize (layer 2)"),
    ({"models/glm.py": "import chatglm.engine\n", "engine.py": ""}, "imports chatglm.engine"),
    ({"extra.py": ""}, "chatglm.extra is in no layer"),
], ids=["cycle", "lazy-upward", "absolute-upward", "unplaced-module"])
def test_a_violation_fails(tmp_path, files, message):
    r = run(_package(tmp_path, files))
    assert r.returncode == 1 and message in r.stderr, r.stderr
