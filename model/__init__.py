"""tcnserve's model layer: the paper's TCN and a batched ring-buffer streaming engine.

Pure PyTorch; never imports the service. The limits and exceptions are importable without
torch (an edge process of the server uses them and never computes); everything else is loaded
on first use (PEP 562), so `from model import MAX_POSITION` costs no torch import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from model._lazy import lazy_attributes
from model.streaming.errors import (
    MAX_POSITION,
    NonFiniteOutputError,
    PoolFullError,
    SlotError,
    StateMismatchError,
)

if TYPE_CHECKING:
    from model.checkpoint import load_model, read_checkpoint_info, save_model
    from model.config import TCNConfig
    from model.numeric_range import safe_input_bound
    from model.streaming import StreamPool
    from model.tcn import TCN, TemporalBlock

_LAZY = {
    "load_model": "model.checkpoint",
    "read_checkpoint_info": "model.checkpoint",
    "save_model": "model.checkpoint",
    "TCNConfig": "model.config",
    "safe_input_bound": "model.numeric_range",
    "StreamPool": "model.streaming",
    "TCN": "model.tcn",
    "TemporalBlock": "model.tcn",
}

__getattr__ = lazy_attributes(__name__, _LAZY)

__all__ = [
    "MAX_POSITION",
    "TCN",
    "NonFiniteOutputError",
    "PoolFullError",
    "SlotError",
    "StateMismatchError",
    "StreamPool",
    "TCNConfig",
    "TemporalBlock",
    "load_model",
    "read_checkpoint_info",
    "safe_input_bound",
    "save_model",
]
