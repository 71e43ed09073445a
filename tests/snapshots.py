"""Test helper: a detached copy of a model's state, to check that reverts are bit-exact."""
from __future__ import annotations

import torch


def model_state(handle) -> dict[str, torch.Tensor]:
    """Every tensor of ``handle.model.state_dict()``, cloned."""
    return {k: v.detach().clone() for k, v in handle.model.state_dict().items()}
