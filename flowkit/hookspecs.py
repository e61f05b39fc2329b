"""The whole plugin API of flowkit: one hook per kind of part.

Every ``flowkit_register_*`` hook is called once per plugin manager, with a ``register``
callable of this signature::

    register(name, factory, *, params=ParamsCls, summary="one line", contexts=None)

- ``name`` is public API (it appears in recipes): ``[a-z][a-z0-9_]*``.
- ``factory(params, *, build, **shape_kwargs)`` builds the part from a validated Params
  instance. ``build`` resolves nested parts (`flowkit.params.PartRef`), so a plugin never
  imports another plugin. The shape keyword arguments depend on the kind (see each hook).
  The factory is usually the part's class, whose constructor takes every value from
  ``params``: the Params are the one place a part's defaults are stated.
- ``params`` is a frozen, kw-only dataclass (see `flowkit.params`).
- ``contexts``: the forms of context (``"spatial"``, ``"vector"``; `flowkit.contracts.context`)
  the factory takes as ``context_shape``; ``None`` means what every part of the kind takes
  (nets, couplings, steps, transforms and priors: both; models: none). A model that can be
  conditioned says so, ``contexts=("vector",)``, and gets ``context_shape``; others never do.

A name registered twice, by the same or by two plugins, is an error naming both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

from flowkit.kinds import KINDS

if TYPE_CHECKING:
    import click

    from flowkit.registry import RegisterFn

PROJECT = "flowkit"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: The hooks that register parts, by the kind of part they register (from `flowkit.kinds.KINDS`).
KIND_HOOKS: dict[str, str] = {kind.name: kind.hook for kind in KINDS.values()}


@hookspec
def flowkit_register_transforms(register: RegisterFn) -> None:
    """Register generic invertible layers (``actnorm``, ``invconv``).

    Factory: ``factory(params, *, in_shape, context_shape, build) -> Transform``, with
    ``in_shape = (C, H, W)`` and ``context_shape`` a tuple or ``None``.

    Example::

        @hookimpl
        def flowkit_register_transforms(register):
            register("actnorm", ActNorm, params=ActNormParams)
    """


@hookspec
def flowkit_register_decompositions(register: RegisterFn) -> None:
    """Register multiscale decompositions (``haar``, ``db2``..``db8``, ``squeeze``).

    Factory: ``factory(params, *, build) -> Decomposition``: ``split(x) -> (low, detail,
    logabsdet)`` and ``merge(low, detail) -> (x, logabsdet)``.

    Example::

        register("haar", HaarDecomposition, params=NoParams)
    """


@hookspec
def flowkit_register_couplings(register: RegisterFn) -> None:
    """Register coupling transforms (``additive``, ``affine``, ``mixlogistic``).

    Factory: ``factory(params, *, in_shape, context_shape, build) -> Transform``. A coupling
    builds its conditioner with ``build(params.net, in_shape=..., context_shape=...,
    out_channels=...)``.

    Example::

        register("spline", SplineCoupling, params=SplineParams)
    """


@hookspec
def flowkit_register_steps(register: RegisterFn) -> None:
    """Register flow steps (``glow``, ``macow``): shape-preserving composite transforms.

    Factory: ``factory(params, *, in_shape, context_shape, build) -> Transform``.

    Example::

        register("glow", GlowStep, params=GlowParams)
    """


@hookspec
def flowkit_register_nets(register: RegisterFn) -> None:
    """Register conditioner networks (``glow_cnn``, ``gated_resnet``).

    Factory: ``factory(params, *, in_shape, context_shape, out_channels, build) -> nn.Module``
    whose ``forward(x, context=None)`` maps ``(B, *in_shape)`` to ``(B, out_channels, H, W)``.

    Example::

        register("glow_cnn", GlowCNN, params=GlowCNNParams)
    """


@hookspec
def flowkit_register_priors(register: RegisterFn) -> None:
    """Register base distributions (``gaussian``, ``conditional_gaussian``).

    Factory: ``factory(params, *, in_shape, context_shape, build) -> Prior``.

    Example::

        register("gaussian", StandardGaussian, params=NoParams)
    """


@hookspec
def flowkit_register_dequantizers(register: RegisterFn) -> None:
    """Register dequantizers (``uniform``, ``variational``).

    Factory: ``factory(params, *, in_shape, build) -> Dequantizer``.

    Example::

        register("uniform", UniformDequantizer, params=NoParams)
    """


@hookspec
def flowkit_register_models(register: RegisterFn) -> None:
    """Register density models (``wavelet_flow``, ``multiscale``).

    Factory: ``factory(params, *, in_shape, build) -> DensityModel``; registered with
    ``contexts=("vector",)``, ``factory(params, *, in_shape, context_shape, build)``, where
    ``context_shape`` is ``None`` or ``(Cz,)`` and a model built with one takes it in
    ``log_prob_parts``, ``sample`` and ``initialize`` (the VAE-flow's decoder is such a model).

    Example::

        register("wavelet_flow", WaveletFlow, params=WaveletFlowParams)
        register("multiscale", Multiscale, params=MultiscaleParams, contexts=("vector",))
    """


@hookspec
def flowkit_register_datasets(register: RegisterFn) -> None:
    """Register image datasets (``mnist``, ``npz``, ``image_folder``, ``cifar10``).

    Factory: ``factory(params, *, build) -> ImageDataset`` (uint8 NCHW train and test arrays).
    Dataset Params subclass `flowkit.contracts.dataset.DataParams` (it adds ``n_bits``).

    Example::

        register("npz", load_npz, params=NpzParams)
    """


@hookspec
def flowkit_add_commands(cli: click.Group) -> None:
    """Add click commands to the ``flowkit`` command group (called once, when the CLI starts).

    Example::

        @hookimpl
        def flowkit_add_commands(cli):
            @cli.command()
            def hello():
                click.echo("hello")
    """
