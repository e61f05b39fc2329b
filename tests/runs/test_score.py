"""flowkit score and run.score: per-image scores, the compressor, AUROC against a hand-computed case."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import flowkit
from flowkit.cli import _add_commands, cli
from flowkit.errors import FlowkitError
from flowkit.runs.score import auroc, compressed_bits_per_dim, read_images

ROOT = Path(__file__).resolve().parents[2]
_add_commands()


def test_auroc_against_a_hand_computed_case() -> None:
    # Pairs (pos, neg): 3 > 1, 3 > 2, 3 > 2, 2 = 2 (1/2), 2 = 2 (1/2), 2 > 1, 0 < all: 5 of 9 pairs win.
    negatives, positives = np.array([1.0, 2.0, 2.0]), np.array([3.0, 2.0, 0.0])
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    assert wins == 5.0
    assert auroc(negatives, positives) == pytest.approx(5.0 / 9.0, abs=1e-12)
    assert auroc([0.0, 1.0], [2.0, 3.0]) == 1.0 and auroc([2.0, 3.0], [0.0, 1.0]) == 0.0
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=200), rng.normal(size=300) + 0.5
    brute = np.mean([(q > p) + 0.5 * (q == p) for p in a for q in b])
    assert auroc(a, b) == pytest.approx(brute, abs=1e-12)
    with pytest.raises(FlowkitError, match="not finite"):
        auroc([1.0, np.inf], [0.0])


def test_a_constant_image_compresses_to_far_less_than_noise() -> None:
    flat = np.full((2, 1, 28, 28), 7, dtype=np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    for compressor in ("png", "jpeg2000"):
        # A file's headers (~80 bytes for PNG, ~230 for JPEG 2000) are most of a constant image's cost; noise does not compress.
        assert compressed_bits_per_dim(flat, compressor).max() < 3.0
        assert compressed_bits_per_dim(noise, compressor).min() > 7.0
    with pytest.raises(FlowkitError, match="not known; allowed: png, jpeg2000"):
        compressed_bits_per_dim(flat, "zip")


def test_images_are_read_from_npz_or_a_folder_and_a_wrong_shape_is_refused(tmp_path: Path) -> None:
    from PIL import Image

    images = np.random.default_rng(1).integers(0, 256, (3, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", x_test=images)
    (tmp_path / "pngs").mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / "pngs" / f"{i}.png")
    from_npz = read_images(tmp_path / "a.npz", (1, 8, 8), 8)
    assert from_npz.dtype == torch.uint8 and from_npz.shape == (3, 1, 8, 8)
    torch.testing.assert_close(read_images(tmp_path / "pngs", (1, 8, 8), 8), from_npz)
    assert int(read_images(tmp_path / "a.npz", (1, 8, 8), 5).max()) < 32  # reduced as training reduces
    with pytest.raises(FlowkitError, match=r"images of shape \(1, 8, 8\), but the run models \(3, 8, 8\)"):
        read_images(tmp_path / "a.npz", (3, 8, 8), 8)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("score") / "run"
    flowkit.train(ROOT / "recipes" / "wavelet_flow_affine.toml", preset="smoke", out=out,
                  overrides={"train.threads": 1})
    return out


def test_score_writes_per_image_scores_and_separates_noise_from_digits(run_dir: Path, tmp_path: Path) -> None:
    noise = np.random.default_rng(2).integers(0, 256, (40, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "noise.npz", x=noise)
    out = tmp_path / "scores.csv"
    result = CliRunner().invoke(cli, ["score", str(run_dir), "test", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    run = flowkit.load_run(run_dir)
    assert len(rows) == len(run.test_x)
    assert {"bpd", "bpd/base", "bpd/level1", "complexity", "input_complexity"} <= set(rows[0])
    np.testing.assert_allclose([float(r["bpd"]) for r in rows], run.bpd(run.test_x).numpy(), atol=1e-6)
    result = CliRunner().invoke(cli, ["score", str(run_dir), "test", "--out", str(out), "--against",
                                      str(tmp_path / "noise.npz"), "--reference", str(run_dir), "--json"],
                                catch_exceptions=False)
    report = json.loads(result.output[result.output.index("{"):])
    # Uniform noise is far from digits by any score; against itself the likelihood ratio is 0 everywhere.
    assert report["auroc"]["bpd"] > 0.95 and report["auroc"]["complexity"] > 0.95
    assert report["auroc"]["likelihood_ratio"] == 0.5
    scores = run.score(torch.from_numpy(noise[:5, None]))
    assert set(scores) >= {"bpd", "complexity", "input_complexity"} and len(scores["bpd"]) == 5
