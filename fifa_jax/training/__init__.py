"""Diffusion-DPO training: encode, train, checkpoints, export."""
