"""`flowkit run` end to end on the smoke preset: outputs, resume, and bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

from flowkit.cli import _add_commands, cli

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "wavelet_flow_affine.toml"
_add_commands()


def flowkit(*args: str):  # noqa: ANN201 - click Result
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_smoke_run_writes_a_complete_run_directory(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = flowkit("run", str(RECIPE), "--preset", "smoke", "--out", str(out))
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    for key in ("test_bpd", "train_bpd", "params", "train_images_per_s", "peak_memory_bytes", "wall_s", "steps"):
        assert key in summary, key
    assert np.isfinite(summary["test_bpd"]) and summary["steps"] == 3
    assert set(summary["test_bpd_per_part"]) == {"base", "level1", "level2"}
    # The whole-image bpd is the dims-weighted mean of the per-level bpds (log q = 0 here).
    dims = {"base": 49, "level1": 147, "level2": 588}
    weighted = sum(dims[k] * v for k, v in summary["test_bpd_per_part"].items()) / 784
    assert summary["test_bpd"] == pytest.approx(weighted, abs=1e-6)
    assert (out / "samples" / "samples-T1.png").is_file() and (out / "samples" / "samples-T0.7.png").is_file()
    assert (out / "recipe.toml").is_file() and (out / "metrics.jsonl").is_file() and (out / "report.md").is_file()
    assert "test bits/dim" in result.output

    again = flowkit("run", str(RECIPE), "--preset", "smoke", "--out", str(out))
    assert again.exit_code == 2 and "already exists" in again.output

    sampled = flowkit("sample", str(out), "--n", "4", "--temperature", "0.5")
    assert sampled.exit_code == 0 and (out / "samples" / "sample-T0.5.png").is_file()
    sr = flowkit("superres", str(out), "--from-level", "1", "--images", "2", "--samples", "2")
    assert sr.exit_code == 0 and (out / "samples" / "superres-from-level1-T0.8.png").is_file()


def test_rerunning_the_resolved_recipe_reproduces_the_run(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    assert flowkit("run", str(RECIPE), "--preset", "smoke", "--out", str(first)).exit_code == 0
    assert flowkit("run", str(first / "recipe.toml"), "--out", str(second)).exit_code == 0
    a = json.loads((first / "summary.json").read_text())
    b = json.loads((second / "summary.json").read_text())
    assert a["test_bpd"] == b["test_bpd"]


@pytest.mark.parametrize("level_threads", [1, 2])
def test_resume_continues_exactly(tmp_path: Path, level_threads: int) -> None:
    straight = tmp_path / "straight"
    args = ["--preset", "smoke", "--set", "train.steps=4", "--set", "train.checkpoint_every=2",
            "--set", f"train.level_threads={level_threads}", "--set", "model.crops=[1, 1, 2]"]
    assert flowkit("run", str(RECIPE), *args, "--out", str(straight)).exit_code == 0
    # A copy that was interrupted after step 2: only the step-2 checkpoint.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(straight / "recipe.toml", resumed / "recipe.toml")
    shutil.copytree(straight / "checkpoints" / "step-00000002", resumed / "checkpoints" / "step-00000002")
    (resumed / "checkpoints" / "latest.json").write_text(json.dumps({"step": 2, "path": "step-00000002"}))
    result = flowkit("run", "--resume", str(resumed))
    assert result.exit_code == 0, result.output
    a = load_file(str(straight / "checkpoints" / "step-00000004" / "weights.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "step-00000004" / "weights.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] == b[key]).all(), key


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flowkit", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model.step.coupling.use=afine"], 'Did you mean "affine"?'),
        (["model.levles=2"], 'Did you mean "levels"?'),
        (["train.lr=fast"], "should be float"),
        (["model.levels=3"], "model.levels = 3 needs image sides divisible by 2^3"),
        (["data.n_bits=0"], "n_bits = 0 is out of range"),
        (["data.use=npz", "data.path=missing.npz"], "missing.npz"),
        (["train.level_threads=2", "dequantizer.use=variational"], "needs a dequantizer without parameters"),
        (["train.level=5"], "train.level = 5 is out of range; this model's levels are: 0 (base)"),
        (["train.level=1", "dequantizer.use=variational"], "train.level trains one level alone"),
    ],
)
def test_bad_input_gives_one_paragraph_and_exit_2(tmp_path: Path, overrides: list[str], expected: str) -> None:
    args = ["run", str(RECIPE), "--preset", "smoke", "--out", str(tmp_path / "run")]
    for item in overrides:
        args += ["--set", item]
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert str(RECIPE) in result.stderr or "missing.npz" in expected
    assert not (tmp_path / "run").exists(), "bad input must not create a run directory"


def test_non_uint8_dataset_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "floats.npz"
    np.savez(path, x_train=np.zeros((4, 8, 8), np.float32), x_test=np.zeros((2, 8, 8), np.float32))
    result = run_cli("run", str(RECIPE), "--preset", "smoke", "--set", "data.use=npz", "--set",
                     f"data.path={path}", cwd=tmp_path)
    assert result.returncode == 2 and "uint8" in result.stderr and "floats.npz" in result.stderr


def test_traceback_only_when_asked(tmp_path: Path) -> None:
    result = run_cli("--traceback", "run", str(RECIPE), "--set", "train.lr=fast", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" in result.stderr


NAN_PLUGIN = '''
import torch
from flowkit import hookimpl
from flowkit_plugins.models.wavelet_flow import WaveletFlow, WaveletFlowParams

class Exploding(WaveletFlow):
    calls = 0
    def log_prob_terms(self, y, names):
        terms = super().log_prob_terms(y, names)
        if self.training and "level2" in terms:
            Exploding.calls += 1
            if Exploding.calls == EXPLODE_AT_CALL:
                terms["level2"] = terms["level2"] * float("nan")
        return terms

@hookimpl
def flowkit_register_models(register):
    register("exploding", Exploding, params=WaveletFlowParams)
'''


# Level 2 is computed once per step, plus once before the first step when the levels run in
# threads (the trainer times each level to balance the threads); either way step 3 explodes.
@pytest.mark.parametrize(("level_threads", "explode_at_call"), [(1, 3), (2, 4)])
def test_nan_loss_stops_with_level_and_step_and_keeps_last_good_checkpoint(
    tmp_path: Path, level_threads: int, explode_at_call: int,
) -> None:
    (tmp_path / "exploding_plugin.py").write_text(f"EXPLODE_AT_CALL = {explode_at_call}\n" + NAN_PLUGIN)
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "flowkit", "-p", "exploding_plugin", "run", str(RECIPE), "--preset", "smoke",
         "--set", "model.use=exploding", "--set", "train.steps=5", "--set", "train.checkpoint_every=1",
         "--set", f"train.level_threads={level_threads}", "--out", str(out)],
        capture_output=True, text=True, cwd=tmp_path, env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)},
    )
    assert result.returncode == 1, result.stderr
    assert "step 3" in result.stderr and "level2" in result.stderr and "Traceback" not in result.stderr
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 2
    weights = load_file(str(out / "checkpoints" / latest["path"] / "weights.safetensors"))
    assert all(np.isfinite(v.numpy()).all() for v in weights.values())
    assert json.loads((out / "summary.json").read_text())["status"] == "failed"


@pytest.mark.parametrize("recipe", ["glow", "macow", "flowpp"])
def test_level_on_a_model_whose_terms_are_not_densities_of_their_own_exits_2_without_a_run_directory(
    tmp_path: Path, recipe: str,
) -> None:
    result = run_cli("run", str(RECIPE.parent / f"{recipe}.toml"), "--preset", "smoke", "--level", "0",
                     "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "train.level = 0 (--level) trains one term of the model alone" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_derived_value_set_on_the_command_line_exits_2_naming_the_key(tmp_path: Path) -> None:
    result = run_cli("run", str(RECIPE), "--preset", "smoke", "--set", "model.step.coupling.net.hidden=128",
                     "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 2
    assert "model.step.coupling.net.hidden = 128 cannot be set" in result.stderr and "model.hidden" in result.stderr
    assert not (tmp_path / "run").exists()


def test_the_run_directory_recipe_lists_the_derived_values_and_reloads(tmp_path: Path) -> None:
    import tomllib

    out = tmp_path / "run"
    assert flowkit("run", str(RECIPE), "--preset", "smoke", "--out", str(out)).exit_code == 0
    resolved = tomllib.loads((out / "recipe.toml").read_text())
    assert resolved["model"]["derived"] == {"base_step.coupling.parity": [0, 1],
                                            "base_step.coupling.net.hidden": 8,
                                            "step.coupling.parity": [0, 1, 0, 1],
                                            "step.coupling.net.hidden": 8}
    assert "parity" not in resolved["model"]["step"]["coupling"]
    assert "hidden" not in resolved["model"]["step"]["coupling"]["net"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples_overflowed"] == {"T1": 0, "T0.7": 0}
    report = (out / "report.md").read_text()
    assert "samples overflowed at T1 | 0 of 4" in report and "test bits/dim of level1 (over its own dims)" in report
