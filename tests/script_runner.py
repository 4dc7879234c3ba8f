"""Running the project's shell scripts from test fixtures, and showing their logs when they fail."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def log_tails(state_dir: Path, lines: int) -> str:
    """The last lines of every component log under `state_dir/logs`, for a failure message."""
    logs = state_dir / "logs"
    parts = []
    for log in sorted(logs.glob("*.log")) if logs.is_dir() else []:
        parts.append(f"---- {log} (last {lines} lines) ----\n{tail(log.read_text(errors='replace'), lines)}")
    return "\n".join(parts)


def run_script(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, check=False)
