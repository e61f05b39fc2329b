"""Run engine: run directories, training, evaluation, sampling, checkpoints."""
