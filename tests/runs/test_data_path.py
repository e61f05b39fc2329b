"""The training input path (flowkit.runs.data): per-batch reads and n_bits, prefetch, labels beside
the images through every link, label dropout, exact resume on a store, and anonymous memory that
does not grow with the store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from flowkit.cli import _add_commands, cli
from flowkit.errors import RecipeError
from flowkit.plugins import Plugins, make_plugins
from flowkit.recipes.load import load_recipe
from flowkit.runs.bpd import reduce_bits
from flowkit.runs.data import Prefetch, Split, batches, drop_labels
from flowkit.runs.evaluate import evaluate
from flowkit.runs.objective import Objective
from flowkit.runs.rundir import RunDir
from flowkit.runs.session import build_session
from flowkit.runs.signals import RunInterrupted
from flowkit.runs.trainer import SilentReporter, Trainer

ROOT = Path(__file__).resolve().parents[2]
GLOW = ROOT / "recipes" / "glow.toml"
WAVELET = ROOT / "recipes" / "wavelet_flow_affine.toml"
ONE_THREAD = ["train.device=cpu", "train.threads=1", "train.log_every=1"]
_add_commands()


@pytest.fixture(scope="module")
def plugins() -> Plugins:
    return make_plugins()


# -- the split: per-batch reads ------------------------------------------------------------
@pytest.mark.parametrize(("n_bits", "max_value"), [(8, 255), (5, 255), (3, 255), (1, 255), (4, 16), (8, 16)])
def test_each_batch_is_reduced_as_reduce_bits_reduced_the_whole_set(n_bits: int, max_value: int) -> None:
    images = np.random.default_rng(0).integers(0, max_value + 1, (40, 3, 4, 5), dtype=np.uint8)
    split = Split(images, None, n_bits, max_value)
    whole = reduce_bits(torch.from_numpy(images), n_bits, max_value)
    index = torch.tensor([7, 3, 39, 0, 3])
    assert torch.equal(split[index], whole[index]) and split[index].dtype == torch.uint8
    assert torch.equal(split[5:9], whole[5:9]) and torch.equal(split.all(), whole)


def test_a_grey_batch_has_the_standard_strides_not_channels_last() -> None:
    """numpy gives the channel dimension of size 1 any stride; torch would take the batch for
    channels-last and run convolutions in that layout (other float rounding)."""
    split = Split(np.zeros((9, 28, 28), dtype=np.uint8)[:, None], None, 8)
    for batch in (split[torch.tensor([1, 2])], split[2:5]):
        assert batch.stride() == (784, 784, 28, 1)
        assert batch.float().stride() == (784, 784, 28, 1), "the float copy keeps the standard layout"


def test_a_slice_of_a_read_only_memory_map_is_read_into_a_batch_of_its_own(tmp_path: Path) -> None:
    np.save(tmp_path / "images.npy", np.arange(4 * 12, dtype=np.uint8).reshape(4, 3, 2, 2))
    split = Split(np.load(tmp_path / "images.npy", mmap_mode="r"), None, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns on a tensor over memory it may not write
        batch = split[1:3]
    batch += 1  # the batch is its own: the map is untouched
    assert int(split[1:3].sum()) == int(batch.sum()) - batch.numel()


def test_a_transposed_view_and_labels_are_read_per_batch() -> None:
    nhwc = np.random.default_rng(1).integers(0, 256, (6, 4, 4, 3), dtype=np.uint8)
    split = Split(nhwc.transpose(0, 3, 1, 2), np.arange(6) * 2, 8)
    assert torch.equal(split[[4, 1]], torch.from_numpy(nhwc[[4, 1]].transpose(0, 3, 1, 2).copy()))
    assert split.labels_at(torch.tensor([4, 1])).tolist() == [8, 2]
    head = split.first(2)
    assert len(head) == 2 and head.labels.tolist() == [0, 2] and np.shares_memory(head.images, nhwc)


# -- prefetch --------------------------------------------------------------------------------
def test_prefetch_yields_what_reading_on_the_training_thread_yields() -> None:
    rng = np.random.default_rng(2)
    split = Split(rng.integers(0, 256, (50, 1, 6, 6), dtype=np.uint8), rng.integers(0, 10, 50), 5)
    seen = {}
    for depth in (0, 1, 3):
        with Prefetch(split, batches(50, 8, 3, 4), depth=depth, device=torch.device("cpu")) as data:
            seen[depth] = [(i.tolist(), b.images.clone(), b.labels.clone()) for i, b in islice(data, 20)]
    for depth in (1, 3):
        for (i0, x0, y0), (i1, x1, y1) in zip(seen[0], seen[depth], strict=True):
            assert i0 == i1 and torch.equal(x0, x1) and torch.equal(y0, y1)


def test_an_error_in_the_prefetch_thread_is_raised_on_the_training_thread() -> None:
    def order():  # noqa: ANN202
        yield torch.tensor([0, 1])
        yield torch.tensor([0, 99])  # out of range: the read fails in the thread

    split = Split(np.zeros((4, 1, 2, 2), dtype=np.uint8), None, 8)
    with Prefetch(split, order(), depth=2, device=torch.device("cpu")) as data:
        next(data)
        with pytest.raises(IndexError):
            next(data)


def _trainer(plugins: Plugins, recipe_path: Path, out: Path, overrides: list[str],
             reporter: SilentReporter | None = None, *, resume: bool = False) -> Trainer:
    recipe = load_recipe(recipe_path, plugins.registries, preset="smoke", overrides=[*ONE_THREAD, *overrides])
    if resume:
        rundir = RunDir(out)
    else:
        rundir = RunDir.create(recipe.meta.name, out=out)
        rundir.recipe_path.write_text(recipe.to_toml(), encoding="utf-8")
    return Trainer(build_session(recipe, plugins), rundir, reporter)


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.s.model.state_dict().items()}


def test_training_takes_the_same_steps_with_and_without_prefetch(plugins: Plugins, tmp_path: Path) -> None:
    runs = {}
    for depth in (0, 3):
        trainer = _trainer(plugins, WAVELET, tmp_path / f"p{depth}",
                           ["train.steps=3", "train.level_threads=1", f"train.prefetch={depth}"])
        trainer.train()
        runs[depth] = (_weights(trainer), list(trainer.state.recent))
    assert runs[0][1] == runs[3][1]
    for key, value in runs[0][0].items():
        assert torch.equal(value, runs[3][0][key]), key


# -- labels beside the images ----------------------------------------------------------------
class Recorded:
    """What `Objective.condition` receives while gradients are on (training, not init or eval)."""

    def __init__(self) -> None:
        self.training: list[torch.Tensor] = []
        self.all: list[torch.Tensor | None] = []

    def __call__(self, objective: Objective, labels: torch.Tensor | None) -> None:
        self.all.append(None if labels is None else labels.clone())
        if torch.is_grad_enabled() and labels is not None:
            self.training.append(labels.clone())
        return None


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> Recorded:
    record = Recorded()
    monkeypatch.setattr(Objective, "condition", lambda self, labels: record(self, labels))
    return record


def _batch_labels(trainer: Trainer, steps: int, batch: int) -> list[list[int]]:
    order = batches(len(trainer.s.train_x), batch, trainer.cfg.seed, 0)
    return [trainer.s.train_x.labels_at(next(order)).tolist() for _ in range(steps)]


def test_labels_reach_the_objective_through_the_micro_batches(plugins: Plugins, recorded: Recorded,
                                                               tmp_path: Path) -> None:
    trainer = _trainer(plugins, GLOW, tmp_path / "run", ["train.steps=3", "train.batch_size=8", "train.accumulate=2",
                                                         "data.labels=true"])
    trainer.train()
    assert [len(t) for t in recorded.training] == [4] * 6  # two micro-batches of 4 per step
    steps = [torch.cat(recorded.training[i : i + 2]).tolist() for i in range(0, 6, 2)]
    assert steps == _batch_labels(trainer, 3, 8)
    assert trainer.s.num_classes == 10 and all(0 <= v < 10 for s in steps for v in s)


def test_labels_reach_every_level_thread(plugins: Plugins, recorded: Recorded, tmp_path: Path) -> None:
    trainer = _trainer(plugins, WAVELET, tmp_path / "run", ["train.steps=2", "train.level_threads=2",
                                                            "data.labels=true"])
    trainer.train()
    expected = _batch_labels(trainer, 2, trainer.cfg.batch_size)
    # The plan (one call per level) and each step's thread groups all see the step's labels.
    distinct = []
    for labels in recorded.training:
        if not distinct or distinct[-1] != labels.tolist():
            distinct.append(labels.tolist())
    assert distinct == expected and len(recorded.training) > 2


def test_evaluation_and_a_trained_run_pass_the_labels_on(plugins: Plugins, recorded: Recorded) -> None:
    recipe = load_recipe(GLOW, plugins.registries, preset="smoke", overrides=[*ONE_THREAD, "data.labels=true"])
    session = build_session(recipe, plugins)
    evaluate(session, session.test_x.first(6), session.test_x.first(6).labels, batch_size=4, seed=0)
    assert [t.tolist() for t in recorded.all] == [session.test_x.labels[:4].tolist(), session.test_x.labels[4:6].tolist()]
    recorded.all.clear()
    evaluate(session, session.test_x.first(3), batch_size=4, seed=0)
    assert recorded.all == [None]


def test_data_labels_on_a_dataset_without_labels_exits_2_naming_it() -> None:
    result = CliRunner().invoke(cli, ["run", str(ROOT / "recipes" / "wavelet_flow_256.toml"), "--preset", "smoke",
                                      "--set", "data.labels=true"], catch_exceptions=False)
    message = " ".join(result.output.split())
    assert result.exit_code == 2
    assert 'data.labels = true asks for class labels, but dataset "mnist_mosaic"' in message and "has none" in message


def test_label_dropout_without_labels_is_refused_with_the_recipe(plugins: Plugins) -> None:
    with pytest.raises(RecipeError, match=r"train.label_dropout = 0.2 .* set data.labels = true"):
        load_recipe(GLOW, plugins.registries, preset="smoke", overrides=["train.label_dropout=0.2"])
    with pytest.raises(RecipeError, match=r"label_dropout = 1.5 must be in \[0, 1\]"):
        load_recipe(GLOW, plugins.registries, preset="smoke", overrides=["train.label_dropout=1.5", "data.labels=true"])


def test_label_dropout_is_a_function_of_seed_and_step_whatever_the_shard() -> None:
    labels = torch.arange(64) % 10
    dropped = drop_labels(labels, 0.3, 10, seed=4, step=7)
    assert torch.equal(dropped, drop_labels(labels, 0.3, 10, seed=4, step=7))
    assert not torch.equal(dropped, drop_labels(labels, 0.3, 10, seed=4, step=8))
    assert set(dropped[dropped != labels].tolist()) == {10} and 5 < int((dropped == 10).sum()) < 35
    halves = [drop_labels(labels[:32], 0.3, 10, 4, 7, (0, 64)), drop_labels(labels[32:], 0.3, 10, 4, 7, (32, 64))]
    assert torch.equal(torch.cat(halves), dropped), "a rank's shard draws what the whole batch drew there"
    assert torch.equal(drop_labels(labels, 1.0, 10, 4, 7), torch.full_like(labels, 10))
    assert torch.equal(drop_labels(labels, 0.0, 10, 4, 7), labels)


class SignalAfter(SilentReporter):
    def __init__(self, at: int) -> None:
        self.at = at

    def step(self, step: int, metrics: dict[str, float]) -> None:
        if step == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


def _store(tmp_path: Path) -> Path:
    """A small labelled store of MNIST digits, through `flowkit data prepare`."""
    from flowkit_plugins.datasets._prepare import Options, open_source, prepare

    with np.load(ROOT / "plugins" / "datasets" / "data" / "mnist.npz") as archive:
        np.savez(tmp_path / "digits.npz", x_train=archive["x_train"][:96], y_train=archive["y_train"][:96],
                 x_test=archive["x_test"][:32], y_test=archive["y_test"][:32])
    prepare(open_source(tmp_path / "digits.npz", "auto", Options(labels=True, chunk_images=40)), tmp_path / "store")
    return tmp_path / "store"


def test_resume_on_a_store_with_label_dropout_is_exact(plugins: Plugins, recorded: Recorded, tmp_path: Path) -> None:
    store = _store(tmp_path)
    overrides = ["train.steps=4", "train.level_threads=1", "data.use=store", f"data.path={json.dumps(str(store))}",
                 "data.labels=true", "train.label_dropout=0.5", "data.n_bits=5"]
    straight = _trainer(plugins, WAVELET, tmp_path / "straight", overrides)
    straight.train()
    straight_labels = [t.tolist() for t in recorded.training]
    recorded.training.clear()
    stopped = _trainer(plugins, WAVELET, tmp_path / "stopped", overrides, SignalAfter(2))
    with pytest.raises(RunInterrupted):
        stopped.train()
    resumed = _trainer(plugins, WAVELET, tmp_path / "stopped", overrides, resume=True)
    resumed.train(resume=True)
    assert [t.tolist() for t in recorded.training] == straight_labels
    assert any(10 in step for step in straight_labels), "some labels were dropped to 'no class' (K = 10)"
    assert straight.state.recent == stopped.state.recent[:2] + resumed.state.recent[2:]
    for key, value in _weights(straight).items():
        assert torch.equal(value, _weights(resumed)[key]), key


# -- anonymous memory does not grow with the store -------------------------------------------
RSS_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from flowkit.plugins import make_plugins
    from flowkit.recipes.load import load_recipe
    from flowkit.runs.rundir import RunDir
    from flowkit.runs.session import build_session
    from flowkit.runs.trainer import Trainer

    def status():
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        return {k: int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile")}

    store, out = sys.argv[1], Path(sys.argv[2])
    plugins = make_plugins()
    recipe = load_recipe(sys.argv[3], plugins.registries, preset="smoke", overrides=[
        "train.device=cpu", "train.threads=1", "train.steps=8", "train.batch_size=16", "train.init_batch_size=16",
        "data.use=store", f"data.path={json.dumps(store)}", "data.n_bits=5"])
    trainer = Trainer(build_session(recipe, plugins), RunDir.create("rss", out=out))
    trainer.train()
    print(json.dumps(status()))
""")


def _sparse_store(folder: Path, count: int, shape: tuple[int, int, int]) -> int:
    """A store of ``count`` black images written as a sparse file (nothing on disk but the index),
    its index built by hand with the checksums of zero chunks. Returns the images' bytes."""
    from flowkit_plugins.datasets._store import chunk_sha256

    folder.mkdir()
    chunk = 4096
    zero = chunk_sha256(np.zeros((chunk, *shape), np.uint8), None)
    splits = {}
    for split, n in (("train", count), ("test", 64)):
        np.lib.format.open_memmap(folder / f"{split}_images.npy", mode="w+", dtype=np.uint8, shape=(n, *shape)).flush()
        chunks = [{"start": s, "count": min(chunk, n - s),
                   "sha256": zero if n - s >= chunk else chunk_sha256(np.zeros((n - s, *shape), np.uint8), None)}
                  for s in range(0, n, chunk)]
        splits[split] = {"count": n, "images": f"{split}_images.npy", "labels": None, "chunks": chunks}
    index = {"format": "flowkit-store", "version": 1, "complete": True, "shape": list(shape), "mode": "RGB",
             "max_value": 255, "classes": [], "source": "sparse", "source_format": "npz", "notes": [], "size": 0,
             "fingerprint": "", "chunk_images": chunk, "splits": splits}
    (folder / "index.json").write_text(json.dumps(index))
    return count * int(np.prod(shape))


def test_anonymous_memory_does_not_grow_with_the_store(tmp_path: Path) -> None:
    shape = (3, 32, 32)
    sizes = {}
    for name, count in (("small", 1_000), ("large", 400_000)):
        sizes[name] = _sparse_store(tmp_path / name, count, shape)
    assert sizes["large"] > 1.2e9  # 1.2 GB of images (5 bits: once 8x that as int64), none of it on disk
    rss = {}
    for name in sizes:
        out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(tmp_path / name), str(tmp_path / f"run-{name}"),
                              str(GLOW)], capture_output=True, text=True, timeout=300, check=True)
        rss[name] = json.loads(out.stdout.strip().splitlines()[-1])
    grown = rss["large"]["RssAnon"] - rss["small"]["RssAnon"]
    # What grows with N is the epoch's permutation, 4 bytes per image (1.6 MB here).
    assert grown < 24e6, (rss, sizes)
