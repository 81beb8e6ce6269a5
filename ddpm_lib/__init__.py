"""ddpm_lib: the tested core of the ddpm-notebooks course on Denoising Diffusion Probabilistic Models.

Modules, in the order the course meets them: schedules, diffusion, likelihood, unet, data, training,
sampling, viz; checkpoint and files hold the safe-I/O plumbing; cli backs ``python -m ddpm_lib``.
Timesteps are 0-based (0 ... T-1) and images are (B, C, H, W) tensors in [-1, 1] everywhere.
"""

__version__ = "0.1.0"
