"""Building blocks that parts share, public for built-in and third-party plugins alike.

- `flowkit.nn.masks`: the checkerboard, column and channel masks of couplings, and their checks;
- `flowkit.nn.coupling`: `MaskedCoupling`, the base of mask couplings, and `CompactHalves`;
- `flowkit.nn.data_init`: Flow++'s data-dependent initialisation of a net's layers;
- `flowkit.nn.edge_padding`: openai/glow's edge-padded convolution, and a convolution with an
  actnorm (or output scale) folded into its weights;
- `flowkit.nn.weight_norm`: MaCow's weight-normalised convolution with its data-dependent init;
- `flowkit.nn.transformer`: pre-LayerNorm transformer blocks over the tokens of an image grid
  (causal or not) and the key/value cache of position-by-position decoding (TarFlow, Jet);
- `flowkit.nn.guidance`: classifier-free guidance as one wrapper around every net and prior.

A plugin imports what it needs from here, never from another plugin: built-in plugins are
independent of each other exactly as a third-party package is (an import-linter contract in
pyproject.toml).
"""
