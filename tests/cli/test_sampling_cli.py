"""The shared sampling options, and ``flowkit sample --mcmc`` / ``flowkit superres --mcmc`` on
smoke runs of wavelet_flow and glow."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from flowkit.cli import _add_commands, cli
from flowkit.cli.sampling_options import SamplingOptions, sampling_options
from flowkit.runs.mcmc import MCMCSettings

ROOT = Path(__file__).resolve().parents[2]
TINY_MCMC = ["--mcmc", "--mcmc-warmup", "2", "--mcmc-samples", "2", "--mcmc-max-depth", "3"]
_add_commands()


def flowkit(*args: str):  # noqa: ANN201 - click Result
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def wavelet_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mcmc") / "wavelet_flow"
    result = flowkit("run", str(ROOT / "recipes" / "wavelet_flow_affine.toml"), "--preset", "smoke", "--out", str(out))
    assert result.exit_code == 0, result.output
    return out


def probe(**decorator_args: object) -> click.Command:
    @click.command()
    @sampling_options(**decorator_args)
    def command(sampling: SamplingOptions) -> None:
        click.echo(repr(sampling))

    return command


def parsed(command: click.Command, *args: str) -> SamplingOptions:
    result = CliRunner().invoke(command, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return eval(result.output, {"SamplingOptions": SamplingOptions, "MCMCSettings": MCMCSettings})  # noqa: S307


def test_sampling_options_give_one_record_with_the_commands_defaults() -> None:
    assert parsed(probe()) == SamplingOptions(n=64, temperatures=(), seed=None, mcmc=None)
    command = probe(n=4, n_aliases=("--samples",), temperatures=(0.8,), seed=0)
    assert parsed(command) == SamplingOptions(n=4, temperatures=(0.8,), seed=0, mcmc=None)
    assert parsed(command, "--samples", "3", "--temperature", "1", "--temperature", "0.5", "--seed", "9") == \
        SamplingOptions(n=3, temperatures=(1.0, 0.5), seed=9, mcmc=None)
    assert parsed(command, "--mcmc").mcmc == MCMCSettings(warmup=10, samples=30, step=0.01, max_depth=10)
    assert parsed(command, "--mcmc", "--mcmc-step", "0.1", "--mcmc-max-depth", "4").mcmc == \
        MCMCSettings(step=0.1, max_depth=4)


def test_mcmc_options_without_mcmc_and_bad_values_are_refused() -> None:
    result = CliRunner().invoke(probe(), ["--mcmc-warmup", "3"])
    assert result.exit_code == 2 and "--mcmc-warmup only apply with --mcmc" in result.output
    result = CliRunner().invoke(probe(), ["--mcmc", "--mcmc-samples", "0"])
    assert result.exit_code == 2 and "--mcmc-samples" in result.output


def test_sample_mcmc_writes_a_grid_and_reports_each_level(wavelet_run: Path) -> None:
    result = flowkit("sample", str(wavelet_run), "--n", "2", "--temperature", "0.9", *TINY_MCMC)
    assert result.exit_code == 0, result.output
    samples = wavelet_run / "samples"
    assert (samples / "sample-mcmc-T0.9.png").is_file() and (samples / "sample-mcmc-T0.9.npy").is_file()
    report = json.loads((samples / "sample-mcmc-T0.9.json").read_text())
    assert [level["level"] for level in report["levels"]] == ["base", "level1", "level2"]
    assert report["settings"] == {"warmup": 2, "samples": 2, "step": 0.01, "max_depth": 3, "target_accept_prob": 0.6}
    assert report["gamma"] == pytest.approx(1 / 0.81) and report["n"] == 2
    for level in report["levels"]:
        assert 0 <= level["accept_prob"] <= 1 and level["step_size"] > 0 and level["gradient_evals"] >= 4
        line = next(line for line in result.output.splitlines() if f"T0.9 {level['level']}: step size" in line)
        assert f"step size {level['step_size']:.3g}" in line and f"acceptance {level['accept_prob']:.2f}" in line


def test_superres_mcmc_samples_only_the_levels_above_the_given_one(wavelet_run: Path) -> None:
    result = flowkit("superres", str(wavelet_run), "--from-level", "1", "--images", "2", "--samples", "2",
                     "--temperature", "0.8", *TINY_MCMC)
    assert result.exit_code == 0, result.output
    samples = wavelet_run / "samples"
    assert (samples / "superres-from-level1-mcmc-T0.8.png").is_file()
    report = json.loads((samples / "superres-from-level1-mcmc-T0.8.json").read_text())
    assert [level["level"] for level in report["levels"]] == ["level2"] and report["from_level"] == 1
    assert "level2: step size" in result.output


def test_mcmc_at_temperature_zero_is_a_clean_error(wavelet_run: Path) -> None:
    result = flowkit("sample", str(wavelet_run), "--n", "2", "--temperature", "0", *TINY_MCMC)
    assert result.exit_code == 2 and "temperatures > 0" in result.output and "Traceback" not in result.output


def test_sample_mcmc_works_on_a_glow_run(tmp_path: Path) -> None:
    out = tmp_path / "glow"
    assert flowkit("run", str(ROOT / "recipes" / "glow.toml"), "--preset", "smoke", "--out", str(out)).exit_code == 0
    result = flowkit("sample", str(out), "--n", "2", "--temperature", "0.9", *TINY_MCMC)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "samples" / "sample-mcmc-T0.9.json").read_text())
    assert [level["level"] for level in report["levels"]] == ["latent"] and report["levels"][0]["dims"] == 784
