"""Model and optimizer state as safetensors + JSON: training state never goes through pickle.

Checkpoints and artifacts hold only tensors (safetensors) and plain JSON, so loading a file
from object storage cannot execute code.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .. import io

__all__ = ["save_tensors", "load_tensors", "optimizer_to_flat", "optimizer_from_flat", "write_json", "read_json"]


def save_tensors(url: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write tensors (moved to CPU, made contiguous, unshared) as one safetensors file."""
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    io.write_bytes(url, st_save(clean))


def load_tensors(url: str) -> dict[str, torch.Tensor]:
    return st_load(io.read_bytes(url))


def write_json(url: str, obj) -> None:
    io.write_bytes(url, json.dumps(obj, indent=2, sort_keys=True).encode())


def read_json(url: str):
    return json.loads(io.read_bytes(url))


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer's state_dict into tensors and JSON-able metadata."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for name, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
