"""A class-conditional run end to end (data.labels): the model is built conditional, labels become
its one-hot context, the run reports the conditional and marginal bits/dim and the Bayes
classifier's accuracy, draws one grid row per class (and "no class", and guided rows), and
`flowkit sample --class/--guidance` and `TrainedRun` sample and classify by class."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import flowkit
from flowkit.cli import _add_commands, cli
from flowkit.errors import FlowkitError, RecipeError
from flowkit.plugins import Plugins, make_plugins
from flowkit.recipes.load import load_recipe
from flowkit.runs.classes import class_log_prior, evaluate_classes, log_prob_per_class
from flowkit.runs.evaluate import evaluate, nonfinite_figures, per_image
from flowkit.runs.report import write_report
from flowkit.runs.rundir import RunDir
from flowkit.runs.session import build_session
from flowkit.runs.trainer import SilentReporter, Trainer

ROOT = Path(__file__).resolve().parents[2]
WAVELET = ROOT / "recipes" / "wavelet_flow_affine.toml"
GLOW = ROOT / "recipes" / "glow.toml"
ONE_THREAD = ["train.device=cpu", "train.threads=1"]
_add_commands()


@pytest.fixture(scope="module")
def plugins() -> Plugins:
    return make_plugins()


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cond") / "run"
    result = CliRunner().invoke(cli, [
        "run", str(WAVELET), "--preset", "smoke", "--out", str(out), "--set", "data.labels=true",
        "--set", "train.label_dropout=0.25", "--set", "sample.guidance=[1.5]", "--set", "sample.n=20",
        *[a for kv in ONE_THREAD for a in ("--set", kv)]], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def test_a_labelled_recipe_builds_the_model_conditional_and_reports_the_class_figures(conditional_run: Path) -> None:
    summary = json.loads((conditional_run / "summary.json").read_text())
    assert summary["density"].startswith("class-conditional dequantized bound")
    assert summary["classes"] == [str(c) for c in range(10)] and summary["class_images"] == 32
    assert 0.0 <= summary["bayes_accuracy"] <= 1.0 and set(summary["bayes_accuracy_per_class"]) <= set(summary["classes"])
    # p(y) >= p(y | c) p(c) for the image's class: the marginal is at most log2(1 / p(c)) / D above.
    d = 28 * 28
    assert summary["test_bpd_marginal"] <= summary["test_bpd"] + math.log2(1 / 0.05) / d
    names = sorted(p.name for p in (conditional_run / "samples").glob("*.png"))
    assert names == sorted(f"samples{kind}-T{t}.png" for kind in ("", "-noclass", "-guided1.5") for t in ("1", "0.7"))
    # One row per class: 20 images over 10 classes, 2 per row.
    rows = np.load(conditional_run / "samples" / "samples-T1.npy")
    assert rows.shape[0] == 20 and np.load(conditional_run / "samples" / "samples-noclass-T1.npy").shape[0] == 20
    grid = np.asarray(Image.open(conditional_run / "samples" / "samples-T1.png"))
    pad, side, scale = 2, 28, max(1, 128 // 28)
    assert grid.shape[:2] == (scale * (10 * (side + pad) + pad), scale * (2 * (side + pad) + pad))
    report = (conditional_run / "report.md").read_text()
    assert "| test_bpd_marginal |" in report and "| bayes_accuracy |" in report and "samples-guided1.5-T1.png" in report


def test_the_test_figure_is_each_image_under_its_own_class_and_the_marginal_mixes_the_classes(plugins: Plugins) -> None:
    recipe = load_recipe(WAVELET, plugins.registries, preset="smoke", overrides=[*ONE_THREAD, "data.labels=true"])
    session = build_session(recipe, plugins)
    assert session.conditioning is not None and session.conditioning.num_classes == 10
    test = session.test_x.first(12)
    prior = class_log_prior(session.train_x.labels, 10)
    figures = evaluate_classes(session, test, test.labels, batch_size=5, seed=3, log_class_prior=prior)
    # The same noise and batches as the run's own test figure: the same conditional bits/dim.
    assert figures["bpd_conditional"] == pytest.approx(evaluate(session, test, test.labels, batch_size=5, seed=3)["bpd"],
                                                       abs=1e-9)
    # Independently: the marginal from the per-class densities by hand, on one batch.
    from flowkit.runs.evaluate import eval_mode

    with eval_mode(session, 3):
        x = test[0:5].to(session.device)
        y, log_q = session.objective.dequantize(x)
        per_class = log_prob_per_class(session, y)
        by_hand = []
        for i in range(5):
            p = sum(math.exp(per_class[i, c].item() - per_class[i].max().item()) * math.exp(prior[c].item())
                    for c in range(10))
            by_hand.append(per_class[i].max().item() + math.log(p))
    marginal = session.conditioning.log_marginal(per_class, prior)
    assert marginal.tolist() == pytest.approx(by_hand, rel=1e-9)
    # A batch without labels is "no class", not an error and not the first class.
    no_class = next(per_image(session, test.first(5), None, batch_size=5, seed=3))["bpd"]
    labelled = next(per_image(session, test.first(5), np.full(5, 10), batch_size=5, seed=3))["bpd"]
    assert torch.equal(no_class, labelled)


def test_label_dropout_one_trains_the_same_model_whatever_the_labels(plugins: Plugins, tmp_path: Path) -> None:
    """With every label dropped, training never sees a class: permuted labels give the same weights,
    and every class's column of every context projection stays at its zero initialisation."""
    def trained(permute: bool) -> dict[str, torch.Tensor]:
        recipe = load_recipe(GLOW, plugins.registries, preset="smoke",
                             overrides=[*ONE_THREAD, "data.labels=true", "train.label_dropout=1.0", "train.steps=2"])
        session = build_session(recipe, plugins)
        if permute:
            session.train_x.labels = np.asarray(session.train_x.labels)[::-1].copy()
        rundir = RunDir.create(recipe.meta.name, out=tmp_path / f"permuted{permute}")
        Trainer(session, rundir, SilentReporter()).train()
        rundir.release()
        return {k: v.detach().clone() for k, v in session.model.state_dict().items()}

    plain, permuted = trained(False), trained(True)
    assert plain.keys() == permuted.keys()
    for key in plain:
        assert torch.equal(plain[key], permuted[key]), key
    projections = [v for k, v in plain.items() if v.dim() == 2 and v.shape[1] == 11]
    assert projections, "the conditional Glow has context projections over K + 1 = 11 entries"
    for weight in projections:
        assert torch.count_nonzero(weight[:, :10]) == 0


def test_a_model_without_a_vector_context_is_refused_for_labels_naming_it(plugins: Plugins) -> None:
    recipe = load_recipe(ROOT / "recipes" / "vae_flow.toml", plugins.registries, preset="smoke",
                         overrides=[*ONE_THREAD, "data.labels=true"])
    with pytest.raises(RecipeError, match=r'model "vae_flow" takes no vector context\. Models that do: .*wavelet_flow'):
        build_session(recipe, plugins)


def test_sample_by_class_with_guidance_from_the_command_line(conditional_run: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["sample", str(conditional_run), "--class", "3", "--guidance", "2", "--n", "6",
                                 "--temperature", "0.7"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (conditional_run / "samples" / "sample-class3-T0.7.png").is_file()
    assert (conditional_run / "samples" / "sample-class3-guided2-T0.7.png").is_file()
    result = runner.invoke(cli, ["sample", str(conditional_run), "--class", "none", "--n", "4", "--temperature", "1"],
                           catch_exceptions=False)
    assert result.exit_code == 0 and (conditional_run / "samples" / "sample-classnone-noclass-T1.png").is_file()
    for args, message in [(["--class", "12"], "--class 12 is not a class of this run; classes: 0 (0), 1 (1)"),
                          (["--class", "none", "--guidance", "1"], "--guidance steers a class away from"),
                          (["--class", "1", "--mcmc"], "--mcmc samples the unconditional density")]:
        result = runner.invoke(cli, ["sample", str(conditional_run), "--n", "2", *args], catch_exceptions=False)
        assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output


def test_a_trained_run_samples_and_classifies_by_class(conditional_run: Path) -> None:
    run = flowkit.load_run(conditional_run)
    images, _ = run.sample(4, 0.7, labels=3, guidance=1.0)
    assert images.shape == (4, 1, 28, 28) and images.dtype == torch.uint8
    again, _ = run.sample(4, 0.7, labels=torch.tensor([3, 3, 3, 3]), guidance=1.0)
    assert torch.equal(images, again)  # an int and one label per image draw the same
    x, labels = run.test_x[:6], run.test_labels[:6]
    predicted, log_px = run.classify(x)
    assert predicted.shape == (6,) and log_px.shape == (6, 10)
    # log P(x | c) of each image's own class is what run.log_prob(x, labels) gives (same noise).
    assert log_px.gather(1, labels[:, None])[:, 0].tolist() == pytest.approx(run.log_prob(x, labels).tolist(), rel=1e-9)
    prior = class_log_prior(run.session.train_x.labels, 10)
    assert torch.equal(predicted, torch.argmax(log_px + prior, dim=1))
    with pytest.raises(FlowkitError, match="labels must be class indices 0..9"):
        run.sample(2, labels=torch.tensor([0, 11]))


def test_an_unconditional_run_refuses_class_sampling(tmp_path: Path) -> None:
    out = tmp_path / "plain"
    result = CliRunner().invoke(cli, ["run", str(WAVELET), "--preset", "smoke", "--out", str(out),
                                      *[a for kv in ONE_THREAD for a in ("--set", kv)]], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["sample", str(out), "--class", "3"], catch_exceptions=False)
    assert result.exit_code == 2 and "is not class-conditional" in result.output
    with pytest.raises(FlowkitError, match="is not class-conditional"):
        flowkit.load_run(out).classify(flowkit.load_run(out).test_x[:2])


def test_a_non_finite_class_figure_is_named_in_the_summary_and_the_report(conditional_run: Path,
                                                                          tmp_path: Path) -> None:
    # The class figures come from their own loop (flowkit.runs.classes), not evaluate's, whose
    # "nonfinite" key never reached summary.json: a NaN marginal or accuracy sat there unnamed.
    summary = json.loads((conditional_run / "summary.json").read_text())
    assert "nonfinite" not in summary and nonfinite_figures(summary) == []
    summary["test_bpd_marginal"] = float("nan")
    summary["bayes_accuracy_per_class"]["3"] = float("inf")
    assert nonfinite_figures(summary) == ["test_bpd_marginal", "bayes_accuracy_per_class/3"]

    copy = tmp_path / "run"
    shutil.copytree(conditional_run, copy)
    summary["nonfinite"] = nonfinite_figures(summary)
    RunDir(copy).write_summary(summary)
    report, _ = write_report(RunDir(copy))
    assert "| **not finite** | test_bpd_marginal, bayes_accuracy_per_class/3 |" in report.read_text()
