"""Each `paper` preset, at full model size, trains one step on the CPU on a few synthetic images.

Only the data and the run's length change (the model, optimiser and evaluation kinds are the
preset's), so the whole pipeline of the paper configuration is exercised: Wavelet Flow at 64x64
with its 7 flows, Glow with gradient accumulation and shift augmentation, Flow++ with its
data-dependent init, global clipping, EMA and importance-weighted evaluation, MaCow with its
split flows and exponential decay, RealNVP with its global clipping, TarFlow (460M parameters) and Jet
(207M) with AdamW, cosine decay and, for Jet, global clipping. Slow: the models have 20M to 460M
parameters.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from flowkit.plugins import Plugins
from flowkit.runs.run import start_run
from flowkit.runs.trainer import SilentReporter

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
CASES = {  # recipe: (image side, overrides of the run's length that keep the preset's kind of training)
    "wavelet_flow_affine": (64, ["train.batch_size=8", "train.init_batch_size=8"]),
    "glow": (32, ["train.batch_size=8", "train.accumulate=8", "train.init_batch_size=4"]),
    "flowpp": (32, ["train.batch_size=2", "train.init_batch_size=4", "eval.iw_samples=2"]),
    "macow": (32, ["train.batch_size=2", "train.init_batch_size=4", "eval.iw_samples=2"]),
    "realnvp": (32, ["train.batch_size=2", "train.init_batch_size=4"]),
    # 460M and 207M parameters: AdamW's state alone is 7.4 GB and 3.3 GB in float32.
    "tarflow": (64, ["train.batch_size=2", "train.warmup_steps=1"]),
    "jet": (64, ["train.batch_size=2", "train.warmup_steps=1"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(CASES))
def test_paper_preset_trains_one_step_on_tiny_data(recipe: str, plugins: Plugins, tmp_path: Path) -> None:
    side, overrides = CASES[recipe]
    rng = np.random.default_rng(0)
    data = tmp_path / "tiny.npz"
    np.savez(data, x_train=rng.integers(0, 256, (8, side, side, 3), dtype=np.uint8),
             x_test=rng.integers(0, 256, (2, side, side, 3), dtype=np.uint8))
    _, summary = start_run(RECIPES / f"{recipe}.toml", plugins, SilentReporter(), preset="paper", out=tmp_path / "run",
                           overrides=("data.use=npz", f"data.path={data}", "train.steps=1", "train.device=cpu",
                                      "train.eval_batch_size=2", "sample.temperatures=[]", *overrides))
    assert summary["status"] == "finished" and summary["steps"] == 1
    assert math.isfinite(summary["test_bpd"]), summary
    if "eval.iw_samples=2" in overrides:
        assert math.isfinite(summary["test_bpd_iw"]) and summary["iw_samples"] == 2
