"""Running ``llm-fleet`` as an operator does: a real process, its exit code and output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LLM_FLEET = Path(sys.executable).parent / "llm-fleet"


def llm_fleet(
    env: dict[str, str], *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LLM_FLEET), *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def error_line(stderr: str) -> str:
    """The command's one error line (stderr also holds progress bar redraws)."""
    lines = stderr.replace("\r", "\n").splitlines()
    errors = [line for line in lines if line.startswith("llm-fleet weights: ")]
    assert len(errors) == 1, stderr
    return errors[0]
