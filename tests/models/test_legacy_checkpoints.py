"""Checkpoints written before the layout walker still load, and compute what they computed.

tests/fixtures/legacy_checkpoints/ holds the weights of tiny models saved by the code before
the walker (state_dict keys ``levels.<l>.stages.<s>.steps...``, ``bottom...``, ``top_prior...``;
Flow++'s ``flow.transforms.<k>...``, ``prior...``), as a run's weights.safetensors stores them,
with an input and the log_prob_parts that code computed on it (cases.json).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import flowkit

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "legacy_checkpoints"
CASES = json.loads((FIXTURES / "cases.json").read_text())


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_checkpoint_of_the_structure_before_the_walker_loads_and_gives_the_same_terms(name):
    case = CASES[name]
    model = flowkit.build("model", case["kind"], in_shape=tuple(case["in_shape"]), **case["params"]).double()
    weights = load_file(str(FIXTURES / f"{name}.safetensors"))
    y = weights.pop("input")
    state = {key.removeprefix("model."): value for key, value in weights.items()}
    assert any(k.startswith(("levels.", "decoder.levels.", "flow.transforms.")) for k in state)  # the old keys
    missing, unexpected = model.load_state_dict(state, strict=True)
    assert not missing and not unexpected
    model.eval()
    torch.manual_seed(3)  # the VAE-flow's terms draw z
    parts = model.log_prob_parts(y)
    assert list(parts) == list(case["log_prob_parts"])
    for term, expected in case["log_prob_parts"].items():
        torch.testing.assert_close(parts[term], torch.tensor(expected, dtype=torch.float64), atol=0, rtol=0)


def test_the_current_keys_load_as_they_are():
    case = CASES["multiscale"]
    model = flowkit.build("model", "multiscale", in_shape=tuple(case["in_shape"]), **case["params"])
    other = flowkit.build("model", "multiscale", in_shape=tuple(case["in_shape"]), **case["params"])
    other.load_state_dict(model.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True))
    assert all(key.startswith("flow.") for key in model.state_dict())
