"""A run trained with Gaussian noise reports the noisy images' NLL by that name, never as bits/dim:
summary.json, metrics.jsonl, report.md, the final table and the Python API; what needs a bound
(importance weighting, --level) or Gaussian noise (denoising) is refused by name."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
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


# -- class-conditional on Gaussian noise (tarflow.toml's cond_gaussian: the reference notebook's MNIST setting)

CONDITIONAL = [GAUSSIAN[0], "data.labels=true", "train.label_dropout=0.1", "eval.class_images=32",
               "sample.guidance=[1.0]", "sample.denoise=true", "sample.n=20", "train.threads=1"]


@pytest.fixture(scope="module")
def noisy_conditional_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("noisy_cond") / "run"
    result = CliRunner().invoke(
        cli, ["run", str(TARFLOW), "--preset", "smoke", "--out", str(out), *[a for kv in CONDITIONAL for a in ("--set", kv)]],
        catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "bits/dim" not in result.output, result.output
    return out


def test_the_final_table_shows_the_marginal_and_the_classifier_by_the_figures_name(noisy_conditional_run: Path) -> None:
    from rich.console import Console

    from flowkit.cli.run import summary_table

    summary = json.loads((noisy_conditional_run / "summary.json").read_text())
    console = Console(width=200, record=True)  # a fixed width: the shared console wraps by the terminal's
    console.print(summary_table(summary, noisy_conditional_run))
    text = console.export_text()
    assert "test noisy-data NLL, marginal over classes (32 images)" in text
    assert "Bayes classifier accuracy (32 images)" in text and "bits/dim" not in text


def test_a_conditional_noisy_run_reports_the_class_figures_as_noisy_nll(noisy_conditional_run: Path) -> None:
    summary = json.loads((noisy_conditional_run / "summary.json").read_text())
    assert not [k for k in summary if "bpd" in k], [k for k in summary if "bpd" in k]
    marginal, conditional = summary["test_noisy_nll_marginal"], summary["test_noisy_nll_conditional"]
    # p(y) = sum_c p(y | c) p(c) >= p(y | c) p(c): per image the marginal NLL is never above the
    # conditional by more than -log2 p(c) / D, p(c) >= 1/65 for the smoke preset's 64 training
    # labels (a missing class counts once); a different number: the K classes were evaluated.
    assert marginal <= conditional + math.log2(65) / (28 * 28)
    assert marginal != conditional
    assert 0.0 <= summary["bayes_accuracy"] <= 1.0 and summary["class_images"] == 32
    report = (noisy_conditional_run / "report.md").read_text()
    assert "| test_noisy_nll_marginal |" in report and "| bayes_accuracy |" in report


def test_a_conditional_noisy_run_denoises_every_grid(noisy_conditional_run: Path) -> None:
    summary = json.loads((noisy_conditional_run / "summary.json").read_text())
    samples = noisy_conditional_run / "samples"
    for kind in ("", "-noclass", "-guided1"):
        for temperature in ("T1", "T0.7"):
            assert (samples / f"samples{kind}-{temperature}.png").is_file()
            assert (samples / f"samples-denoised{kind}-{temperature}.png").is_file()
            assert f"denoised{kind}-{temperature}" in summary["samples_overflowed"]
    # The same draws, denoised: the grids pair up image for image, and the step moved them.
    plain, denoised = (np.load(samples / f"samples{k}-T1.npy") for k in ("", "-denoised"))
    assert plain.shape == denoised.shape == (20, 28, 28, 1)
    assert not np.array_equal(plain, denoised)
    assert np.abs(plain.astype(int) - denoised.astype(int)).mean() < 16  # one small step, not new images


def test_a_conditional_draw_is_denoised_by_its_own_class_density(tmp_path: Path) -> None:
    from flowkit.runs.classes import class_grids
    from flowkit.runs.images import to_uint8
    from flowkit.runs.sampling import denoise, saturate, seeded

    recipe = flowkit.load_recipe(TARFLOW, preset="smoke", overrides=CONDITIONAL)
    session = build_session(recipe, make_plugins())
    conditioning = session.conditioning
    torch.manual_seed(0)
    with torch.no_grad():  # past the zero-initialised projections: the class reaches the density
        for p in session.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    session.model.eval()
    class_grids(session, tmp_path, n=4, temperatures=[1.0], seed=5, labels=3, prefix="x", denoised=True)
    written = np.load(tmp_path / "x-denoised-T1.npy")
    with seeded(session, 5):
        y = conditioning.sample(4, 1.0, 3)

    def denoised_under(label: int) -> np.ndarray:
        return to_uint8(saturate(denoise(session, y, conditioning.context(label, 4)))[0], session.n_bits)

    assert np.array_equal(written, denoised_under(3))
    assert not np.array_equal(written, denoised_under(conditioning.no_class))  # the class mattered


def test_flowkit_sample_denoises_a_conditional_run_by_class(noisy_conditional_run: Path) -> None:
    result = CliRunner().invoke(cli, ["sample", str(noisy_conditional_run), "--n", "2", "--class", "4",
                                      "--guidance", "1", "--denoise"])
    assert result.exit_code == 0, result.output
    assert (noisy_conditional_run / "samples" / "sample-class4-denoised-guided1-T1.png").is_file()


def test_the_python_api_denoises_a_conditional_draw_by_its_class(noisy_conditional_run: Path) -> None:
    from flowkit.runs.images import to_levels
    from flowkit.runs.sampling import denoise, saturate, seeded

    run = flowkit.load_run(noisy_conditional_run)
    conditioning = run.session.conditioning
    with torch.no_grad():  # past the zero-initialised projections: the class reaches the density
        torch.manual_seed(1)
        for p in run.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    got = run.sample(4, 1.0, seed=7, labels=3, guidance=1.0, denoise=True).images
    with seeded(run.session, 7):
        y = conditioning.sample(4, 1.0, 3, 1.0)
    by_class, by_none = (to_levels(saturate(denoise(run.session, y, conditioning.context(c, 4)))[0], run.n_bits)
                         for c in (3, None))
    assert torch.equal(got, by_class.to(torch.uint8)) and not torch.equal(got, by_none.to(torch.uint8))
