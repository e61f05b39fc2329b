"""flowkit ablate and compare: grids, validation, duplicates, resume after a kill, failures,
the submitit path, and the report's numbers and statistics."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from flowkit.cli import _add_commands, cli
from flowkit.errors import RecipeError
from flowkit.runs.ablation.results import RunResult, VariantRow, paired_difference, time_to
from flowkit.runs.ablation.spec import load_ablation

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "wavelet_flow_affine.toml"
_add_commands()


def write(tmp_path: Path, body: str, name: str = "ablation.toml") -> Path:
    path = tmp_path / name
    path.write_text(f'[ablation]\nname = "t"\nrecipe = "{RECIPE}"\nrecipe_preset = "smoke"\n' + body)
    return path


def flowkit(*args: str):  # noqa: ANN201 - click Result
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_a_grid_is_the_cartesian_product_and_every_run_is_resolved(tmp_path, plugins):
    path = write(tmp_path, 'seeds = [0, 1]\nbudget = { steps = 2 }\n[grid]\n'
                           '"model.decomposition.use" = ["haar", "db2"]\n"train.lr" = [1e-3, 2e-3]\n')
    ablation = load_ablation(path, plugins.registries)
    assert ablation.variants == ["use=haar, lr=0.001", "use=haar, lr=0.002", "use=db2, lr=0.001",
                                 "use=db2, lr=0.002"]
    assert len(ablation.runs) == 8
    run = ablation.runs[-1]
    assert (run.recipe.model.params.decomposition.use, run.recipe.train.lr, run.recipe.train.seed) == ("db2", 2e-3, 1)
    assert (run.recipe.train.steps, run.recipe.train.minutes) == (2, 0.0)  # the budget, the same for all


def test_an_images_budget_becomes_steps_of_each_variants_batch(tmp_path, plugins):
    path = write(tmp_path, 'budget = { images = 100 }\n[grid]\n"train.batch_size" = [16, 32]\n')
    steps = [run.recipe.train.steps for run in load_ablation(path, plugins.registries).runs]
    assert steps == [math.ceil(100 / 16), math.ceil(100 / 32)]


def test_a_typo_in_the_last_variant_fails_before_anything_runs_naming_it(tmp_path, plugins):
    path = write(tmp_path, 'budget = { steps = 2 }\n[[variants]]\nname = "fine"\n'
                           '[[variants]]\nname = "broken"\nset = ["model.step.coupling.use=afine"]\n')
    with pytest.raises(RecipeError, match=r'variant "broken".*model\.step\.coupling\.use = "afine".*Did you mean "affine"'):
        load_ablation(path, plugins.registries)
    result = subprocess.run([sys.executable, "-m", "flowkit", "ablate", str(path), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and 'variant "broken"' in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("body", "expected"), [
    ('budget = { steps = 2, minutes = 1.0 }\n[grid]\n"train.lr" = [1e-3]\n', "exactly one of steps, images or minutes"),
    ('budget = { steps = 2 }\n', "give either a [grid] table or [[variants]]"),
    ('budget = { steps = 2 }\n[grid]\n"train.lr" = 1e-3\n', 'grid."train.lr" should be a non-empty list'),
    ('budget = { steps = 2 }\nsedds = [1]\n[grid]\n"train.lr" = [1e-3]\n', 'Did you mean "seeds"?'),
    ('budget = { steps = 2 }\n[[variants]]\nname = "a"\n[[variants]]\nname = "a"\n', 'variant name "a" is used twice'),
])
def test_bad_ablation_files_name_the_key(tmp_path, plugins, body, expected):
    with pytest.raises(RecipeError) as exc:
        load_ablation(write(tmp_path, body), plugins.registries)
    assert expected in str(exc.value)


def test_a_variant_that_changes_nothing_is_reported_as_a_duplicate(tmp_path, plugins):
    # The smoke preset's decomposition is haar already: "haar" resolves to the base recipe.
    path = write(tmp_path, 'budget = { steps = 2 }\n[[variants]]\nname = "base"\n'
                           '[[variants]]\nname = "haar"\nset = ["model.decomposition.use=haar"]\n'
                           '[[variants]]\nname = "db2"\nset = ["model.decomposition.use=db2"]\n')
    assert load_ablation(path, plugins.registries).duplicates == {"haar": "base"}


def _variants(steps: int = 2, extra: str = "") -> str:
    return (f'budget = {{ steps = {steps} }}\neval_every_seconds = 0.01\neval_images = 16\n{extra}'
            '[[variants]]\nname = "affine"\n'
            '[[variants]]\nname = "additive"\nset = ["model.step.coupling.use=additive"]\n')


def test_ablation_runs_and_reports_numbers_equal_to_the_run_summaries(tmp_path):
    path = write(tmp_path, 'seeds = [0, 1]\n' + _variants())
    out = tmp_path / "out"
    result = flowkit("ablate", str(path), "--out", str(out))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert [v["variant"] for v in report["variants"]] == ["affine", "additive"]
    for record in report["variants"]:
        summaries = [json.loads((Path(r) / "summary.json").read_text()) for r in record["runs"]]
        values = [s["test_bpd"] for s in summaries]
        assert record["test_bpd_mean"] == pytest.approx(sum(values) / 2, abs=1e-12)
        assert record["test_bpd_std"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2), abs=1e-12)
        assert record["params"] == summaries[0]["params"] and record["steps"] == 2
    additive = report["variants"][1]
    assert additive["overrides"]["model.step.coupling.use"] == "additive"
    md = (out / "report.md").read_text()
    assert "| affine |" in md and "| additive |" in md
    plots = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert {"final_bpd.png", "samples.png", "bpd_vs_train_seconds.png"} <= set(plots)
    # The same report from the run directories alone: seeds of one recipe are one variant.
    runs = sorted((out / "runs").iterdir())
    compared = flowkit("compare", *map(str, runs), "--out", str(tmp_path / "cmp"))
    assert compared.exit_code == 0, compared.output
    again = json.loads((tmp_path / "cmp" / "report.json").read_text())
    assert sorted(v["test_bpd_mean"] for v in again["variants"]) == pytest.approx(
        sorted(v["test_bpd_mean"] for v in report["variants"]), abs=1e-12)


def test_a_failing_variant_is_reported_and_the_others_go_on(tmp_path):
    path = write(tmp_path, 'budget = { steps = 2 }\n[[variants]]\nname = "fine"\n'
                           '[[variants]]\nname = "too deep"\nset = ["model.levels=3", "model.depth=[2]"]\n')
    out = tmp_path / "out"
    assert flowkit("ablate", str(path), "--out", str(out)).exit_code == 0
    report = json.loads((out / "report.json").read_text())
    fine, deep = report["variants"]
    assert fine["test_bpd_mean"] is not None and not fine["errors"]
    assert deep["test_bpd_mean"] is None and "levels = 3 needs image sides divisible" in deep["errors"][0]
    assert "failed: seed 0: Error:" in (out / "report.md").read_text()


def test_an_ablation_killed_mid_run_resumes_finished_and_interrupted_runs(tmp_path):
    # Long enough runs that the kill lands inside one, with a checkpoint every step to resume from.
    path = write(tmp_path, 'set = ["train.checkpoint_every=1"]\n' + _variants(steps=400))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "flowkit", "ablate", str(path), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    first = out / "runs" / "affine-seed0" / "checkpoints" / "latest.json"
    deadline = time.monotonic() + 120
    while not first.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the ablation and its run, as a crash would
    proc.wait()
    assert first.exists() and not (out / "runs" / "affine-seed0" / "summary.json").exists()
    result = flowkit("ablate", str(path), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "run affine-seed0 (resumed)" in result.output
    summaries = [json.loads((out / "runs" / f"{v}-seed0" / "summary.json").read_text()) for v in ("affine", "additive")]
    assert [s["steps"] for s in summaries] == [400, 400]
    # Nothing left to do: a third invocation only writes the report.
    again = flowkit("ablate", str(path), "--out", str(out))
    assert "2 finished, 0 to run" in again.output


def test_the_couplings_smoke_ablation_through_submitit_writes_a_row_per_coupling_and_plots(tmp_path):
    out = tmp_path / "out"
    result = flowkit("ablate", str(ROOT / "recipes" / "ablations" / "couplings.toml"), "--preset", "smoke",
                     "--executor", "slurm", "--cluster", "local", "--out", str(out))
    assert result.exit_code == 0, result.output
    md = (out / "report.md").read_text()
    for coupling in ("affine", "additive", "mixlogistic"):
        assert f"| {coupling} | 7." in md  # a finished row with its bits/dim
    assert len(list((out / "plots").glob("*.png"))) >= 2 and list((out / "submitit").iterdir())


def test_the_slurm_executor_runs_the_jobs_through_submitit(tmp_path):
    path = write(tmp_path, _variants() + '[slurm]\ncluster = "local"\ntimeout_min = 10\n')
    out = tmp_path / "out"
    result = flowkit("ablate", str(path), "--out", str(out), "--executor", "slurm")
    assert result.exit_code == 0, result.output
    assert "submitted as job" in result.output
    assert list((out / "submitit").iterdir())  # submitit's own job folder
    report = json.loads((out / "report.json").read_text())
    assert all(v["test_bpd_mean"] is not None for v in report["variants"])


def test_parallel_jobs_with_a_time_budget_are_flagged_as_unfair(tmp_path):
    path = write(tmp_path, 'budget = { minutes = 0.005 }\n[grid]\n"train.lr" = [1e-3, 2e-3]\n')
    out = tmp_path / "out"
    assert flowkit("ablate", str(path), "--out", str(out), "--jobs", "2").exit_code == 0
    assert (out / "report.md").read_text().startswith("> **Time budgets are unfair here:** 2 runs")


def _run(seed: int, bpd: float, curve: list[tuple[float, float]] = ()) -> RunResult:
    return RunResult("v", seed, Path("."), {"status": "finished", "test_bpd": bpd}, {},
                     [{"train_seconds": t, "images": 0, "bpd": b} for t, b in curve])


def test_paired_difference_against_a_hand_computed_case():
    first = VariantRow("a", [_run(0, 3.0), _run(1, 3.2), _run(2, 3.1)])
    other = VariantRow("b", [_run(0, 2.9), _run(1, 3.0), _run(2, 3.05), _run(7, 1.0)])  # seed 7 is unpaired
    mean, half, n = paired_difference(other, first)
    # Differences -0.1, -0.2, -0.05: mean -0.11667, sd 0.076376, t(0.975, 2) = 4.303.
    assert n == 3 and mean == pytest.approx(-0.116667, abs=1e-6)
    assert half == pytest.approx(4.303 * 0.0763763 / math.sqrt(3), abs=1e-6)
    assert paired_difference(VariantRow("c", [_run(0, 2.5)]), first) == (pytest.approx(-0.5), None, 1)


def test_time_to_a_bits_per_dim_reads_the_mean_curve():
    row = VariantRow("a", [_run(0, 2.0, [(10, 3.0), (20, 2.4), (30, 2.0)]),
                           _run(1, 2.2, [(12, 3.2), (22, 2.8), (32, 2.2)])])
    assert time_to(row, 2.65) == pytest.approx(21.0)  # mean of the second points: 2.6
    assert time_to(row, 1.0) is None


ABLATIONS = sorted((ROOT / "recipes" / "ablations").rglob("*.toml"))


@pytest.mark.parametrize("path", ABLATIONS, ids=[str(p.relative_to(ROOT / "recipes" / "ablations")) for p in ABLATIONS])
def test_every_ablation_file_and_preset_resolves(plugins, path):
    import tomllib

    presets = [None, *tomllib.loads(path.read_text()).get("presets", {})]
    assert "smoke" in presets
    for preset in presets:
        ablation = load_ablation(path, plugins.registries, preset=preset)
        assert ablation.runs and not ablation.duplicates, (path.name, preset)


def test_a_run_folder_holding_another_recipe_is_refused_not_reported(tmp_path):
    out = tmp_path / "out"
    first = write(tmp_path, 'budget = { steps = 1 }\n[[variants]]\nname = "a"\n', "first.toml")
    assert flowkit("ablate", str(first), "--out", str(out)).exit_code == 0
    changed = write(tmp_path, 'budget = { steps = 1 }\nset = ["train.lr=2e-3"]\n[[variants]]\nname = "a"\n', "changed.toml")
    result = subprocess.run([sys.executable, "-m", "flowkit", "ablate", str(changed), "--out", str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "was run with another recipe" in result.stderr and "train.lr" in result.stderr
