"""The Diffusion-DPO trainer: precomputed latents and text states (encode), their input
pipeline (loader), and the training loop."""
