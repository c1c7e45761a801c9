"""Diffusion in numpy: the schedulers and the denoising loop of the image-generation task."""
