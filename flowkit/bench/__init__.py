"""Benchmarks of training, evaluation and sampling: ``flowkit bench`` and ``benchmarks/gpu_suite.py``.

- `harness`: a recipe's trainer, built and initialised on a throwaway run directory, and its
  step as a `timing.Contender`;
- `timing`: alternating rounds, CUDA peaks, bytes saved for backward, host-synchronisation check;
- `likelihood`: the check that a reference implementation (a model's `HasReferences`, such as
  multiscale's nflows Glow, which lives in its plugin) computes the same log-likelihood;
- `side_by_side`: ``flowkit bench``'s measurement; `table`: its table.

Imports go downwards only: this package uses `flowkit.runs`, and only `flowkit.cli` uses it.
"""
