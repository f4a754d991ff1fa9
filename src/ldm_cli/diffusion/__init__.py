"""Diffusion in latent space: noise schedules (`schedules`), the v-parametrization and
its loss (`parametrization`), one step of each sampler (`samplers`) and the sampling
loops (`sampling`). The formulas are in docs/MATH.md."""

DEFAULT_STEPS = 50  # DDIM and DPM-Solver++ when no step count is given (importable without torch)
