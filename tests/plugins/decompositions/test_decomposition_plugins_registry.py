"""The decomposition plugins load through the ``flowkit`` entry points and build by name."""

from __future__ import annotations

import pytest
import torch

import flowkit
from flowkit.plugins import make_plugins
from flowkit_plugins.decompositions.daubechies import DaubechiesDecomposition
from flowkit_plugins.decompositions.haar import HaarDecomposition
from flowkit_plugins.decompositions.squeeze import SqueezeDecomposition


@pytest.fixture
def plugins(monkeypatch):
    # Only the decomposition plugins: these tests must not depend on other parts.
    monkeypatch.setenv("FLOWKIT_LOAD_PLUGINS", "haar,daubechies,squeeze")
    monkeypatch.delenv("FLOWKIT_DISABLE_PLUGINS", raising=False)
    return make_plugins()


def test_registered_names(plugins):
    assert plugins.registries["decomposition"].names() == [
        "db2", "db3", "db4", "db5", "db6", "db7", "db8", "haar", "squeeze",
    ]


@pytest.mark.parametrize("name", ["haar", "db2", "db8", "squeeze"])
def test_parts_come_from_the_flowkit_distribution(plugins, name):
    part = plugins.registries.part("decomposition", name)
    assert part.distribution == "flowkit"
    assert part.summary


@pytest.mark.parametrize(
    ("name", "cls", "wavelet"),
    [("haar", HaarDecomposition, "haar"), ("db4", DaubechiesDecomposition, "db4"),
     ("db7", DaubechiesDecomposition, "db7"), ("squeeze", SqueezeDecomposition, None)],
)
def test_build_by_name_returns_the_right_class(plugins, name, cls, wavelet):
    decomposition = flowkit.build("decomposition", name, plugins=plugins)
    assert type(decomposition) is cls
    assert isinstance(decomposition, flowkit.Decomposition)
    if wavelet is not None:
        assert decomposition.wavelet == wavelet
    low, detail, logabsdet = decomposition.split(torch.randn(2, 3, 8, 8))
    assert low.shape == (2, 3, 4, 4) and detail.shape == (2, 9, 4, 4) and logabsdet.shape == (2,)


def test_build_rejects_unknown_parameters(plugins):
    with pytest.raises(flowkit.FlowkitError, match="levels"):
        flowkit.build("decomposition", "db4", plugins=plugins, levels=2)
