"""Real processes: ``flowkit run`` stopped by SIGINT and SIGTERM after its first metrics line
(exit 130 and 143, one line naming the command that resumes, a checkpoint), refused while
another process trains into the same folder, killed with SIGKILL before its first checkpoint,
and resumed to the end each time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner

from flowkit.cli import _add_commands, cli
from flowkit.runs.checkpoint import latest_checkpoint, verify_checkpoint

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "wavelet_flow_affine.toml"
# Smoke-sized steps, a metrics line after each, and a budget no process here reaches before its
# signal: only the last resume trains to the end.
ARGS = ["--preset", "smoke", "--set", "train.level_threads=1", "--set", "train.threads=1", "--set",
        "train.log_every=1"]
_add_commands()


def start(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "NO_COLOR": "1"}
    return subprocess.Popen([sys.executable, "-m", "flowkit", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def steps_logged(run: Path) -> list[int]:
    """The steps of metrics.jsonl's training lines (every line must be complete JSON)."""
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [r["step"] for r in map(json.loads, lines) if "train_bpd" in r]


def wait_for_a_step_after(run: Path, step: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if any(s > step for s in steps_logged(run)):
                return
        except json.JSONDecodeError:  # the line being written
            pass
        if process.poll() is not None:
            raise AssertionError(f"flowkit ended early (exit {process.returncode}): {process.communicate()}")
        time.sleep(0.05)
    process.kill()
    raise AssertionError("no metrics line in time")


def latest_step(run: Path) -> int:
    path = latest_checkpoint(run / "checkpoints")
    verify_checkpoint(path)
    return json.loads((path / "state.json").read_text())["step"]


def stop(process: subprocess.Popen, signum: int) -> tuple[int, str]:
    process.send_signal(signum)
    _, err = process.communicate(timeout=300)
    return process.returncode, err


def test_sigint_and_sigterm_checkpoint_exit_130_and_143_and_the_run_resumes_to_the_end(tmp_path: Path) -> None:
    run, budget = tmp_path / "run", 300
    first = start("run", str(RECIPE), *ARGS, "--set", f"train.steps={budget}", "--out", str(run), cwd=tmp_path)
    wait_for_a_step_after(run, 0, first)

    # While it trains, no second process gets the folder: neither a new run nor a resume.
    for args in (["run", str(RECIPE), *ARGS, "--out", str(run), "--overwrite"], ["run", "--resume", str(run)]):
        refused = CliRunner().invoke(cli, args)
        assert refused.exit_code == 2, refused.output
        assert f"in use by process {first.pid}" in " ".join(refused.output.split())
    assert (run / "recipe.toml").is_file()

    code, err = stop(first, signal.SIGINT)
    assert code == 130, err
    assert err.strip().splitlines() == [
        f"Stopped by SIGINT after step {latest_step(run)}, with a checkpoint of it; "
        f"continue with: flowkit run --resume {run}"]
    stopped_at = latest_step(run)
    assert 1 <= stopped_at < budget

    second = start("run", "--resume", str(run), cwd=tmp_path)
    wait_for_a_step_after(run, stopped_at, second)
    code, err = stop(second, signal.SIGTERM)
    assert code == 143, err
    assert "Traceback" not in err and f"continue with: flowkit run --resume {run}" in err
    assert stopped_at < latest_step(run) < budget

    result = CliRunner().invoke(cli, ["run", "--resume", str(run)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == budget
    assert steps_logged(run) == list(range(1, budget + 1)), "each step logged once across the three processes"


def test_a_run_killed_before_its_first_checkpoint_resumes_from_the_beginning(tmp_path: Path) -> None:
    run, budget = tmp_path / "run", 150
    killed = start("run", str(RECIPE), *ARGS, "--set", f"train.steps={budget}", "--out", str(run), cwd=tmp_path)
    wait_for_a_step_after(run, 0, killed)
    killed.kill()  # SIGKILL: no handler runs, no checkpoint is written
    killed.communicate(timeout=60)
    assert not (run / "checkpoints" / "latest.json").exists() and (run / "recipe.toml").is_file()

    result = CliRunner().invoke(cli, ["run", "--resume", str(run)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "has no checkpoint yet: starting it from the beginning" in " ".join(result.output.split())
    assert json.loads((run / "summary.json").read_text())["steps"] == budget
    assert steps_logged(run) == list(range(1, budget + 1))
