"""Wavelet Flow's levels trained side by side in threads: the same gradients as the joint loss."""

from __future__ import annotations

import math

import torch

import flowkit
from flowkit.runs.term_threads import TermThreads, balance

TINY = {"levels": 2, "depth": [2], "hidden": [4], "cond_channels": 2, "cond_depth": 1,
        "base_step": {"use": "glow", "coupling": {"use": "affine", "mask": "checkerboard"}}}


def test_balance_puts_the_costliest_terms_apart_and_uses_every_thread() -> None:
    groups = balance({"base": 1.0, "level1": 1.2, "level2": 2.0}, 2)
    assert sorted(map(sorted, groups)) == [["base", "level1"], ["level2"]]
    assert balance({"a": 1.0, "b": 1.0}, 4) == [["a"], ["b"]]  # never more groups than terms
    assert sorted(sum(balance({"a": 3.0, "b": 2.0, "c": 2.0, "d": 1.0}, 3), [])) == ["a", "b", "c", "d"]


def test_threaded_backward_gives_the_gradients_of_the_joint_bits_per_dim_loss() -> None:
    torch.manual_seed(0)
    model = flowkit.build("model", "wavelet_flow", in_shape=(1, 8, 8), **TINY).double()
    y = torch.rand(5, 1, 8, 8, dtype=torch.float64)
    model.initialize(y)
    dims = 64
    loss = -model.log_prob(y).mean() / (dims * math.log(2.0))
    loss.backward()
    joint = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    threads_before = torch.get_num_threads()
    runner = TermThreads(model, 2, lambda terms: -torch.stack(list(terms.values())).sum(0).mean() / (dims * math.log(2.0)))
    terms = runner.backward(y)
    runner.close()
    assert torch.get_num_threads() == threads_before  # restored for the evaluation
    assert list(terms) == ["base", "level1", "level2"]
    assert sorted(map(sorted, runner.groups)) in ([["base", "level1"], ["level2"]], [["base", "level2"], ["level1"]],
                                                  [["base"], ["level1", "level2"]])
    torch.testing.assert_close(torch.stack(list(terms.values())).sum(0), model.log_prob(y).detach())
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, joint[name], rtol=1e-10, atol=1e-12, msg=name)


def test_crop_windows_come_from_each_levels_own_saved_generator() -> None:
    def build() -> torch.nn.Module:
        torch.manual_seed(3)
        return flowkit.build("model", "wavelet_flow", in_shape=(1, 8, 8), **{**TINY, "crops": [1, 1, 2]})

    a, b = build(), build()
    y = torch.rand(2, 1, 8, 8)
    a.train(), b.train()
    assert "crop_rng_level2" in a.state_dict() and "crop_rng_level1" not in a.state_dict()
    # Other levels being evaluated, or the global RNG being used, do not move level 2's windows.
    first = a.log_prob_terms(y, ["level2"])["level2"]
    b.log_prob_terms(y, ["base", "level1"])
    torch.rand(100)
    torch.testing.assert_close(b.log_prob_terms(y, ["level2"])["level2"], first)
    # The state advances: later windows differ from the first (over a few draws at least one does).
    later = [a.log_prob_terms(y, ["level2"])["level2"] for _ in range(6)]
    assert any(not torch.equal(t, first) for t in later)


def test_torch_runs_single_threaded_while_training_and_on_all_cores_for_an_evaluation() -> None:
    model = flowkit.build("model", "wavelet_flow", in_shape=(1, 8, 8), **TINY)
    before = torch.get_num_threads()
    runner = TermThreads(model, 2, lambda terms: -sum(terms.values()).mean())
    try:
        assert torch.get_num_threads() == 1
        with runner.all_cores():
            assert torch.get_num_threads() == before
        assert torch.get_num_threads() == 1
    finally:
        runner.close()
    assert torch.get_num_threads() == before
