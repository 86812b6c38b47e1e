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
    position). A call reads the cache; inside :meth:`writing` it also keeps the chunk's keys and values.
    With ``max_frames``, a chunk's queries see at most that many frames, its own included: the first
    ``sink_frames`` and the latest others. Only those are kept.

    Each block's keys and values live in one buffer (B, nh, capacity, hs), the cached frames first and the room
    for the chunk after them: a call writes its chunk's keys and values into that room and attends over the
    buffer's front, so the cache is never copied whole. Capacity is the window (``max_frames``), or grows by
    doubling without one. When the window is full, the oldest frames after the sink make room once, by moving the
    latest ones down."""

    def __init__(self, ops, layers: int, tokens_per_frame: int, max_frames: int | None = None,
                 sink_frames: int = 0):
        if max_frames is not None and max_frames < 1:
            raise SdcliError(f"the attention window must hold at least one frame, got {max_frames}")
        if sink_frames < 0 or (max_frames is not None and sink_frames >= max_frames):
            raise SdcliError(f"an attention sink of {sink_frames} frames does not fit a window of {max_frames}")
        self.ops, self.tokens_per_frame = ops, tokens_per_frame
        self.max_frames, self.sink_frames = max_frames, sink_frames
        self.keys: list = [None] * layers  # (B, nh, capacity, hs) per block
        self.values: list = [None] * layers
        self.stored: list[int] = [0] * layers  # frames cached per block, at the buffer's front
        self.frames = 0
        self._writing = 0  # frames of the chunk being written, 0 when reading

    @property
    def stored_frames(self) -> int:
        return self.stored[0]

    def check_chunk(self, frames: int) -> None:
        """A one-line error when a chunk of that many frames leaves no room in the window for the sink."""
        if self.max_frames is not None and frames + self.sink_frames > self.max_frames:
            raise SdcliError(f"an attention window of {self.max_frames} frames cannot hold a chunk of {frames} "
                             f"frames and a sink of {self.sink_frames}")

    def writing(self, frames: int) -> "_Writing":
        """``with cache.writing(F): transformer(...)``: the call keeps its F frames' keys and values."""
        return _Writing(self, frames)

    def make_room(self, layer: int, like, chunk_frames: int) -> None:
        """Block ``layer``'s buffers ready for a chunk of ``chunk_frames`` after the cached frames: made (shaped
        like the chunk's keys ``like``), grown, or with the oldest frames after the sink dropped."""
        ops, per_frame, stored = self.ops, self.tokens_per_frame, self.stored[layer]
        needed = stored + chunk_frames
        buffers = (self.keys[layer], self.values[layer])
        capacity = 0 if buffers[0] is None else buffers[0].shape[2] // per_frame
        if needed <= capacity:
            return
        if self.max_frames is not None and capacity == self.max_frames:  # full: keep the sink and the latest
            self.check_chunk(chunk_frames)
            sink = min(self.sink_frames, stored)
            recent = self.max_frames - chunk_frames - sink
            for buffer in buffers:
                ops.write_into_(buffer, ops.narrow(buffer, 2, (stored - recent) * per_frame, stored * per_frame), 2,
                                sink * per_frame)
            self.stored[layer] = sink + recent
            return
        size = max(needed, 2 * capacity) if self.max_frames is None else self.max_frames
        batch, heads, _, channels = like.shape
        grown = []
        for buffer in buffers:
            fresh = ops.zeros((batch, heads, size * per_frame, channels))
            if stored:
                ops.write_into_(fresh, ops.narrow(buffer, 2, 0, stored * per_frame), 2, 0)
            grown.append(fresh)
        self.keys[layer], self.values[layer] = grown

    def attend(self, layer: int, q, k, v, precision: str):
        """q, k, v (B, nh, T, hs) of the chunk -> (B, nh, T, hs), over the visible cached frames and the chunk."""
        ops, per_frame = self.ops, self.tokens_per_frame
        if k.shape[2] % per_frame:
            raise SdcliError(f"{k.shape[2]} tokens are not whole frames of {per_frame}")
        chunk_frames = k.shape[2] // per_frame
        if self._writing and self._writing != chunk_frames:
            raise SdcliError(f"writing {self._writing} frames, but the call has {chunk_frames}")
        if self.max_frames is not None:
            self.check_chunk(chunk_frames)
        self.make_room(layer, k, chunk_frames)
        start, keys, values = self.stored[layer] * per_frame, self.keys[layer], self.values[layer]
        ops.write_into_(keys, k, 2, start)
        ops.write_into_(values, v, 2, start)
        end = start + k.shape[2]
        y = ops.attention(q, ops.narrow(keys, 2, 0, end), ops.narrow(values, 2, 0, end),
                          precision=precision)  # (B, nh, T, hs)
        if self._writing:
            self.stored[layer] += chunk_frames
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
