"""Exponential moving average of trainable parameters (fp32 shadow copies), with the usual warm-up
min(decay, (1 + n) / (10 + n)) so early averages are not dominated by the random initialisation."""

from __future__ import annotations

from contextlib import contextmanager

import torch


class EMA:
    def __init__(self, named_params: dict[str, torch.nn.Parameter], decay: float, warmup: bool = True):
        self.params = named_params
        self.decay, self.warmup = decay, warmup
        self.updates = 0
        self.shadow = {k: p.detach().float().clone() for k, p in named_params.items()}

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        d = self.current_decay()
        keys = list(self.params)
        # one fused call over all tensors (a per-tensor loop is hundreds of kernel launches a step on a GPU)
        torch._foreach_lerp_([self.shadow[k] for k in keys], [self.params[k].detach().float() for k in keys], 1.0 - d)
        self.updates += 1

    @contextmanager
    def applied(self):
        """Inside the block the model holds the EMA weights; the training weights come back afterwards."""
        backup = {k: p.detach().clone() for k, p in self.params.items()}
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(self.shadow[k].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(backup[k])

    def state_dict(self) -> dict:
        return {"updates": self.updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:3]}")
        self.updates = int(state["updates"])
        # on the parameters' device (a checkpoint loads on the CPU; the model may be on a GPU)
        self.shadow = {k: state["shadow"][k].to(self.params[k].device, torch.float32).clone() for k in self.shadow}
