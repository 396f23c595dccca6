"""Flax NNX example trainers, data pipeline and robustness evaluation."""
