"""refsd: a numerics-grade NumPy reference for Stable Diffusion on mobile GPUs."""

__version__ = "0.1.0"
