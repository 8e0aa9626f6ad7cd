"""tcnserve's model layer: the paper's TCN and a batched ring-buffer streaming engine.

Pure PyTorch; never imports the service.
"""

from model.checkpoint import load_model, read_checkpoint_info, save_model
from model.config import TCNConfig
from model.numeric_range import safe_input_bound
from model.streaming import (
    MAX_POSITION,
    NonFiniteOutputError,
    PoolFullError,
    SlotError,
    StateMismatchError,
    StreamPool,
)
from model.tcn import TCN, TemporalBlock

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
