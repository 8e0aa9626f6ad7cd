"""State transfer of a StreamPool: one stream's state out (`export_state`) and into a slot
(`import_state`), and the model fingerprint that keeps a state with its model."""

from __future__ import annotations

import dataclasses
import hashlib

import torch

from model.streaming.errors import StateMismatchError
from model.tcn import TCN

STATE_FORMAT = "tcnserve.stream-state/1"


class StateTransfer:
    """StreamPool's export and import of one stream's state."""

    @torch.no_grad()
    def export_state(self, slot: int) -> dict:
        """A self-contained copy of one stream's state (CPU tensors plus its position; with
        the stream's embedding, for a model that takes one)."""
        self._check_slot(slot)
        state = {
            "format": STATE_FORMAT,
            "fingerprint": self.fingerprint,
            "position": int(self._positions[slot]),
            "rings": [
                layer.ring[slot * layer.ring_len : (slot + 1) * layer.ring_len].cpu().clone()
                for layer in self._layers
            ],
            "history": self._history[slot * self.history_len : (slot + 1) * self.history_len]
            .cpu()
            .clone(),
        }
        if self._stream_embeddings is not None:
            state["embedding"] = self._stream_embeddings[slot].clone()
        return state

    @torch.no_grad()
    def import_state(self, state: dict) -> int:
        """Open a slot holding an exported state; refuses a state of another model."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise StateMismatchError(f"not a stream state of format {STATE_FORMAT!r}")
        if state.get("fingerprint") != self.fingerprint:
            raise StateMismatchError("this state was exported from a different model")
        rings, position = state.get("rings"), state.get("position")
        if isinstance(position, bool) or not isinstance(position, int) or position < 0:
            raise StateMismatchError(f"invalid position {position!r}")
        if not isinstance(rings, (list, tuple)) or len(rings) != len(self._layers):
            raise StateMismatchError(f"expected {len(self._layers)} ring buffers")
        for ring, layer in zip(rings, self._layers, strict=True):
            expected = (layer.ring_len, layer.ring.shape[1])
            if not isinstance(ring, torch.Tensor) or tuple(ring.shape) != expected:
                raise StateMismatchError(f"ring buffer shape differs from {expected}")
            if not ring.is_floating_point():
                raise StateMismatchError("ring buffers must be floating point")
        history = state.get("history")
        expected = tuple(self._history[: self.history_len].shape)
        if not isinstance(history, torch.Tensor) or tuple(history.shape) != expected:
            raise StateMismatchError(f"input history shape differs from {expected}")
        embedding = state.get("embedding")
        if self._stream_embeddings is None:
            if embedding is not None:
                raise StateMismatchError("this state has an embedding; this model takes none")
        else:
            width = self.config.embedding_width
            if not isinstance(embedding, torch.Tensor) or tuple(embedding.shape) != (width,):
                raise StateMismatchError(f"expected the stream's embedding, ({width},) values")
        try:
            slot = self.open(position, embedding=embedding)
        except (TypeError, ValueError) as e:  # e.g. a non-finite embedding
            raise StateMismatchError(f"invalid state: {e}") from None
        for ring, layer in zip(rings, self._layers, strict=True):
            layer.ring[slot * layer.ring_len : (slot + 1) * layer.ring_len].copy_(ring)
        self._history[slot * self.history_len : (slot + 1) * self.history_len].copy_(history)
        return slot


def _fingerprint(net: TCN) -> str:
    """Identifies a model by config and effective weights, so states stay with their model.
    Options at their defaults are left out, so that adding an option to TCNConfig does not
    change the fingerprint of every model that does not use it."""
    defaults = {f.name: f.default for f in dataclasses.fields(net.config)}
    options = {k: v for k, v in net.config.to_dict().items() if v != defaults.get(k, ...)}
    digest = hashlib.sha256(repr(sorted(options.items())).encode())
    with torch.no_grad():
        tensors = [net.embedding.weight] if net.embedding is not None else []
        for block in net.blocks:
            tensors += [block.conv1.weight, block.conv1.bias, block.conv2.weight, block.conv2.bias]
            for conv in (block.downsample, block.embedding_projection, block.concat_projection):
                if conv is not None:
                    tensors += [conv.weight, conv.bias]
        for conv in net.skips or ():
            if conv is not None:
                tensors += [conv.weight, conv.bias]
        if net.head is not None:
            tensors += [net.head.weight, net.head.bias]
        for t in tensors:
            digest.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]
