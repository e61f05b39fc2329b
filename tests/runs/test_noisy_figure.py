"""A run trained with Gaussian noise reports the noisy images' NLL by that name, never as bits/dim:
summary.json, metrics.jsonl, report.md, the final table and the Python API; what needs a bound
(importance weighting, --level) or Gaussian noise (denoising) is refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import flowkit
from flowkit.cli import _add_commands, cli
from flowkit.plugins import make_plugins
from flowkit.runs.session import build_session

ROOT = Path(__file__).resolve().parents[2]
TARFLOW = ROOT / "recipes" / "tarflow.toml"
GAUSSIAN = ['dequantizer={use="gaussian", std=0.05}']
_add_commands()


@pytest.fixture(scope="module")
def noisy_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("noisy") / "run"
    result = CliRunner().invoke(cli, ["run", str(TARFLOW), "--preset", "smoke", "--out", str(out),
                                      "--set", GAUSSIAN[0], "--set", "sample.denoise=true",
                                      "--set", "train.log_every=1"])
    assert result.exit_code == 0, result.output
    assert "test noisy-data NLL" in result.output and "bits/dim" not in result.output, result.output
    return out


def test_the_summary_names_the_figure_and_has_no_bits_per_dim(noisy_run: Path) -> None:
    summary = json.loads((noisy_run / "summary.json").read_text())
    assert summary["figure"] == "noisy_nll"
    assert "test_noisy_nll" in summary and "train_noisy_nll" in summary
    assert not [k for k in summary if "bpd" in k], [k for k in summary if "bpd" in k]
    assert summary["density"].startswith("noisy-data NLL, not a bound on the images' bits/dim")


def test_metrics_and_report_never_call_it_bits_per_dim(noisy_run: Path) -> None:
    records = [json.loads(line) for line in (noisy_run / "metrics.jsonl").read_text().splitlines()]
    keys = {k for r in records for k in r}
    assert "train_noisy_nll" in keys and "test_noisy_nll" in keys
    assert not [k for k in keys if "bpd" in k]
    report = (noisy_run / "report.md").read_text()
    assert "| test_noisy_nll |" in report and "test_bpd" not in report
    assert "noisy_nll.png" in report and "samples-denoised-T1.png" in report


def test_the_python_api_refuses_bits_per_dim_and_gives_the_noisy_nll(noisy_run: Path) -> None:
    run = flowkit.load_run(noisy_run)
    with pytest.raises(flowkit.FlowkitError, match="noisy images.*run.noisy_nll"):
        run.bpd(run.test_x[:4])
    nll = run.noisy_nll(run.test_x)
    summary = json.loads((noisy_run / "summary.json").read_text())
    assert abs(nll.mean().item() - summary["test_noisy_nll"]) < 1e-9
    images, overflowed = run.sample(3, 1.0, denoise=True)
    assert images.shape == (3, 1, 28, 28)
    with pytest.raises(flowkit.FlowkitError, match="trained on noisy images.*no bits/dim to score"):
        run.score(run.test_x[:4])


def test_flowkit_sample_denoises(noisy_run: Path) -> None:
    result = CliRunner().invoke(cli, ["sample", str(noisy_run), "--n", "2", "--denoise", "--solver", "jacobi"])
    assert result.exit_code == 0, result.output
    assert (noisy_run / "samples" / "sample-denoised-T1.png").is_file()


@pytest.mark.parametrize(("overrides", "message"), [
    (["eval.iw_samples=4"], r"eval.iw_samples = 4 reports bits/dim.*noisy images' NLL"),
    (["sample.denoise=true"], r"sample.denoise = true.*\"uniform\" adds no Gaussian noise"),
])
def test_what_needs_a_bound_or_gaussian_noise_is_refused_by_name(overrides: list[str], message: str) -> None:
    extra = GAUSSIAN if "iw" in overrides[0] else []
    recipe = flowkit.load_recipe(TARFLOW, preset="smoke", overrides=[*extra, *overrides])
    with pytest.raises(flowkit.RecipeError, match=message):
        build_session(recipe, make_plugins())


def test_an_ablation_leaves_a_noisy_run_out_of_the_bits_per_dim_comparison(tmp_path: Path) -> None:
    from flowkit.runs.ablation.results import RunResult, VariantRow

    summary = {"status": "finished", "figure": "noisy_nll", "test_noisy_nll": 1.0}
    row = VariantRow("noisy", [RunResult("noisy", 0, tmp_path, summary, {}, [])])
    assert row.by_seed() == {} and row.values("test_bpd") == []
