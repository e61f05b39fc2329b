"""`flowkit bench`: the side-by-side table against a model's reference implementation, the
refusals, and the timing loop's alternation. Speeds are printed, never asserted. (That the
nflows composition is the same model: tests/plugins/models/test_multiscale_nflows.py.)"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from flowkit.bench.harness import flowkit_contender, prepared
from flowkit.bench.side_by_side import run_bench
from flowkit.bench.timing import Contender, measure, saved_for_backward
from flowkit.cli import _add_commands, cli
from flowkit.errors import FlowkitError, RecipeError
from flowkit.plugins import Plugins

ROOT = Path(__file__).resolve().parents[2]
GLOW = ROOT / "recipes" / "glow.toml"
_add_commands()
FAST = ("--rounds", "1", "--steps", "1", "--set", "train.threads=1")


def flowkit(*args: str):  # noqa: ANN201 - click Result
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_bench_against_nflows_prints_one_side_by_side_table() -> None:
    result = flowkit("bench", str(GLOW), "--preset", "smoke", "--against", "nflows", *FAST)
    assert result.exit_code == 0, result.output
    for text in ("flowkit / nflows", "train images/s, best of 1", "eval images/s", "sampling images/s",
                 "activations saved for backward", "dtype (train.amp)", "compile", "threads",
                 "log-likelihoods agree"):
        assert text in result.output, text


def test_bench_json_on_synthetic_images_of_a_given_shape() -> None:
    result = flowkit("bench", str(GLOW), "--preset", "smoke", "--shape", "3,16,16", "--batch", "4", "--json", *FAST)
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output)
    assert figures["shape"] == [3, 16, 16] and figures["likelihood_check"] is None
    (ours,) = figures["implementations"]
    assert ours["name"] == "flowkit" and ours["batch"] == 4 and ours["device"] == "cpu"
    assert len(ours["train_round_seconds"]) == 1 and ours["train_images_per_s"] > 0
    assert ours["saved_for_backward_bytes"] > 0 and ours["peak_memory_bytes"] is None


def test_against_nflows_refuses_a_recipe_that_is_not_a_multiscale_glow(plugins: Plugins) -> None:
    wavelet = ROOT / "recipes" / "wavelet_flow_affine.toml"
    result = flowkit("bench", str(wavelet), "--preset", "smoke", "--against", "nflows", *FAST)
    assert result.exit_code == 2
    assert 'model.use = "wavelet_flow" offers no reference "nflows"' in result.output, result.output
    assert "--against nflows" in result.output
    with pytest.raises(RecipeError, match=r"invconv = \"plain\".*\n.*edge_bias"):
        run_bench(GLOW, plugins, preset="paper", against="nflows", shape=(3, 32, 32))
    flowpp_dequantizer = ["dequantizer.use=\"variational\"", "dequantizer.steps=1", "dequantizer.context_blocks=1"]
    with pytest.raises(RecipeError, match='the reference dequantizes uniformly; dequantizer.use = "variational"'):
        run_bench(GLOW, plugins, preset="smoke", against="nflows", overrides=flowpp_dequantizer, rounds=1, steps=1)


def test_synthetic_shape_replaces_the_dataset_and_refuses_two_channels(plugins: Plugins) -> None:
    with prepared(GLOW, plugins, preset="smoke", shape=(3, 8, 8), batch=5, overrides=["model.levels=1"]) as prep:
        assert prep.shape == (3, 8, 8) and prep.session.dataset.name == "synthetic"
        assert all(b.shape == (5, 3, 8, 8) and b.dtype == torch.uint8 for b in prep.batches)
    with pytest.raises(FlowkitError, match="1, 3 or 4 channels"), \
            prepared(GLOW, plugins, preset="smoke", shape=(2, 8, 8)):
        pass


def test_rounds_alternate_between_contenders() -> None:
    calls: list[str] = []
    weight = torch.nn.Parameter(torch.ones(3))

    def contender(name: str) -> Contender:
        def loss(x: torch.Tensor) -> torch.Tensor:
            return (weight * x.float()).exp().sum()

        def step(x: torch.Tensor) -> None:
            calls.append(name)
            loss(x).backward()

        return Contender(name, step, lambda x: x.float().sum(), lambda n: torch.zeros(n), [torch.nn.Linear(1, 1)],
                         train_loss=loss)

    batches = [torch.ones(2, 3, dtype=torch.uint8)]
    a, b = measure([contender("a"), contender("b")], batches, rounds=3, steps=2)
    # a warm-up step each (the memory figure takes the loss alone), then rounds of two steps, a, b, a, b, a, b
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 3
    assert len(a.train_seconds) == len(b.eval_seconds) == len(a.sample_seconds) == 3
    # mul saves x.float() for the weight's gradient and exp its result, 2 x 3 float32 each; never the weight
    assert a.saved_bytes == 2 * (2 * 3 * 4)
    assert saved_for_backward(lambda: (weight * 2).sum(), []) == 0  # only the parameter is saved


def test_saved_for_backward_counts_the_forward_so_recompute_is_flat_in_depth(plugins: Plugins) -> None:
    """Under train.memory = "recompute" the backward saves each flow step's activations again, one
    step at a time, freed at once: counted too, they would grow with depth as if all were held."""
    saved = {}
    for memory in ("store", "recompute"):
        for depth in (1, 3):
            with prepared(GLOW, plugins, preset="smoke", shape=(3, 8, 8), batch=4, overrides=[
                    "model.levels=1", f"model.depth={depth}", f"train.memory={memory}", "train.threads=1"]) as prep:
                ours = flowkit_contender(prep)
                saved[memory, depth] = saved_for_backward(lambda: ours.train_loss(prep.batches[0]), ours.modules)
                assert all(p.grad is not None for p in ours.modules[0].parameters()), "the backward ran"
    assert saved["recompute", 1] == saved["recompute", 3], saved
    assert saved["store", 3] > saved["store", 1] > saved["recompute", 1], saved


def _gpu_suite():  # noqa: ANN202 - the benchmarks/gpu_suite.py module
    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "benchmarks" / "gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_gpu_suite_plans_every_figure_of_the_issue() -> None:
    suite = _gpu_suite()
    rows, _ = suite.plan(tiny=False, device="cuda", with_compile=True)
    eager = {(r.model, r.batch, r.precision) for r in rows if r.level is None and not r.compiled}
    assert eager == {(m, b, p) for m in ("glow", "flowpp") for b in (64, 256) for p in ("fp32", "tf32", "bf16")}
    assert [r.level for r in rows if r.model == "wavelet_flow"] == list(range(7))  # paper: 6 levels and the base
    assert {r.model for r in rows if r.check_syncs} == {"glow", "flowpp", "wavelet_flow"}
    # Flow++'s <= 12 GiB at batch 64: the rows that rebuild activations in backward.
    assert {(r.model, r.batch, r.precision) for r in rows if r.memory == "recompute"} == {
        ("flowpp", 64, "tf32"), ("flowpp", 64, "bf16")}


def test_gpu_suite_row_runs_on_cpu_and_reports_out_of_memory(plugins: Plugins,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    suite = _gpu_suite()
    settings = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    row = suite.run_row(suite.Row("glow", 2, "fp32", check_syncs=True), plugins, "cpu", tiny=True, seconds=0.1)
    assert row.status == "ok", row.status
    # The row's TF32 setting ("ieee" for fp32) was the row's only: the process's are back, and torch's
    # older flags, which raise while the newer ones disagree, read again.
    assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == settings
    assert isinstance(torch.backends.cudnn.allow_tf32, bool)
    assert row.images_per_s > 0 and row.steps >= 3 and row.memory_bytes > 0
    assert row.memory_kind == "saved for backward" and row.host_syncs == "n/a (CPU)"

    def out_of_memory(*args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr("flowkit.bench.timing.train_images_per_s", out_of_memory)
    assert suite.run_row(suite.Row("glow", 2, "fp32"), plugins, "cpu", tiny=True, seconds=0.1).status == "OOM"


@pytest.mark.slow
def test_gpu_suite_tiny_runs_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "suite.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--device", "cpu", "--tiny",
                           "--json", str(out)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["model"] for r in rows} == {"glow", "flowpp", "wavelet_flow"}
    assert all(r["status"] == "ok" for r in rows), [(r["model"], r["status"]) for r in rows if r["status"] != "ok"]
