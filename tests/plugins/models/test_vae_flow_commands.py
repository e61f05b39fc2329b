"""``flowkit swap`` and ``flowkit interpolate`` (commands of the vae_flow plugin) on a smoke run,
and the grids they are made of: an image recombined from its own two latents is the image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import flowkit
from flowkit.cli import _add_commands, cli
from flowkit.runs.images import to_uint8
from flowkit.testing import randomize_
from flowkit_plugins.models._vae_grids import interpolation_tiles, swap_tiles

ROOT = Path(__file__).resolve().parents[3]
RECIPE = ROOT / "recipes" / "vae_flow.toml"
_add_commands()


def flowkit_cli(*args: str):  # noqa: ANN201 - click Result
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vae") / "run"
    result = flowkit_cli("run", str(RECIPE), "--preset", "smoke", "--out", str(out))
    assert result.exit_code == 0, result.output
    return out


def test_smoke_run_reports_finite_bits_per_dim_of_the_elbo(smoke_run: Path) -> None:
    summary = json.loads((smoke_run / "summary.json").read_text())
    assert np.isfinite(summary["test_bpd"]) and summary["steps"] == 4
    assert summary["density"].startswith("evidence lower bound (ELBO)")
    assert set(summary["test_bpd_share_per_part"]) == {"level1", "top", "kl"}


def test_swap_writes_one_grid_per_temperature(smoke_run: Path) -> None:
    result = flowkit_cli("swap", str(smoke_run), "--images", "3", "--temperature", "0", "--temperature", "0.5")
    assert result.exit_code == 0, result.output
    for name in ("swap-T0.png", "swap-T0.5.png"):
        image = np.asarray(Image.open(smoke_run / "samples" / name))
        # 4 x 4 tiles of 28 x 28 with 2-pixel gaps, scaled by 96 // 28 = 3
        assert image.shape[:2] == (3 * (4 * 30 + 2), 3 * (4 * 30 + 2))


def test_interpolate_writes_both_grids(smoke_run: Path) -> None:
    result = flowkit_cli("interpolate", str(smoke_run), "--pairs", "2", "--steps", "3")
    assert result.exit_code == 0, result.output
    for name in ("interpolate-z-T0.png", "interpolate-local-T0.png"):
        image = np.asarray(Image.open(smoke_run / "samples" / name))
        assert image.shape[:2] == (3 * (2 * 30 + 2), 3 * (5 * 30 + 2))  # 2 rows of a, 3 points, b


def test_commands_refuse_bad_input_with_one_paragraph(smoke_run: Path, tmp_path: Path) -> None:
    too_many = flowkit_cli("swap", str(smoke_run), "--images", "1000")
    assert too_many.exit_code == 2 and "--images 1000 is out of range" in too_many.output
    negative = flowkit_cli("swap", str(smoke_run), "--temperature", "-1")
    # The shared sampling options refuse it before the command runs, naming the option and the range.
    assert negative.exit_code == 2 and "--temperature" in negative.output and "x>=0.0" in negative.output
    few = flowkit_cli("interpolate", str(smoke_run), "--steps", "1")
    assert few.exit_code == 2 and "--steps 1" in few.output
    alone = tmp_path / "decoder-alone"  # latent_dim = 0: the decoder alone, a multiscale model without z
    run = flowkit_cli("run", str(RECIPE), "--preset", "smoke", "--set", "model.latent_dim=0", "--out", str(alone))
    assert run.exit_code == 0, run.output
    assert json.loads((alone / "summary.json").read_text())["density"].startswith("dequantized bound")
    wrong = flowkit_cli("swap", str(alone))
    assert wrong.exit_code == 2 and "without a global latent" in wrong.output


def _model() -> torch.nn.Module:
    model = flowkit.build("model", "vae_flow", in_shape=(1, 8, 8), latent_dim=3, encoder_hidden=[4],
                          prior="gaussian", decoder={"use": "multiscale", "levels": 2, "depth": 2}).double()
    x = torch.randint(0, 32, (16, 1, 8, 8)).double()
    model.initialize((x + 0.5) / 32)
    return randomize_(model, 0.1).eval()


def test_swap_with_the_same_image_on_both_axes_reproduces_it_within_rounding() -> None:
    model = _model()
    y = (torch.randint(0, 32, (4, 1, 8, 8)).double() + 0.5) / 32
    for temperature in (0.0, 1.0):
        tiles = swap_tiles(model, y, temperature).view(5, 5, 1, 8, 8)
        diagonal = torch.stack([tiles[i + 1, i + 1] for i in range(4)])
        assert np.array_equal(to_uint8(diagonal, 5), to_uint8(y, 5))
        assert np.array_equal(to_uint8(tiles[0, 1:], 5), to_uint8(y, 5))   # the header row: the images
        assert np.array_equal(to_uint8(tiles[1:, 0], 5), to_uint8(y, 5))   # the header column
        off_diagonal = tiles[1, 2] - tiles[2, 2]  # image 1's local latent with z of image 0 vs its own
        assert off_diagonal.abs().max() > 1e-6


def test_interpolations_start_at_the_first_image_and_hold_one_latent() -> None:
    model = _model()
    ya = (torch.randint(0, 32, (2, 1, 8, 8)).double() + 0.5) / 32
    yb = (torch.randint(0, 32, (2, 1, 8, 8)).double() + 0.5) / 32
    z_tiles, local_tiles = interpolation_tiles(model, ya, yb, 4, 0.0)
    z_tiles, local_tiles = z_tiles.view(2, 6, 1, 8, 8), local_tiles.view(2, 6, 1, 8, 8)
    for tiles in (z_tiles, local_tiles):
        torch.testing.assert_close(tiles[:, 0], ya)           # the row's first image
        torch.testing.assert_close(tiles[:, 1], ya, atol=1e-9, rtol=1e-9)  # t = 0: a from its own latents
        torch.testing.assert_close(tiles[:, 5], yb)           # the row's last image
    # t = 1: a's local latent with b's z, and b's local latent with a's z.
    za, zb = model.encode_global(ya), model.encode_global(yb)
    torch.testing.assert_close(z_tiles[:, 4], model.decode(model.encode_local(ya, za), zb))
    torch.testing.assert_close(local_tiles[:, 4], model.decode(model.encode_local(yb, zb), za))


def test_swap_and_interpolate_take_the_shared_sampling_options_without_mcmc(smoke_run: Path) -> None:
    """--n (alias --images / --pairs), --temperature and --seed as in flowkit sample; no --mcmc:
    z is drawn from q(z | x), not from the model's latent density."""
    by_n = flowkit_cli("swap", str(smoke_run), "--n", "2", "--temperature", "0.5", "--seed", "3")
    assert by_n.exit_code == 0 and "swap-T0.5.png" in by_n.output
    for command in ("swap", "interpolate"):
        refused = flowkit_cli(command, str(smoke_run), "--mcmc")
        assert refused.exit_code == 2 and "No such option '--mcmc'" in refused.output
