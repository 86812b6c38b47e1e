"""The Wan2.1 diffusion transformer (diffusers ``WanTransformer3DModel``): a DiT over 3-D patches of video latents.

Wan Team 2025, "Wan: Open and Advanced Large-Scale Video Generative Models". The latents (B, 16, F, h, w) are cut
into (1, 2, 2) patches, one token each, and run through ``num_layers`` blocks of

- self-attention over all tokens with 3-D rotary position embeddings (Su et al. 2021), the head channels split
  between the frame, row and column index, and RMS norms over the whole width of q and k;
- cross-attention to the projected text embeddings (no mask: the padded text positions are zero vectors that the
  projection turns into ordinary keys, as diffusers' pipeline runs it);
- a tanh-GELU feed-forward,

each after a layer norm. The self-attention and feed-forward norms are modulated, DiT-style (Peebles & Xie 2023),
by six vectors per block: the block's learnt ``scale_shift_table`` plus a projection of the timestep embedding;
the residual branches are gated by two of them. A last modulated norm and a linear layer give each token's
velocity patch back, and the patches are put back in place.

SkyReels-V2 (SkyReels Team 2025, "SkyReels-V2: Infinite-length Film Generative Model"; diffusers
``SkyReelsV2Transformer3DModel``) is this network trained for diffusion forcing (Chen et al. 2024): a timestep per
latent frame, self-attention block-causal over blocks of frames, and, with ``inject_sample_info``, a learnt
embedding of the frame rate added to every block's modulation. Its timestep features are Wan's sinusoids formed in
float64. The options are :class:`~sdcli.config.WanTransformerConfig`'s.

Tensor names are diffusers'; the original Wan layout maps onto them in :mod:`sdcli.families.wan_names`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import numpy as np

from ..config import WanTransformerConfig
from ..errors import SdcliError
from .layers import LayerNorm, Linear, ParameterSource
from .wan_causal import BlockCausalAttention

ROPE_THETA = 10000.0
FPS_CLASSES = 2  # SkyReels-V2's frame-rate embedding: 16 fps (0) and any other rate (1), trained at 24


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Head channels given to the frame, row and column index: rows and columns 2 (d // 6) each, frames the rest
    (44, 42, 42 for heads of 128)."""
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


def rope_angles(channels: int, positions: int) -> np.ndarray:
    """(positions, channels / 2) float64 angles p * theta^(-2i / channels), as diffusers forms them in float64."""
    frequencies = 1.0 / ROPE_THETA ** (np.arange(0, channels, 2, dtype=np.float64) / channels)  # (channels / 2,)
    return np.outer(np.arange(positions, dtype=np.float64), frequencies)


def rope_tables(head_dim: int, frames: int, height: int, width: int,
                frame_offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Host float32 (cos, sin), each (frames * height * width, head_dim / 2), of the token grid in raster order
    (frame, row, column): the first pairs rotate by the frame index (from ``frame_offset``), then the row, then
    the column. cos and sin are taken in float64 and rounded once, as diffusers' float64 tables."""
    t_dim, h_dim, w_dim = rope_split(head_dim)
    frame_angles = rope_angles(t_dim, frame_offset + frames)[frame_offset:]  # (f, t_dim / 2)
    row_angles, column_angles = rope_angles(h_dim, height), rope_angles(w_dim, width)  # (h, .), (w, .)
    grid = np.concatenate([
        np.broadcast_to(frame_angles[:, None, None, :], (frames, height, width, t_dim // 2)),
        np.broadcast_to(row_angles[None, :, None, :], (frames, height, width, h_dim // 2)),
        np.broadcast_to(column_angles[None, None, :, :], (frames, height, width, w_dim // 2)),
    ], axis=-1).reshape(frames * height * width, head_dim // 2)  # (T, d / 2)
    return np.cos(grid).astype(np.float32), np.sin(grid).astype(np.float32)


def float64_timestep_features(timesteps: np.ndarray, dim: int) -> np.ndarray:
    """(N,) timesteps -> (N, dim) float32 [cos, sin] of t * 10000^(-k / (dim / 2)), k < dim / 2: the features of
    ``ops.timestep_embedding`` (flipped, no shift), with the frequencies, angles, sines and cosines in float64 and
    rounded once, as SkyReels-V2's ``get_1d_sincos_pos_embed_from_grid`` makes them. Wan's float32 angles give
    features up to 6e-5 away from these over t in 0 .. 1000."""
    frequencies = 1.0 / ROPE_THETA ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))  # (dim / 2,)
    angles = np.outer(np.asarray(timesteps, dtype=np.float64), frequencies)  # (N, dim / 2)
    return np.concatenate([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)


def fps_class(fps: int) -> int:
    """The row of SkyReels-V2's frame-rate embedding for ``fps``: 0 for 16, 1 for any other (its pipeline's map)."""
    return 0 if fps == 16 else 1


def table_values(ops, table):
    """A parameter whole as a backend array (a modulation table (1, n, C)): its one entry along the first axis,
    picked by the embedding op, so the values stay in the backend."""
    return ops.embedding(table, np.zeros(1, dtype=np.int64))  # (1, n, C)


class RmsNormWeight:
    """An RMS norm over the last axis with a learnt scale (C,) (torch.nn.RMSNorm, the q/k norm across heads)."""

    def __init__(self, params: ParameterSource, channels: int, eps: float):
        self.ops, self.eps = params.ops, eps
        self.weight = params.take("weight", (channels,))

    def __call__(self, x):
        return self.ops.rms_norm(x, self.weight, self.eps)


class WanAttention:
    """Multi-head attention with q/k RMS norms across heads; self-attention takes RoPE, cross-attention keys and
    values from the text."""

    def __init__(self, params: ParameterSource, width: int, heads: int, eps: float):
        self.ops, self.heads = params.ops, heads
        self.to_q, self.to_k, self.to_v = (Linear(params.scope(name), width, width)
                                           for name in ("to_q", "to_k", "to_v"))
        self.to_out = Linear(params.scope("to_out", 0), width, width)
        self.norm_q = RmsNormWeight(params.scope("norm_q"), width, eps)
        self.norm_k = RmsNormWeight(params.scope("norm_k"), width, eps)

    @property
    def precision(self) -> str:
        return self.to_q.weight.precision

    def keys_values(self, source):
        """The normalised keys and the values of ``source`` (B, S, C), split into heads: (B, nh, S, hs) each."""
        ops = self.ops
        k = ops.split_heads(self.norm_k(self.to_k(source)), self.heads, precision=self.precision)  # (B, nh, S, hs)
        v = ops.split_heads(self.to_v(source), self.heads, precision=self.precision)  # (B, nh, S, hs)
        return k, v

    def __call__(self, x, keys_values=None, rope=None, attend=None):
        """x (B, T, C) attending to itself (``keys_values`` None, with ``rope`` (cos, sin) each (T, hs / 2)) or
        to the given (keys, values) -> (B, T, C). ``attend(q, k, v)`` replaces the attention over all of x's
        tokens (block-causal masks, a key/value cache)."""
        ops = self.ops
        q = ops.split_heads(self.norm_q(self.to_q(x)), self.heads, precision=self.precision)  # (B, nh, T, hs)
        k, v = self.keys_values(x) if keys_values is None else keys_values
        if rope is not None:
            q, k = ops.rope(q, *rope), ops.rope(k, *rope)  # (B, nh, T, hs)
        if attend is None:
            y = ops.attention(q, k, v, precision=self.precision)  # (B, nh, T, hs)
        else:
            y = attend(q, k, v, self.precision)  # (B, nh, T, hs)
        return self.to_out(ops.merge_heads(y))  # (B, T, C)


class WanFeedForward:
    """Linear -> tanh GELU -> linear (diffusers ``FeedForward(activation_fn="gelu-approximate")``)."""

    def __init__(self, params: ParameterSource, width: int, inner: int):
        self.ops = params.ops
        self.proj = Linear(params.scope("net", 0, "proj"), width, inner)
        self.out = Linear(params.scope("net", 2), inner, width)

    def __call__(self, x):
        return self.out(self.ops.gelu_tanh(self.proj(x)))  # (B, T, C)


class WanTransformerBlock:
    """Modulated norm -> self-attention (gated) ; norm -> cross-attention ; modulated norm -> FFN (gated)."""

    def __init__(self, params: ParameterSource, config: WanTransformerConfig):
        self.ops, self.eps = params.ops, config.eps
        width = config.inner_dim
        self.attn1 = WanAttention(params.scope("attn1"), width, config.num_attention_heads, config.eps)
        self.attn2 = WanAttention(params.scope("attn2"), width, config.num_attention_heads, config.eps)
        self.norm2 = LayerNorm(params.scope("norm2"), width, config.eps) if config.cross_attn_norm else None
        self.ffn = WanFeedForward(params.scope("ffn"), width, config.ffn_dim)
        self.scale_shift_table = params.take("scale_shift_table", (1, 6, width))

    def __call__(self, x, text_keys_values, timestep_projection, rope, attend=None):
        """x (B, T, C); the cross-attention's (keys, values) of the text; timestep_projection (B, 6, C), or
        (B, F, 6, C) with a timestep per latent frame (the T tokens then F frames of T / F each); rope (cos, sin);
        ``attend`` as :class:`WanAttention` takes it -> (B, T, C)."""
        ops = self.ops
        table = table_values(ops, self.scale_shift_table)  # (1, 6, C)
        if len(timestep_projection.shape) == 4:  # per frame: the tokens as (B, F, T / F, C)
            batch, frames, _, width = timestep_projection.shape
            modulation = ops.add(timestep_projection, ops.reshape(table, (1, 1, 6, width)))  # (B, F, 6, C)
            grouped = (batch, frames, x.shape[1] // frames, width)
            shift, scale, gate, ff_shift, ff_scale, ff_gate = (
                ops.narrow(modulation, 2, i, i + 1) for i in range(6))  # (B, F, 1, C) each
        else:
            modulation = ops.add(timestep_projection, table)  # (B, 6, C)
            grouped = tuple(x.shape)
            shift, scale, gate, ff_shift, ff_scale, ff_gate = (
                ops.narrow(modulation, 1, i, i + 1) for i in range(6))  # (B, 1, C) each

        def modulated_norm(y, scale, shift):  # (B, T, C)
            normed = ops.reshape(ops.layer_norm(y, None, None, self.eps), grouped)
            return ops.reshape(ops.modulate(normed, scale, shift), tuple(y.shape))

        def gated(y, gate):  # (B, T, C)
            return ops.reshape(ops.mul(ops.reshape(y, grouped), gate), tuple(y.shape))

        x = ops.add(x, gated(self.attn1(modulated_norm(x, scale, shift), rope=rope, attend=attend), gate))
        normed = self.norm2(x) if self.norm2 is not None else x
        x = ops.add(x, self.attn2(normed, keys_values=text_keys_values))  # (B, T, C)
        return ops.add(x, gated(self.ffn(modulated_norm(x, ff_scale, ff_shift)), ff_gate))  # (B, T, C)


@dataclass(frozen=True)
class WanTextContext:
    """The text as every block's cross-attention sees it, computed once per prompt batch: the keys and values of
    each block (B, nh, S, hs) each. The text does not change over the denoising steps, so neither do these."""

    batch: int
    keys_values: tuple


class WanTransformer3DModel:
    """Velocity of video latents: (x (B, C, F, h, w), timesteps (B,), text (B, S, text_dim)) -> (B, C, F, h, w)."""

    def __init__(self, params: ParameterSource, config: WanTransformerConfig):
        self.ops, self.config = params.ops, config
        width, (pt, ph, pw) = config.inner_dim, config.patch_size
        self.patch_embedding_weight = params.scope("patch_embedding").take(
            "weight", (width, config.in_channels, pt, ph, pw))
        self.patch_embedding_bias = params.scope("patch_embedding").take("bias", (width,))
        embedder = params.scope("condition_embedder")
        self.time_linear_1 = Linear(embedder.scope("time_embedder", "linear_1"), config.freq_dim, width)
        self.time_linear_2 = Linear(embedder.scope("time_embedder", "linear_2"), width, width)
        self.time_proj = Linear(embedder.scope("time_proj"), width, 6 * width)
        self.text_linear_1 = Linear(embedder.scope("text_embedder", "linear_1"), config.text_dim, width)
        self.text_linear_2 = Linear(embedder.scope("text_embedder", "linear_2"), width, width)
        self.blocks = [WanTransformerBlock(params.scope("blocks", i), config) for i in range(config.num_layers)]
        self.proj_out = Linear(params.scope("proj_out"), width, config.out_channels * pt * ph * pw)
        self.scale_shift_table = params.take("scale_shift_table", (1, 2, width))
        self.fps_embedding = self.fps_linear_1 = self.fps_linear_2 = None
        if config.inject_sample_info:  # diffusers' FeedForward(activation_fn="linear-silu"): linear, SiLU, linear
            self.fps_embedding = params.scope("fps_embedding").take("weight", (FPS_CLASSES, width))
            self.fps_linear_1 = Linear(params.scope("fps_projection", "net", 0, "proj"), width, width)
            self.fps_linear_2 = Linear(params.scope("fps_projection", "net", 2), width, 6 * width)

    def text_context(self, text) -> WanTextContext:
        """The cross-attention keys and values of text embeddings (B, S, text_dim), a backend array."""
        ops, config = self.ops, self.config
        if len(text.shape) != 3 or text.shape[2] != config.text_dim:
            raise SdcliError(f"text embeddings must be (batch, tokens, {config.text_dim}), got {tuple(text.shape)}")
        projected = self.text_linear_2(ops.gelu_tanh(self.text_linear_1(text)))  # (B, S, C)
        return WanTextContext(int(text.shape[0]), tuple(block.attn2.keys_values(projected) for block in self.blocks))

    def patch_grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Tokens along (frames, rows, columns) of latents of that size; a one-line error if the patch does not
        divide it."""
        (pt, ph, pw), sizes = self.config.patch_size, (frames, height, width)
        if any(size < patch or size % patch for size, patch in zip(sizes, (pt, ph, pw))):
            raise SdcliError(f"latent frames x height x width {frames}x{height}x{width} must be positive multiples "
                             f"of the patch {pt}x{ph}x{pw}")
        return frames // pt, height // ph, width // pw

    def __call__(self, x, timesteps: np.ndarray, text, *, frame_offset: int = 0, self_attention=None,
                 frames_per_block: int | None = None, fps: int | None = None):
        """``text``: embeddings (B, S, text_dim) or their :meth:`text_context`. timesteps: host (B,), or (B, F)
        with one per latent frame (diffusion forcing, a causal chunk and its context). ``frame_offset``: the
        absolute index of x's first latent frame, for the rotary positions of a chunk of a longer video.
        ``self_attention``: an object whose ``attend(layer, q, k, v, precision)`` runs block ``layer``'s
        self-attention (:mod:`sdcli.nn.wan_causal`), or None: block-causal over blocks of ``frames_per_block``
        latent frames when that is more than 1 (None: the config's ``num_frame_per_block``; SkyReels' pipeline
        sets its ``causal_block_size`` so), else every token sees every token. ``fps``: the frame rate of the
        video, which a model with ``inject_sample_info`` is conditioned on (ignored by others, as diffusers)."""
        ops, config = self.ops, self.config
        if len(x.shape) != 5 or x.shape[1] != config.in_channels:
            raise SdcliError(f"latents must be (batch, {config.in_channels}, frames, height, width), "
                             f"got {tuple(x.shape)}")
        batch, _, frames, height, width = x.shape
        grid = self.patch_grid(frames, height, width)
        context = text if isinstance(text, WanTextContext) else self.text_context(text)
        timesteps = np.asarray(timesteps, dtype=np.float32)
        per_frame = timesteps.ndim == 2
        if context.batch != batch or len(timesteps) != batch or timesteps.ndim not in (1, 2):
            raise SdcliError(f"batch mismatch: latents {batch}, text {context.batch}, timesteps "
                             f"{timesteps.shape}")
        if per_frame and timesteps.shape[1] != grid[0]:
            raise SdcliError(f"{timesteps.shape[1]} timesteps per video for {grid[0]} latent frames")
        if self.fps_embedding is not None and fps is None:
            raise SdcliError("this SkyReels-V2 transformer is conditioned on the frame rate: give its fps")
        cos, sin = rope_tables(config.attention_head_dim, *grid, frame_offset=frame_offset)  # (T, hs / 2) each
        rope = (ops.from_host(cos), ops.from_host(sin))
        frames_per_block = config.num_frame_per_block if frames_per_block is None else frames_per_block
        if self_attention is None and frames_per_block > 1:
            self_attention = BlockCausalAttention(ops, frames_per_block, grid[1] * grid[2])

        tokens = ops.conv3d(x, self.patch_embedding_weight, self.patch_embedding_bias,
                            stride=config.patch_size)  # (B, C', f, h', w')
        count = math.prod(grid)
        tokens = ops.permute(ops.reshape(tokens, (batch, config.inner_dim, count)), (0, 2, 1))  # (B, T, C')

        if config.float64_timestep_features:  # (B [F], freq)
            frequencies = ops.from_host(float64_timestep_features(timesteps.reshape(-1), config.freq_dim))
        else:
            frequencies = ops.timestep_embedding(timesteps.reshape(-1), config.freq_dim, flip_sin_to_cos=True,
                                                 freq_shift=0)  # (B [F], freq)
        temb = self.time_linear_2(ops.silu(self.time_linear_1(frequencies)))  # (B [F], C')
        # (B, 6, C'), or (B, F, 6, C') per frame
        lead = (batch, grid[0]) if per_frame else (batch,)
        projection = ops.reshape(self.time_proj(ops.silu(temb)), (*lead, 6, config.inner_dim))
        if self.fps_embedding is not None:  # the same six vectors added to every frame's
            rate = ops.reshape(self.fps_embedding_of(fps, batch),
                               (batch, 1, 6, config.inner_dim) if per_frame else (batch, 6, config.inner_dim))
            projection = ops.add(projection, rate)

        for layer, (block, keys_values) in enumerate(zip(self.blocks, context.keys_values)):
            attend = None if self_attention is None else partial(self_attention.attend, layer)
            tokens = block(tokens, keys_values, projection, rope, attend)  # (B, T, C')

        table = table_values(ops, self.scale_shift_table)  # (1, 2, C')
        if per_frame:  # the tokens as (B, F, T / F, C') for the frames' own shift and scale
            modulation = ops.add(ops.reshape(temb, (*lead, 1, config.inner_dim)),
                                 ops.reshape(table, (1, 1, 2, config.inner_dim)))  # (B, F, 2, C')
            shift, scale = ops.narrow(modulation, 2, 0, 1), ops.narrow(modulation, 2, 1, 2)  # (B, F, 1, C')
            normed = ops.reshape(ops.layer_norm(tokens, None, None, config.eps),
                                 (batch, grid[0], count // grid[0], config.inner_dim))
            tokens = ops.reshape(ops.modulate(normed, scale, shift), (batch, count, config.inner_dim))
        else:
            modulation = ops.add(ops.reshape(temb, (batch, 1, config.inner_dim)), table)  # (B, 2, C')
            shift, scale = ops.narrow(modulation, 1, 0, 1), ops.narrow(modulation, 1, 1, 2)  # (B, 1, C') each
            tokens = ops.modulate(ops.layer_norm(tokens, None, None, config.eps), scale, shift)  # (B, T, C')
        patches = self.proj_out(tokens)  # (B, T, pt * ph * pw * C)
        return self.unpatchify(patches, batch, grid)

    def fps_embedding_of(self, fps: int, batch: int):
        """(B, 6 C'): the frame rate's projected embedding, what SkyReels-V2 adds to each block's modulation."""
        ops = self.ops
        rows = ops.embedding(self.fps_embedding, np.full(batch, fps_class(fps), dtype=np.int64))  # (B, C')
        return self.fps_linear_2(ops.silu(self.fps_linear_1(rows)))  # (B, 6 C')

    def unpatchify(self, patches, batch: int, grid: tuple[int, int, int]):
        """(B, f h w, pt ph pw C) -> (B, C, f pt, h ph, w pw): each token's patch back in place."""
        ops, config = self.ops, self.config
        (f, h, w), (pt, ph, pw), channels = grid, config.patch_size, config.out_channels
        patches = ops.reshape(patches, (batch, f, h, w, pt, ph, pw, channels))
        patches = ops.permute(patches, (0, 7, 1, 4, 2, 5, 3, 6))  # (B, C, f, pt, h, ph, w, pw)
        return ops.reshape(patches, (batch, channels, f * pt, h * ph, w * pw))
