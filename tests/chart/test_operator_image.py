"""The chart's operator image (scripts/images/build.sh operator) holds finetune_api and finetune_operator on top of
the runtime and [operator] requirements only: no torch, transformers or datasets. This checks, without building
the image, that the operator's code never needs them (build.sh checks the same inside the image)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "datasets", "accelerate", "peft", "pyarrow", "pandas", "numpy")

PROGRAM = f"""
import sys
for name in {HEAVY!r} + ("finetune_trainer", "finetune_cli"):
    sys.modules[name] = None  # any import of them raises ImportError
import finetune_api, finetune_operator, finetune_operator.__main__, finetune_operator.handlers
print("ok")
"""


def test_operator_imports_with_the_trainer_stack_blocked() -> None:
    proc = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_operator_import_loads_nothing_heavy() -> None:
    # -X importtime lists every module the import loaded, whichever way it was reached.
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import finetune_operator.__main__"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    loaded = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    assert "kopf" in loaded and "finetune_operator" in loaded  # the probe sees the operator's own imports
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_operator_requirements_leave_the_trainer_stack_out() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["operator"]
    names = [re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].lower() for r in requirements]
    assert "kopf" in names and "kubernetes" in names, names
    assert not set(names) & set(HEAVY), names
