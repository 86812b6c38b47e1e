"""Causal self-attention for the Wan transformer: a clip's latent frames in blocks, each block seeing itself and
the blocks before it.

Two ways to run it, which give the same block outputs (a test holds them to each other):

- :class:`BlockCausalAttention`, one forward over the whole clip with the block-causal mask (how SkyReels-V2's
  diffusion forcing and the causal Wan of Self-Forcing (Huang et al. 2025) are trained);
- :class:`WanKVCache`, a chunk at a time (the chunk being one block): each block's self-attention reads the keys
  and values the earlier chunks left in the cache. A chunk is denoised in several calls that read the cache; one
  last call on the finished chunk (``finalize``) writes its keys and values for the chunks after it.

The keys are cached after their RMS norm and their rotation, at their absolute frame positions, so they stay
valid however the window moves. For runs past the length the model was trained on, ``max_frames`` keeps a
sliding window of frames (memory stays bounded however long the stream runs), and ``sink_frames`` keeps the
first frames in it for good (an attention sink, Xiao et al. 2023).
"""

from __future__ import annotations

from ..errors import SdcliError


class BlockCausalAttention:
    """Self-attention over a whole clip, block b of ``frames_per_block`` latent frames seeing blocks 0..b.

    Computed a query block at a time over the keys up to its block's end: a masked key would add exp(-inf) = 0
    to the softmax, so this is the masked attention without building the (T, T) mask."""

    def __init__(self, ops, frames_per_block: int, tokens_per_frame: int):
        if frames_per_block < 1 or tokens_per_frame < 1:
            raise SdcliError("a causal block needs at least one frame of at least one token")
        self.ops, self.block_tokens = ops, frames_per_block * tokens_per_frame

    def attend(self, layer: int, q, k, v, precision: str):
        """q, k, v (B, nh, T, hs) of the whole clip -> (B, nh, T, hs)."""
        ops, tokens = self.ops, q.shape[2]
        if tokens % self.block_tokens:
            raise SdcliError(f"{tokens} tokens are not whole causal blocks of {self.block_tokens}")
        pieces = []
        for stop in range(self.block_tokens, tokens + 1, self.block_tokens):
            pieces.append(ops.attention(ops.narrow(q, 2, stop - self.block_tokens, stop), ops.narrow(k, 2, 0, stop),
                                        ops.narrow(v, 2, 0, stop), precision=precision))  # (B, nh, block, hs)
        return pieces[0] if len(pieces) == 1 else ops.concat(pieces, 2)


class WanKVCache:
    """The self-attention keys and values of the frames a causal Wan transformer has finished, per block.

    ``frames`` counts the frames written: the absolute index of the next chunk's first frame (its rotary
    position). A call reads the cache; inside :meth:`writing` it also appends the chunk's keys and values.
    With ``max_frames``, a chunk's queries see at most that many frames, its own included: the first
    ``sink_frames`` and the latest others. Only those are kept."""

    def __init__(self, ops, layers: int, tokens_per_frame: int, max_frames: int | None = None,
                 sink_frames: int = 0):
        if max_frames is not None and max_frames < 1:
            raise SdcliError(f"the attention window must hold at least one frame, got {max_frames}")
        if sink_frames < 0 or (max_frames is not None and sink_frames >= max_frames):
            raise SdcliError(f"an attention sink of {sink_frames} frames does not fit a window of {max_frames}")
        self.ops, self.tokens_per_frame = ops, tokens_per_frame
        self.max_frames, self.sink_frames = max_frames, sink_frames
        self.keys: list = [None] * layers  # (B, nh, S, hs) per block
        self.values: list = [None] * layers
        self.frames = 0
        self._writing = 0  # frames of the chunk being written, 0 when reading

    @property
    def stored_frames(self) -> int:
        keys = self.keys[0]
        return 0 if keys is None else keys.shape[2] // self.tokens_per_frame

    def check_chunk(self, frames: int) -> None:
        """A one-line error when a chunk of that many frames leaves no room in the window for the sink."""
        if self.max_frames is not None and frames + self.sink_frames > self.max_frames:
            raise SdcliError(f"an attention window of {self.max_frames} frames cannot hold a chunk of {frames} "
                             f"frames and a sink of {self.sink_frames}")

    def writing(self, frames: int) -> "_Writing":
        """``with cache.writing(F): transformer(...)``: the call appends its F frames' keys and values."""
        return _Writing(self, frames)

    def visible(self, past, chunk_frames: int):
        """The cached frames a chunk of ``chunk_frames`` sees: all, or the sink and the latest that fit."""
        stored = past.shape[2] // self.tokens_per_frame
        if self.max_frames is None or stored + chunk_frames <= self.max_frames:
            return past
        ops, per_frame, sink = self.ops, self.tokens_per_frame, min(self.sink_frames, stored)
        recent = self.max_frames - chunk_frames - sink  # >= 0 (check_chunk)
        parts = [ops.narrow(past, 2, 0, sink * per_frame)] if sink else []
        if recent:
            parts.append(ops.narrow(past, 2, (stored - recent) * per_frame, stored * per_frame))
        return parts[0] if len(parts) == 1 else ops.concat(parts, 2)

    def attend(self, layer: int, q, k, v, precision: str):
        """q, k, v (B, nh, T, hs) of the chunk -> (B, nh, T, hs), over the visible cached frames and the chunk."""
        ops, chunk_frames = self.ops, k.shape[2] // self.tokens_per_frame
        if k.shape[2] % self.tokens_per_frame:
            raise SdcliError(f"{k.shape[2]} tokens are not whole frames of {self.tokens_per_frame}")
        keys, values = k, v
        if self.keys[layer] is not None:
            keys = ops.concat([self.visible(self.keys[layer], chunk_frames), k], 2)  # (B, nh, S + T, hs)
            values = ops.concat([self.visible(self.values[layer], chunk_frames), v], 2)
        y = ops.attention(q, keys, values, precision=precision)  # (B, nh, T, hs)
        if self._writing:
            if self._writing != chunk_frames:
                raise SdcliError(f"writing {self._writing} frames, but the call has {chunk_frames}")
            self.keys[layer], self.values[layer] = keys, values
        return y


class _Writing:
    def __init__(self, cache: WanKVCache, frames: int):
        self.cache, self.frames = cache, frames

    def __enter__(self) -> WanKVCache:
        self.cache.check_chunk(self.frames)
        self.cache._writing = self.frames
        return self.cache

    def __exit__(self, kind, *_) -> None:
        self.cache._writing = 0
        if kind is None:
            self.cache.frames += self.frames
