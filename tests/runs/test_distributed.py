"""Data parallel training under torchrun: a rank-sharded batch with DDP's all-reduce is the
single-process step on the whole batch; rank 0 alone writes the run directory; a run resumes
with another number of processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from flowkit.errors import FlowkitError, RecipeError
from flowkit.plugins import make_plugins
from flowkit.recipes.load import load_recipe
from flowkit.runs import distributed
from flowkit.runs.checkpoint import latest_checkpoint
from flowkit.runs.distributed import World
from flowkit.runs.objective import Objective
from flowkit.runs.run import start_run
from flowkit.runs.rundir import RunDir
from flowkit.runs.session import build_session
from flowkit.runs.signals import RunInterrupted
from flowkit.runs.trainer import SilentReporter, Trainer

ROOT = Path(__file__).resolve().parents[2]
GLOW = ROOT / "recipes" / "glow.toml"
WAVELET = ROOT / "recipes" / "wavelet_flow_affine.toml"
VENV_BIN = Path(sys.executable).parent
TORCHRUN_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

# (recipe, global batch, train.accumulate, train.level): the whole model, gradient accumulation
# under no_sync, and one Wavelet Flow level alone (the other levels' parameters unused).
CASES = [(GLOW, 8, 1, -1), (GLOW, 8, 2, -1), (WAVELET, 8, 1, 1)]


# -- the world, from torchrun's environment ---------------------------------------------------
def test_world_comes_from_torchruns_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in TORCHRUN_ENV:
        monkeypatch.delenv(key, raising=False)
    assert distributed.world() == World(1, 0, 0) and distributed.is_main()
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.world() == World(4, 3, 1) and not distributed.is_main()
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(FlowkitError, match=r"RANK = 4 must be in \[0, WORLD_SIZE = 4\)"):
        distributed.world()


def test_each_rank_takes_its_slice_of_the_global_batch() -> None:
    indices = torch.tensor([7, 3, 5, 1, 0, 2, 6, 4])
    slices = [distributed.shard(indices, World(4, r, 0)).tolist() for r in range(4)]
    assert slices == [[7, 3], [5, 1], [0, 2], [6, 4]]
    assert distributed.shard(indices, World()).tolist() == indices.tolist()


def test_cuda_becomes_the_local_ranks_device_and_one_named_gpu_is_refused() -> None:
    w = World(2, 1, 1)
    assert distributed.rank_device(torch.device("cuda"), w) == torch.device("cuda", 1)
    assert distributed.rank_device(torch.device("cpu"), w) == torch.device("cpu")
    assert distributed.rank_device(torch.device("cuda", 3), World()) == torch.device("cuda", 3)
    with pytest.raises(FlowkitError, match="cuda:LOCAL_RANK"):
        distributed.rank_device(torch.device("cuda", 0), w)
    # Also on the rank whose LOCAL_RANK the recipe happens to name: every rank refuses alike.
    with pytest.raises(FlowkitError, match="cuda:LOCAL_RANK"):
        distributed.rank_device(torch.device("cuda", 0), World(2, 0, 0))
    assert distributed.backend(torch.device("cuda", 1)) == "nccl" and distributed.backend(torch.device("cpu")) == "gloo"


def test_a_global_batch_that_the_ranks_and_micro_batches_do_not_divide_is_refused() -> None:
    plugins = make_plugins()
    recipe = load_recipe(GLOW, plugins.registries, preset="smoke",
                         overrides=["train.batch_size=6", "train.accumulate=2"])
    distributed.check_world_fit(recipe, World(3, 0, 0))  # 6 = 3 ranks x 2 micro-batches of 1
    with pytest.raises(RecipeError) as raised:
        distributed.check_world_fit(recipe, World(2, 0, 0))
    message = str(raised.value)
    assert "train.batch_size = 6" in message and "train.accumulate = 2" in message and "WORLD_SIZE = 2" in message
    assert "divisible by 2 x 2 = 4" in message


def test_level_threads_with_several_processes_is_refused() -> None:
    plugins = make_plugins()
    recipe = load_recipe(WAVELET, plugins.registries, preset="smoke", overrides=["train.level_threads=2"])
    distributed.check_world_fit(recipe, World())
    with pytest.raises(RecipeError, match="train.level_threads = 2 .* set train.level_threads = 1"):
        distributed.check_world_fit(recipe, World(2, 0, 0))


def test_start_run_leaves_the_process_group_also_when_the_run_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    distributed.shutdown()  # without a group, and twice: nothing to do
    distributed.shutdown()
    left: list[bool] = []
    monkeypatch.setattr(distributed, "shutdown", lambda: left.append(True))
    with pytest.raises(RecipeError, match="train.level = 5"):  # refused in build_session, after init would be
        start_run(GLOW, make_plugins(), SilentReporter(), preset="smoke", overrides=("train.level=5",))
    assert left == [True]


def test_ranks_draw_different_noise_from_a_seed_of_their_own() -> None:
    seeds = {distributed.rank_seed(0, rank, step) for rank in (1, 2, 3) for step in (0, 100)}
    assert len(seeds) == 6 and all(0 <= s < 2**63 for s in seeds)


# -- the same step as one process on the whole batch -----------------------------------------
def fixed_dequantize(self: Objective, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The centre of each bin instead of uniform noise: the ranks' noise differs by design."""
    return (x.float() + 0.5) / 2**self.n_bits, torch.zeros(len(x))


def one_step(recipe_path: Path, batch: int, accumulate: int, level: int, out: Path | None) -> dict:
    """The loss of one training step, as logged, and every parameter's gradient after it."""
    plugins = make_plugins()
    recipe = load_recipe(recipe_path, plugins.registries, preset="smoke", overrides=[
        "train.device=cpu", "train.threads=1", "train.level_threads=1", "train.steps=1", "train.log_every=1",
        f"train.batch_size={batch}", f"train.accumulate={accumulate}", f"train.level={level}"])
    rundir = RunDir.create(recipe.meta.name, out=out) if out is not None else None
    trainer = Trainer(build_session(recipe, plugins), rundir)
    trainer.train()
    if rundir is not None:
        rundir.release()
    return {"loss": trainer.state.recent[-1], "images": trainer.state.images,
            "grads": {n: p.grad.clone() for n, p in trainer.s.model.named_parameters() if p.grad is not None}}


def rank_worker(rank: int, world_size: int, port: int, out: Path) -> None:
    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    Objective.dequantize = fixed_dequantize  # this process only
    try:
        results = [one_step(recipe, batch, accumulate, level, out / f"run{i}" if rank == 0 else None)
                   for i, (recipe, batch, accumulate, level) in enumerate(CASES)]
    finally:
        distributed.shutdown()
    torch.save(results, out / f"rank{rank}.pt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Not slow-marked although it takes ~25 s: it is issue 12's acceptance test, so CI runs it.
def test_two_ranks_with_ddp_take_the_single_process_step_on_the_whole_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    mp.spawn(rank_worker, args=(2, free_port(), tmp_path), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    monkeypatch.setattr(Objective, "dequantize", fixed_dequantize)
    for i, (recipe, batch, accumulate, level) in enumerate(CASES):
        single = one_step(recipe, batch, 1, level, tmp_path / f"single{i}")
        case = f"{recipe.stem}, accumulate {accumulate}, level {level}"
        assert single["grads"], case
        for r, result in enumerate(ranks):
            assert result[i]["images"] == batch, "images count the global batch"
            # The logged loss is the mean over ranks: the whole batch's.
            assert result[i]["loss"] == pytest.approx(single["loss"], rel=1e-6, abs=1e-6), (case, r)
            assert result[i]["grads"].keys() == single["grads"].keys(), (case, r)
            for name, grad in single["grads"].items():
                torch.testing.assert_close(result[i]["grads"][name], grad, rtol=1e-4, atol=1e-6,
                                           msg=lambda m, n=name, c=case, k=r: f"{c}, rank {k}, {n}: {m}")
        # Rank 0's half of the batch alone (the first half of the same permutation) gives another
        # gradient, the one DDP's all-reduce replaces: the comparison above can fail.
        half = one_step(recipe, batch // 2, 1, level, tmp_path / f"half{i}")["grads"]
        assert any(not torch.allclose(single["grads"][n], g, rtol=1e-3, atol=1e-6) for n, g in half.items()), case
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("run")) == ["run0", "run1", "run2"]


class SignalOnRank1(SilentReporter):
    """SIGTERM to rank 1 alone once step 1 is reported (at the flush of step 2, after that step's
    agreement)."""

    def step(self, step: int, metrics: dict[str, float]) -> None:
        if distributed.world().rank == 1 and step == 1:
            os.kill(os.getpid(), signal.SIGTERM)


def stop_worker(rank: int, world_size: int, port: int, out: Path) -> None:
    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    plugins = make_plugins()
    recipe = load_recipe(GLOW, plugins.registries, preset="smoke", overrides=[
        "train.device=cpu", "train.threads=1", "train.steps=8", "train.log_every=2"])
    rundir = RunDir.create(recipe.meta.name, out=out / "run") if rank == 0 else None
    trainer = Trainer(build_session(recipe, plugins), rundir, SignalOnRank1())
    try:
        trainer.train()
        outcome: object = "finished"
    except RunInterrupted as exc:
        outcome = (exc.step, exc.checkpointed)
    finally:
        distributed.shutdown()
    torch.save({"outcome": outcome, "step": trainer.state.step}, out / f"stop{rank}.pt")


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path: Path) -> None:
    mp.spawn(stop_worker, args=(2, free_port(), tmp_path), nprocs=2, join=True)
    # Rank 1's signal came during the flush of step 2: the agreement after step 3, the next one,
    # tells rank 0, not the next flush (step 4): a stop waits for one step, not for a log point.
    for rank in range(2):
        assert torch.load(tmp_path / f"stop{rank}.pt") == {"outcome": (3, True), "step": 3}, rank
    assert json.loads((tmp_path / "run" / "checkpoints" / "latest.json").read_text())["step"] == 3


def resume_worker(rank: int, world_size: int, port: int, out: Path, mode: str) -> None:
    """Glow smoke, 4 steps on 2 ranks: straight through, stopped by a signal after step 3 (rank
    1's, as above), or resumed from that stop's checkpoint."""
    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    plugins = make_plugins()
    recipe = load_recipe(GLOW, plugins.registries, preset="smoke", overrides=[
        "train.device=cpu", "train.threads=1", "train.steps=4", "train.log_every=2"])
    run = out / ("straight" if mode == "straight" else "stopped")
    rundir = RunDir(run) if mode == "resumed" else RunDir.create(recipe.meta.name, out=run) if rank == 0 else None
    trainer = Trainer(build_session(recipe, plugins), rundir, SignalOnRank1() if mode == "stopped" else None)
    try:
        trainer.train(resume=mode == "resumed")
    except RunInterrupted:
        pass
    finally:
        distributed.shutdown()


def test_a_run_resumed_on_two_ranks_takes_the_steps_of_an_uninterrupted_one(tmp_path: Path) -> None:
    """Rank 1's dequantization noise enters the all-reduced gradients; it is seeded by the step,
    so the resumed run's weights equal the uninterrupted run's exactly."""
    for mode in ("straight", "stopped", "resumed"):
        mp.spawn(resume_worker, args=(2, free_port(), tmp_path, mode), nprocs=2, join=True)
    final = {run: load_file(str(latest_checkpoint(tmp_path / run / "checkpoints") / "weights.safetensors"))
             for run in ("straight", "stopped")}
    assert json.loads((tmp_path / "stopped" / "checkpoints" / "latest.json").read_text())["step"] == 4
    assert final["straight"].keys() == final["stopped"].keys()
    for name, value in final["straight"].items():
        assert torch.equal(final["stopped"][name], value), name


class LearningRates(SilentReporter):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def step(self, step: int, metrics: dict[str, float]) -> None:
        self.lrs.append(metrics["lr"])


LOG_EVERY = 500  # far beyond the budget's steps: no flush before the end but the first checkpoint's


def minutes_worker(rank: int, world_size: int, port: int, out: Path) -> None:
    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    plugins = make_plugins()
    recipe = load_recipe(GLOW, plugins.registries, preset="smoke", overrides=[
        "train.device=cpu", "train.threads=1", "train.steps=0", "train.minutes=0.03", f"train.log_every={LOG_EVERY}",
        'train.decay="cosine"', "train.warmup_steps=0"])
    rundir = RunDir.create(recipe.meta.name, out=out / "run") if rank == 0 else None
    reporter = LearningRates()
    trainer = Trainer(build_session(recipe, plugins), rundir, reporter)
    try:
        trainer.train()
    finally:
        distributed.shutdown()
    torch.save({"step": trainer.state.step, "train_seconds": trainer.state.train_seconds, "lrs": reporter.lrs},
               out / f"minutes{rank}.pt")


def test_a_minutes_budget_and_its_learning_rate_follow_rank_0s_clock_after_every_step(tmp_path: Path) -> None:
    mp.spawn(minutes_worker, args=(2, free_port(), tmp_path), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"minutes{rank}.pt") for rank in range(2)]
    # Rank 0's clock, agreed after every step, decides for both: the budget ends training before
    # any log point (a clock agreed at flushes only would run to step LOG_EVERY), ...
    assert ranks[0] == ranks[1] and ranks[0]["train_seconds"] >= 1.8
    assert 2 <= ranks[0]["step"] < LOG_EVERY
    # ... and the cosine over the minutes falls at every step, the same on both ranks (a clock
    # frozen between flushes would give every step of the window the same rate).
    lrs = ranks[0]["lrs"]
    assert len(lrs) == ranks[0]["step"] and all(b < a for a, b in zip(lrs, lrs[1:])), lrs
    assert json.loads((tmp_path / "run" / "checkpoints" / "latest.json").read_text())["step"] == ranks[0]["step"]


# -- torchrun, for real -------------------------------------------------------------------------
def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    return {**env, "OMP_NUM_THREADS": "1"}


def metric_steps(run: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "train_bpd" in r]


# Not slow-marked (~20 s): the documented one-node command line, exercised for real in CI.
def test_torchrun_with_two_ranks_writes_one_run_directory_that_one_process_resumes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    smoke = [str(GLOW), "--preset", "smoke", "--set", "train.threads=1", "--set", "train.log_every=1"]
    result = subprocess.run(
        [str(VENV_BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "flowkit", "run", *smoke,
         "--set", "train.steps=4", "--set", "train.checkpoint_every=2", "--out", str(run)],
        capture_output=True, text=True, cwd=tmp_path, env=cli_env(), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["run"], "rank 1 wrote nothing, not even runs/"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 4 and summary["world_size"] == 2
    assert metric_steps(run) == [1, 2, 3, 4]
    assert result.stdout.count("Training for") == result.stdout.count("Evaluating on") == 1, "rank 0 alone reports"

    # Rank 0's step-2 checkpoint, resumed by one process: it continues at step 3 with the same data order.
    result = subprocess.run(
        [str(VENV_BIN / "flowkit"), "run", "--resume", str(run), "--from-checkpoint", "step-00000002"],
        capture_output=True, text=True, cwd=tmp_path, env=cli_env(), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "at step 2" in result.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 4 and "world_size" not in summary
    assert metric_steps(run) == [1, 2, 3, 4]


# -- labels beside the images under DDP --------------------------------------------------------
LABELLED = ["train.device=cpu", "train.threads=1", "train.steps=2", "train.batch_size=8", "train.accumulate=2",
            "train.log_every=1", "data.labels=true", "train.label_dropout=0.5"]


def labels_seen(out: Path | None) -> list[list[int]]:
    """The labels `Objective.condition` receives while training (gradients on), one list per call."""
    seen: list[list[int]] = []

    def condition(self: Objective, labels: torch.Tensor | None) -> None:
        if torch.is_grad_enabled() and labels is not None:
            seen.append(labels.tolist())

    Objective.condition = condition  # this process only (or undone by the caller)
    plugins = make_plugins()
    recipe = load_recipe(GLOW, plugins.registries, preset="smoke", overrides=LABELLED)
    rundir = RunDir.create(recipe.meta.name, out=out) if out is not None else None
    Trainer(build_session(recipe, plugins), rundir).train()
    if rundir is not None:
        rundir.release()
    return seen


def labels_worker(rank: int, world_size: int, port: int, out: Path) -> None:
    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        seen = labels_seen(out / "run" if rank == 0 else None)
    finally:
        distributed.shutdown()
    torch.save(seen, out / f"labels{rank}.pt")


def test_labels_and_their_dropout_reach_each_ranks_micro_batches_as_in_one_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    mp.spawn(labels_worker, args=(2, free_port(), tmp_path), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"labels{r}.pt") for r in range(2)]
    monkeypatch.setattr(Objective, "condition", Objective.condition)  # labels_seen replaces it: put it back after
    single = labels_seen(tmp_path / "single")
    # One process: per step two micro-batches of 4. Two ranks: per step two micro-batches of 2 each,
    # rank 0 the first half of the global batch, rank 1 the second; label dropout drawn for the whole batch.
    assert [len(s) for s in single] == [4] * 4 and [len(s) for r in ranks for s in r] == [2] * 8
    for step in range(2):
        whole = single[2 * step] + single[2 * step + 1]
        shared = ranks[0][2 * step] + ranks[0][2 * step + 1] + ranks[1][2 * step] + ranks[1][2 * step + 1]
        assert shared == whole, step
    assert any(10 in s for s in single), "label dropout replaced some labels by K = 10"
