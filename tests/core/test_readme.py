"""The README's test command is the one CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    setup = [b for b in blocks[:2]]
    assert len(setup) == 2 and "flowkit run recipes/wavelet_flow_affine.toml" in setup[0]
    test_command = setup[1].split("&& ", 2)[-1]  # after venv creation and activation
    assert test_command in (ROOT / ".ci" / "run").read_text()
