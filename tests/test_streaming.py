"""Streaming generation's invariants, on random weights (no reference library: Self-Forcing has none in diffusers):

- the causal transformer run chunk by chunk through its key/value cache gives what one forward over the whole clip
  with the block-causal mask gives, windowed and with an attention sink too;
- the VAE decodes a stream of chunks to the frames of the whole-clip decode, every bit;
- the first k chunks of an N-chunk run are those of a k-chunk run, every bit (causality and the noise order);
- the few-step schedule's timesteps, sigmas and re-noising are those of the algorithm as the paper states it;
- the calls in the wrong order are one-line errors.
"""

from __future__ import annotations

import numpy as np
import pytest

from wan_models import TINY_TRANSFORMER, TINY_VAE, random_state

from sdcli.config import WanTransformerConfig
from sdcli.errors import SdcliError
from sdcli.io.weights import ArraySource, load_network
from sdcli.nn.dit_wan import WanTransformer3DModel
from sdcli.nn.vae_wan import WanAutoencoder, WanVAEConfig
from sdcli.nn.wan_causal import BlockCausalAttention, WanKVCache
from sdcli.ops import get_ops
from sdcli.pipelines.streaming import StreamingVideo
from sdcli.sampling.few_step import few_step_schedule, flow_table

TOL = 1e-5  # the bound for cached against whole, relative to the output's largest value


def transformer_model(backend: str = "cpu", seed: int = 0) -> WanTransformer3DModel:
    config = WanTransformerConfig.from_diffusers(TINY_TRANSFORMER)
    build = lambda params: WanTransformer3DModel(params, config)  # noqa: E731
    return load_network(build, ArraySource(random_state(build, seed)), get_ops(backend))


def vae_model(seed: int = 1) -> WanAutoencoder:
    config = WanVAEConfig.from_dict(TINY_VAE)
    build = lambda params: WanAutoencoder(params, config)  # noqa: E731
    return load_network(build, ArraySource(random_state(build, seed, scale=1.0)), get_ops("cpu"))


@pytest.fixture(scope="module")
def transformer():
    return transformer_model()


def clip(frames: int, size=(4, 6), batch: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 16, frames, *size)).astype(np.float32)
    text = rng.standard_normal((batch, 5, TINY_TRANSFORMER["text_dim"])).astype(np.float32)
    return x, text


def relative(ours, reference) -> float:
    return float(np.max(np.abs(ours.astype(np.float64) - reference)) / np.max(np.abs(reference)))


class MaskedAttention:
    """The reference: every query against every key with an explicit additive mask (numpy's attention)."""

    def __init__(self, ops, allowed: np.ndarray):
        self.ops, self.mask = ops, np.where(allowed, 0.0, -np.inf).astype(np.float32)

    def attend(self, layer, q, k, v, precision):
        from sdcli.ops import numpy_ops

        ops = self.ops
        return ops.from_host(numpy_ops.attention(ops.to_host(q), ops.to_host(k), ops.to_host(v), mask=self.mask))


def frame_mask(frames: int, per_block: int, tokens: int, window: int | None = None, sink: int = 0) -> np.ndarray:
    """(T, T) True where a query frame's token may see a key frame's: key block <= query block, and with a window
    only the sink frames and the latest ``window - per_block - sink`` frames before the query's block."""
    q_frame = np.arange(frames)[:, None]
    k_frame = np.arange(frames)[None, :]
    q_block_end = (q_frame // per_block + 1) * per_block
    allowed = k_frame < q_block_end
    if window is not None:
        block_start = q_frame // per_block * per_block
        recent = window - per_block - sink
        allowed &= (k_frame >= block_start) | (k_frame >= block_start - recent) | (k_frame < sink)
    return np.repeat(np.repeat(allowed, tokens, axis=0), tokens, axis=1)


def run_cached(model, x, text, per_block, timestep_of_block, cache):
    """Each block of frames in turn: read at its timestep, then written at timestep 0 (the clean context)."""
    ops, outputs = model.ops, []
    context = model.text_context(ops.from_host(text))
    for block, start in enumerate(range(0, x.shape[2], per_block)):
        chunk = ops.from_host(np.ascontiguousarray(x[:, :, start:start + per_block]))
        t = np.full(x.shape[0], timestep_of_block[block], dtype=np.float32)
        outputs.append(ops.to_host(model(chunk, t, context, frame_offset=cache.frames, self_attention=cache)))
        with cache.writing(per_block):
            model(chunk, np.zeros(x.shape[0], dtype=np.float32), context, frame_offset=cache.frames,
                  self_attention=cache)
    return outputs


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_block_causal_forward_is_the_masked_forward(backend):
    model = transformer_model(backend)
    ops, (x, text) = model.ops, clip(6)
    timesteps = np.array([[0, 0, 250, 250, 900, 900], [0, 0, 10, 10, 999, 999]], dtype=np.float32)
    tokens = (4 // 2) * (6 // 2)
    masked = ops.to_host(model(ops.from_host(x), timesteps, ops.from_host(text),
                               self_attention=MaskedAttention(ops, frame_mask(6, 2, tokens))))
    blocks = ops.to_host(model(ops.from_host(x), timesteps, ops.from_host(text),
                               self_attention=BlockCausalAttention(ops, 2, tokens)))
    assert relative(blocks, masked) <= TOL


def test_per_frame_timesteps_all_equal_are_the_batch_timestep(transformer):
    ops, (x, text) = transformer.ops, clip(3)
    one = ops.to_host(transformer(ops.from_host(x), np.array([500.0, 20.0], np.float32), ops.from_host(text)))
    per_frame = ops.to_host(transformer(ops.from_host(x), np.array([[500.0] * 3, [20.0] * 3], np.float32),
                                        ops.from_host(text)))
    np.testing.assert_array_equal(per_frame, one)


@pytest.mark.parametrize("per_block", [1, 2, 3])
def test_cached_chunks_equal_the_block_causal_forward(transformer, per_block):
    """Chunk after chunk through the cache, each read at its own timestep and written clean, against one forward
    over the clip whose earlier blocks are at timestep 0 and the block asked about at its timestep."""
    ops, (x, text) = transformer.ops, clip(3 * per_block)
    tokens, blocks = 2 * 3, 3
    steps = [700.0, 420.5, 37.0]
    cache = WanKVCache(ops, len(transformer.blocks), tokens)
    cached = run_cached(transformer, x, text, per_block, steps, cache)
    assert cache.frames == 3 * per_block and cache.stored_frames == 3 * per_block
    for block in range(blocks):
        timesteps = np.zeros((2, 3 * per_block), dtype=np.float32)
        timesteps[:, block * per_block:(block + 1) * per_block] = steps[block]
        whole = ops.to_host(transformer(ops.from_host(x), timesteps, ops.from_host(text),
                                        self_attention=BlockCausalAttention(ops, per_block, tokens)))
        expected = whole[:, :, block * per_block:(block + 1) * per_block]
        assert relative(cached[block], expected) <= TOL, block


@pytest.mark.parametrize("window, sink", [(4, 0), (4, 2), (6, 2), (3, 1)])
def test_a_sliding_window_and_sink_are_the_windowed_mask(transformer, window, sink):
    """Blocks of 1 or 2 frames, more of them than the window holds: the cache keeps at most ``window`` frames,
    and each chunk's output is the forward whose mask shows only the sink and the latest frames."""
    per_block = 1 if window == 3 else 2
    ops, (x, text) = transformer.ops, clip(6 if per_block == 1 else 8)
    frames, tokens = x.shape[2], 2 * 3
    cache = WanKVCache(ops, len(transformer.blocks), tokens, max_frames=window, sink_frames=sink)
    cached = run_cached(transformer, x, text, per_block, [0.0] * (frames // per_block), cache)
    assert cache.stored_frames <= window
    reference = ops.to_host(transformer(ops.from_host(x), np.zeros(2, np.float32), ops.from_host(text),
                                        self_attention=MaskedAttention(
                                            ops, frame_mask(frames, per_block, tokens, window, sink))))
    assert relative(np.concatenate(cached, axis=2), reference) <= TOL


def test_window_must_hold_a_chunk_and_the_sink(transformer):
    cache = WanKVCache(transformer.ops, 2, 6, max_frames=3, sink_frames=2)
    with pytest.raises(SdcliError, match="cannot hold a chunk"):
        cache.check_chunk(2)
    with pytest.raises(SdcliError, match="does not fit"):
        WanKVCache(transformer.ops, 2, 6, max_frames=2, sink_frames=2)


# -- the few-step schedule -------------------------------------------------------------------------------------
def test_schedule_is_the_papers_warped_list():
    """Self-Forcing: timesteps 1000, 750, 500, 250 on the unshifted scale, each read through the shifted table
    sigma(s) = shift s / (1 + (shift - 1) s) at s = t / 1000: 1000, 937.5, 833.33, 625 at shift 5."""
    schedule = few_step_schedule()
    for t, ours in zip((1000, 750, 500, 250), schedule.timesteps):
        s = t / 1000
        assert ours == pytest.approx(1000 * 5 * s / (1 + 4 * s), rel=1e-6)
        assert schedule.sigma(ours) == pytest.approx(5 * s / (1 + 4 * s), rel=1e-6)
    assert few_step_schedule(warp=False).timesteps == (1000.0, 750.0, 500.0, 250.0)
    timesteps, sigmas = flow_table(5.0)
    assert len(timesteps) == 1000 and sigmas[0] == 1.0 and 0 < sigmas[-1] < 0.01


def test_schedule_step_is_x0_then_fresh_noise():
    schedule, rng = few_step_schedule(), np.random.default_rng(3)
    x, v, noise = (rng.standard_normal((1, 16, 3, 4, 4)).astype(np.float32) for _ in range(3))
    t, t_next = schedule.timesteps[1], schedule.timesteps[2]
    x0 = schedule.to_x0(x, v, t)
    np.testing.assert_allclose(x0, x.astype(np.float64) - (5 * 0.75 / 4) * v, rtol=1e-6, atol=1e-6)
    s = 5 * 0.5 / 3
    np.testing.assert_allclose(schedule.noised(x0, noise, t_next), (1 - s) * x0 + s * noise, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("steps, shift", [((), 5.0), ((500, 750), 5.0), ((1000, 500), -1.0), ((1200,), 5.0)])
def test_schedule_refuses_bad_lists(steps, shift):
    with pytest.raises(SdcliError):
        few_step_schedule(steps, shift)


# -- the streaming pipeline ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def streaming(transformer):
    return StreamingVideo(transformer, vae_model(), few_step_schedule((1000, 500)), frames_per_chunk=2,
                          max_attention_frames=4, attention_sink=True)


def run_chunks(pipeline, chunks: int, text, **options):
    outputs = [record for record in pipeline.stream(text, height=32, width=48, seeds=[7, 8], chunks=chunks,
                                                    **options) if hasattr(record, "frames")]
    assert [chunk.index for chunk in outputs] == list(range(chunks))
    return outputs


def test_first_chunks_do_not_depend_on_the_run_length(streaming):
    _, text = clip(1)
    long_run, short_run = run_chunks(streaming, 4, text), run_chunks(streaming, 2, text)
    for short, long in zip(short_run, long_run):
        np.testing.assert_array_equal(short.frames, long.frames)
        np.testing.assert_array_equal(short.latents, long.latents)
    assert [chunk.frames.shape[1] for chunk in long_run] == [5, 8, 8, 8]
    assert [chunk.first_frame for chunk in long_run] == [0, 5, 13, 21]
    assert streaming.frames_for_chunks(4) == 29


def test_streamed_decode_is_the_whole_clip_decode(streaming):
    _, text = clip(1)
    chunks = run_chunks(streaming, 3, text)
    vae, ops = streaming.vae, streaming.vae.ops
    latents = np.concatenate([chunk.latents for chunk in chunks], axis=2)
    whole = ops.to_host(vae.decode(vae.denormalize(ops.from_host(latents)))).transpose(0, 2, 1, 3, 4)
    np.testing.assert_array_equal(np.concatenate([chunk.frames for chunk in chunks], axis=1), whole)


def test_calls_out_of_order_are_errors(streaming):
    _, text = clip(1)
    cache = streaming.initialize_cache(text, height=32, width=48, seeds=[1, 2])
    with pytest.raises(SdcliError, match="next chunk is 0"):
        list(streaming.generate(1, cache))
    with pytest.raises(SdcliError, match="cannot be finalized"):
        streaming.finalize(0, cache)
    records = list(streaming.generate(0, cache))
    assert [type(record).__name__ for record in records] == ["StepRecord", "StepRecord", "ChunkFrames"]
    with pytest.raises(SdcliError, match="not finalized"):
        list(streaming.generate(1, cache))
    streaming.finalize(0, cache)
    with pytest.raises(SdcliError, match="finalized already"):
        streaming.finalize(0, cache)
    assert cache.transformer.frames == 2


def test_video_to_video_starts_from_the_encoded_input(streaming):
    _, text = clip(1)
    rng = np.random.default_rng(5)

    def frames(index):
        return rng.uniform(-1, 1, (2, 3, streaming.chunk_frame_count(index), 32, 48)).astype(np.float32)

    pipeline = StreamingVideo(streaming.transformer, streaming.vae, few_step_schedule((1000, 750, 500)),
                              frames_per_chunk=2, input_start_step=1)
    chunks = run_chunks(pipeline, 2, text, input_frames=frames)
    assert [chunk.frames.shape[1] for chunk in chunks] == [5, 8]
    steps = [record.index for record in pipeline.stream(text, height=32, width=48, seeds=[1, 2], chunks=1,
                                                        input_frames=frames) if hasattr(record, "sigma")]
    assert steps == [1, 2]


# -- a streaming model from files --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_streaming(tmp_path_factory):
    from wan_models import make_tiny_streaming

    return make_tiny_streaming(tmp_path_factory.mktemp("streaming") / "base")


def test_generator_file_with_the_wan_base_streams(tiny_streaming):
    """A converted generator (original Wan layout under Self-Forcing's ``model.`` prefix) on a Wan diffusers
    folder: the prompt encoded, the encoder released, three chunks of 9, 12 and 12 frames."""
    import sdcli

    base, generator = tiny_streaming
    model = sdcli.load_streaming_model(generator, str(base), max_attention_frames=6)
    text = model.text.conditioning("a red fox trotting through fresh snow", 1)  # (1, 512, 32)
    model.text.release_text_encoder()
    chunks = [record for record in model.video.stream(text, height=32, width=48, seeds=[3], chunks=3)
              if isinstance(record, sdcli.ChunkFrames)]
    assert [chunk.frames.shape for chunk in chunks] == [(1, 9, 3, 32, 48), (1, 12, 3, 32, 48), (1, 12, 3, 32, 48)]
    assert all(np.all(np.isfinite(chunk.frames)) and np.abs(chunk.frames).max() <= 1 for chunk in chunks)
    assert model.video.transformer.blocks and model.text.prompt_encoder is None
    # the original Wan code's sinusoids (float64), which the generator was trained with
    assert model.video.transformer.config.float64_timestep_features


def test_a_generator_must_be_a_wan_transformer(tiny_streaming, tmp_path):
    import sdcli
    from sdcli.errors import CheckpointError
    from sdcli.io.safetensors import save_file

    base, _ = tiny_streaming
    other = tmp_path / "other.safetensors"
    save_file(other, {"weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(CheckpointError, match="not a Wan transformer"):
        sdcli.load_streaming_model(other, str(base))
    with pytest.raises(CheckpointError, match="must be a .safetensors"):
        sdcli.load_streaming_model(tmp_path / "generator.pt", str(base))


def test_the_cache_stays_in_the_backend():
    """The cache's buffers are backend arrays, written and read through the ops only (the opaque test backend
    refuses anything else), and give the cpu backend's chunks."""
    from opaque_backend import opaque_ops

    config = WanTransformerConfig.from_diffusers(TINY_TRANSFORMER)
    build = lambda params: WanTransformer3DModel(params, config)  # noqa: E731
    state = random_state(build, 0)
    x, text = clip(8)
    results = []
    for ops in (opaque_ops, get_ops("numpy")):
        model = load_network(build, ArraySource(state), ops)
        cache = WanKVCache(ops, len(model.blocks), 6, max_frames=4, sink_frames=2)
        results.append(run_cached(model, x, text, 2, [0.0, 500.0, 20.0, 999.0], cache))
    for opaque, numpy in zip(*results):
        np.testing.assert_array_equal(opaque, numpy)
