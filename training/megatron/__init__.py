"""Megatron-core pretraining pieces: CPU compat layer, model build, dist checkpoints, HF conversion."""
