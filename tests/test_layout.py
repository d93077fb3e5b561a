"""The package's shape: the linter passes, modules stay small, and the leaf modules stay light to import."""
import glob
import os
import subprocess
import sys

import pytest
from helpers import ROOT


def test_ruff_passes():
    pytest.importorskip("ruff")  # installed by requirements.txt
    completed = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", ROOT], capture_output=True,
                               text=True)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-1000:]


def test_no_package_module_over_350_lines():
    long = {}
    for path in glob.glob(os.path.join(ROOT, "dino_sparo", "**", "*.py"), recursive=True):
        with open(path) as handle:
            lines = sum(1 for _ in handle)
        if lines > 350:
            long[os.path.relpath(path, ROOT)] = lines
    assert long == {}


@pytest.mark.parametrize("modules, absent", [
    ("dino_sparo.checkpoint, dino_sparo.loss, dino_sparo.distributed", "timm"),
    ("dino_sparo.errors, dino_sparo.cli", "torch"),
])
def test_leaf_modules_import_light(modules, absent):
    code = f"import sys, {modules}; print({absent!r} in sys.modules)"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": ROOT})
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "False"
