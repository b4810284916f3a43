"""The paper's SWA: keep the weights of the k best epochs by validation loss, then average them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["TopK", "average_state_dicts"]


def average_state_dicts(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Element-wise mean of floating-point tensors; integer tensors (BatchNorm's
    ``num_batches_tracked``) are taken from the first state, which callers pass as the best."""
    if not states:
        raise ValueError("no weights to average")
    keys = states[0].keys()
    for s in states[1:]:
        if s.keys() != keys:
            raise ValueError("state dicts to average have different keys")
    out = {}
    for k in keys:
        first = states[0][k]
        if first.is_floating_point():
            out[k] = torch.stack([s[k].to(torch.float64) for s in states]).mean(0).to(first.dtype)
        else:
            out[k] = first.clone()
    return out


@dataclass
class TopK:
    """The k lowest-loss (epoch, weights) snapshots seen so far; weights are CPU copies."""

    k: int = 3
    entries: list[tuple[float, int, dict[str, torch.Tensor]]] = field(default_factory=list)

    def offer(self, loss: float, epoch: int, state: dict[str, torch.Tensor]) -> bool:
        """Keep ``state`` if it is among the k best; returns whether it was kept."""
        if len(self.entries) >= self.k and loss >= self.entries[-1][0]:
            return False
        snap = {n: t.detach().to("cpu").clone() for n, t in state.items()}
        self.entries.append((float(loss), int(epoch), snap))
        self.entries.sort(key=lambda e: (e[0], e[1]))
        del self.entries[self.k :]
        return True

    @property
    def epochs(self) -> list[int]:
        return [e for _, e, _ in self.entries]

    def average(self) -> dict[str, torch.Tensor]:
        return average_state_dicts([s for _, _, s in self.entries])
