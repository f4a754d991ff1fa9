"""Exponential moving average of model weights (Polyak averaging).

θ_ema ← d·θ_ema + (1 − d)·θ after every update, with the warm-up
d_k = min(d, (1 + k)/(γ + 2 + k)) so that early averages are not dominated by the
random initialisation. Until d_k reaches d this is, to first order in 1/k, the
power-function EMA of Karras et al. 2024 (EDM2, §3.1), whose average over the k updates so
far has relative width σ_rel = √((γ + 1)/((γ + 2)²(γ + 3))): γ = 8 (the default, the
(1 + k)/(10 + k) of common practice) gives 0.090, a larger γ a shorter average.
Buffers (e.g. norm statistics) are copied, not averaged. See docs/MATH.md, "EMA".
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Shadow copy of a model's parameters, updated after each optimizer step."""

    def __init__(self, model: nn.Module, decay: float, gamma: float = 8.0):
        self.decay = decay
        self.gamma = gamma
        self.updates = 0
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        """d_k = min(d, (1 + k)/(γ + 2 + k)) after k updates."""
        return min(self.decay, (1 + self.updates) / (self.gamma + 2 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """θ_ema ← θ_ema + (1 − d)·(θ − θ_ema)."""
        weight = 1.0 - self.current_decay()
        shadow = [p for p in self.shadow.parameters()]
        live = [p.detach().to(s.dtype) for p, s in zip(model.parameters(), shadow)]
        torch._foreach_lerp_(shadow, live, weight)
        for b_shadow, b_live in zip(self.shadow.buffers(), model.buffers()):
            b_shadow.copy_(b_live)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.updates = state["updates"]
        self.shadow.load_state_dict(state["shadow"])
