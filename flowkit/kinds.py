"""What a kind of part is, in one table: its register hook, its contract, where recipes hold
it, what its factory takes, and which parameters assembly relies on.

The registry, the plugin loader, the recipe loader, `flowkit.build`, `flowkit parts` and the
contract tests all read `KINDS`. A new kind is one row here plus its hookspec in
`flowkit.hookspecs`, its contract class in `flowkit.contracts` and its check in
`flowkit.testing`; a kind whose part sits in a top-level recipe section (``section``, as
``[model]`` does) is also a field of `flowkit.recipes.load.Recipe`, which the loader fills from
that section (a test checks the two agree).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from flowkit.contracts import Decomposition, DensityModel, Dequantizer, ImageDataset, Prior, Transform


@dataclass(frozen=True)
class Kind:
    """One kind of part.

    Args:
        name: the registry namespace (``coupling``).
        hook: the hook that registers parts of this kind.
        contract: what the factory returns (a class every part of the kind is an instance of).
        example: the recipe table where a part of this kind typically sits (``flowkit parts``);
            ``None`` for a kind that no recipe table names (transforms: the steps build theirs).
        section: the top-level recipe section holding one part of this kind, if any.
        shape_kwargs: the keyword arguments the factory takes besides ``params`` and ``build``
            (``context_shape`` only where the part takes a context: the builder leaves it out
            for a part that declares none, and refuses a context such a part is asked for).
        assembly_params: parameters every part of the kind must declare, because models set them
            copy by copy when they assemble steps (checked when a plugin registers the part).
        contexts: the forms of context every part of this kind takes (`flowkit.contracts.context`):
            ``spatial`` ``(Cc, H, W)`` and ``vector`` ``(Cz,)``. Nets take a vector through a
            zero-initialised projection added to their hidden features; couplings and steps hand
            either form to their nets unchanged. A part may take more than its kind requires: it
            says so when it registers (``register(..., contexts=("vector",))``, a model that can
            be conditioned), and `flowkit.build.Builder.accepts` tells a composite part before it
            builds one.
    """

    name: str
    hook: str
    contract: type
    example: str | None
    section: str | None = None
    shape_kwargs: tuple[str, ...] = ("in_shape", "context_shape")
    assembly_params: tuple[str, ...] = ()
    contexts: tuple[str, ...] = ()


#: Both forms of context (`flowkit.contracts.context`).
SPATIAL_AND_VECTOR = ("spatial", "vector")

KINDS: dict[str, Kind] = {
    kind.name: kind
    for kind in (
        Kind("transform", "flowkit_register_transforms", Transform, None, contexts=SPATIAL_AND_VECTOR),
        Kind("decomposition", "flowkit_register_decompositions", Decomposition, "model.decomposition",
             shape_kwargs=()),
        Kind("coupling", "flowkit_register_couplings", Transform, "model.step.coupling",
             assembly_params=("mask", "parity", "net"), contexts=SPATIAL_AND_VECTOR),
        Kind("step", "flowkit_register_steps", Transform, "model.step", contexts=SPATIAL_AND_VECTOR),
        Kind("net", "flowkit_register_nets", nn.Module, "model.step.coupling.net",
             shape_kwargs=("in_shape", "context_shape", "out_channels"), contexts=SPATIAL_AND_VECTOR),
        Kind("prior", "flowkit_register_priors", Prior, "model.prior", contexts=SPATIAL_AND_VECTOR),
        # In the order of a resolved recipe's sections: [data], [dequantizer], [model].
        Kind("dataset", "flowkit_register_datasets", ImageDataset, "data", section="data", shape_kwargs=()),
        Kind("dequantizer", "flowkit_register_dequantizers", Dequantizer, "dequantizer", section="dequantizer",
             shape_kwargs=("in_shape",)),
        Kind("model", "flowkit_register_models", DensityModel, "model", section="model",
             shape_kwargs=("in_shape", "context_shape")),
    )
}

#: Recipe sections that hold a part: section name -> kind.
PART_SECTIONS: dict[str, str] = {k.section: k.name for k in KINDS.values() if k.section}
