"""Shared assembly helpers for model plugins (stacks of steps, level flows)."""
