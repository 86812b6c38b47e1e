"""FreeNoise (long clips through context windows) against diffusers: the windows and weights of
FreeNoiseTransformerBlock, the shuffled noise of AnimateDiffFreeNoiseMixin, the UNet with motion modules whose blocks
diffusers' enable_free_noise replaced, and whole clips longer than the context window from AnimateDiffPipeline."""

from __future__ import annotations

import copy
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch/diffusers are the FreeNoise reference")
pytest.importorskip("diffusers")

import test_motion as motion  # noqa: E402
import tiny_pipeline  # noqa: E402

from sdcli.errors import SdcliError  # noqa: E402
from sdcli.io.media import images_to_uint8  # noqa: E402
from sdcli.nn.motion import ContextWindows  # noqa: E402
from sdcli import VideoParams, generate_video, load_video_pipeline  # noqa: E402
from sdcli.rng import shuffle_context_frames  # noqa: E402

TOL = {
    # max |ours - diffusers| / max |diffusers| of the network (as test_motion's tiny bound)
    "tiny": 2e-5,
    # frames, in 8-bit steps (the bound)
    "frame_levels": 2,
}
# (context length, stride, frames): windows that end flush with the clip, and ones where a last window is added
# that keeps only its frames past the previous window (diffusers' incomplete last batch), a clip longer than the
# adapter's position table (the v3-like adapter has 16 rows), and a clip exactly one window long
WINDOWS = [(4, 2, 8), (4, 3, 9), (5, 2, 6), (8, 4, 18), (6, 4, 6)]


def free_noise_reference(reference, length: int, stride: int, weighting: str):
    """A copy of diffusers' UNetMotionModel whose temporal blocks enable_free_noise replaced."""
    from diffusers.pipelines.free_noise_utils import AnimateDiffFreeNoiseMixin

    model = copy.deepcopy(reference)
    settings = types.SimpleNamespace(_free_noise_context_length=length, _free_noise_context_stride=stride,
                                     _free_noise_weighting_scheme=weighting, device=torch.device("cpu"),
                                     dtype=torch.float32)
    blocks = [*model.down_blocks, *model.up_blocks]
    if hasattr(model.mid_block, "motion_modules"):
        blocks.append(model.mid_block)
    for block in blocks:
        AnimateDiffFreeNoiseMixin._enable_free_noise_in_block(settings, block)
    return model


@pytest.mark.parametrize("weighting", ["pyramid", "flat", "delayed_reverse_sawtooth"])
@pytest.mark.parametrize("length", range(1, 10))
def test_window_weights_are_diffusers(length, weighting):
    from diffusers.models.attention import FreeNoiseTransformerBlock

    if weighting == "delayed_reverse_sawtooth" and length % 2:
        with pytest.raises(SdcliError, match="even context length"):
            ContextWindows(length, 1, weighting)
        return
    theirs = np.asarray(FreeNoiseTransformerBlock._get_frame_weights(None, length, weighting), dtype=np.float32)
    assert np.array_equal(ContextWindows(length, 1, weighting).weights(), theirs)


@pytest.mark.parametrize("length, stride, frames", WINDOWS, ids=str)
def test_window_spans_cover_every_frame(length, stride, frames):
    windows = ContextWindows(length, stride)
    spans = windows.spans(frames)
    assert all(stop - start == length for start, stop, _ in spans)
    kept = [frame for start, stop, first in spans for frame in range(first, stop)]
    assert set(kept) == set(range(frames))
    assert np.all(windows.totals(frames) > 0)


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("weighting", ["pyramid", "flat", "delayed_reverse_sawtooth"])
@pytest.mark.parametrize("length, stride, frames", WINDOWS, ids=str)
def test_network_matches_free_noise_blocks(motion_tiny, backend, weighting, length, stride, frames):
    adapter_config, reference, unet_state, adapter_state = motion_tiny
    model = motion.build(motion.TINY_UNET, adapter_config, unet_state, adapter_state, backend)
    if weighting == "delayed_reverse_sawtooth" and length % 2:  # diffusers' weights do not fit its window
        with pytest.raises(SdcliError, match="even context length"):
            model.with_context_windows(length, stride, weighting)
        return
    sample, context = motion.video_inputs(motion.TINY_UNET, frames, (8, 6), batch=1, seed=frames)
    timesteps = motion.TIMESTEPS[:1]
    expected = motion.reference_output(free_noise_reference(reference, length, stride, weighting), sample, timesteps,
                                       context)
    ours = motion.run(model.with_context_windows(length, stride, weighting), sample, timesteps, context)
    assert motion.relative_error(ours, expected) <= TOL["tiny"]


@pytest.fixture(scope="module")
def motion_tiny():
    adapter_config = motion.TINY_ADAPTERS["v3-like"]
    return (adapter_config, *motion.models(motion.TINY_UNET, adapter_config))


def test_windows_longer_than_the_clip_or_the_table_are_refused(motion_tiny):
    adapter_config, _, unet_state, adapter_state = motion_tiny
    model = motion.build(motion.TINY_UNET, adapter_config, unet_state, adapter_state)
    with pytest.raises(SdcliError, match="longer than the motion adapter's 16-frame window"):
        model.with_context_windows(17)
    sample, context = motion.video_inputs(motion.TINY_UNET, 5, (8, 8), batch=1)
    with pytest.raises(SdcliError, match="fewer than the context length 8"):
        motion.run(model.with_context_windows(8), sample, motion.TIMESTEPS[:1], context)


@pytest.mark.parametrize("length, stride, frames", [(4, 2, 13), (4, 3, 9), (16, 4, 50), (5, 5, 5)], ids=str)
def test_shuffled_noise_is_diffusers(length, stride, frames):
    """The same torch generator, drawing the noise and then each group's order, gives diffusers' latents."""
    from diffusers.pipelines.free_noise_utils import AnimateDiffFreeNoiseMixin

    settings = types.SimpleNamespace(_free_noise_context_length=length, _free_noise_context_stride=stride,
                                     _free_noise_noise_type="shuffle_context", vae_scale_factor=1)
    expected = AnimateDiffFreeNoiseMixin._prepare_latents_free_noise(
        settings, 2, 3, frames, 4, 5, torch.float32, torch.device("cpu"), torch.Generator().manual_seed(frames))
    generator = torch.Generator().manual_seed(frames)
    noise = torch.randn((2, 3, frames, 4, 5), generator=generator).numpy()
    ours = shuffle_context_frames(noise, length, stride, lambda n: torch.randperm(n, generator=generator).numpy())
    assert np.array_equal(ours, expected.numpy())


@pytest.fixture(scope="module")
def tiny_video(tmp_path_factory):
    return tiny_pipeline.make_tiny_video_model(tmp_path_factory.mktemp("free-noise"))


def test_long_clip_matches_diffusers(tiny_video):
    """A 13-frame clip through 8-frame windows, stride 3 (windows 0-7, 3-10 and 5-12, the last keeping 11 and 12),
    with guidance, against AnimateDiffPipeline with enable_free_noise and the same full-length latents."""
    reference, model_folder, adapter_folder = tiny_video
    options = {"beta_schedule": "linear", "clip_sample": False, "timestep_spacing": "linspace", "steps_offset": 1}
    latents = np.random.default_rng(11).standard_normal((1, 4, 13, 8, 8)).astype(np.float32)
    reference.scheduler = tiny_pipeline.scheduler_from_file("DDIMScheduler", tiny_pipeline.CONFIGS / "sd15", **options)
    reference.enable_free_noise(context_length=8, context_stride=3)
    try:
        with torch.no_grad():
            expected = reference(prompt="a corgi running on a beach", negative_prompt="blurry", num_frames=13,
                                 num_inference_steps=3, guidance_scale=7.5, latents=torch.from_numpy(latents),
                                 height=64, width=64, output_type="np").frames
    finally:
        reference.disable_free_noise()
    pipeline = load_video_pipeline(model_folder, adapter_folder, scheduler_options=options)
    params = VideoParams("a corgi running on a beach", "blurry", frames=13, steps=3, sampler="ddim",
                         guidance_scale=7.5, seed=0, width=64, height=64, context_length=8, context_stride=3)
    video = generate_video(pipeline, params, initial_noise=latents)
    ours = images_to_uint8(video.frames[0]).astype(np.int16)
    theirs = np.round(np.asarray(expected)[0] * 255).astype(np.int16)
    assert ours.shape == theirs.shape == (13, 64, 64, 3)
    assert np.max(np.abs(ours - theirs)) <= TOL["frame_levels"]


def test_seeded_long_clip_repeats_shuffled_noise(tiny_video):
    """Without given latents, the frames past the first window start from shuffled copies of earlier frames'
    noise, each clip from its own seed; the same seed gives the same clip."""
    _, model_folder, adapter_folder = tiny_video
    pipeline = load_video_pipeline(model_folder, adapter_folder)
    params = VideoParams("a cat", frames=10, steps=1, sampler="ddim", seed=5, width=64, height=64,
                         context_length=4, context_stride=2, batch_size=2)
    _, start = pipeline.seeded_noise(params, [5, 6])
    _, plain = pipeline.seeded_noise(params.with_(context_length=None), [5, 6])
    assert np.array_equal(start[:, :, :4], plain[:, :, :4])
    for first in (4, 6, 8):  # frames first, first + 1 are frames first - 4, first - 3 in some order
        for clip in range(2):
            group, earlier = start[clip, :, first:first + 2], start[clip, :, first - 4:first - 2]
            assert any(np.array_equal(group, earlier[:, order]) for order in ([0, 1], [1, 0]))
    assert not np.array_equal(start[0], start[1])
    assert np.array_equal(generate_video(pipeline, params).frames, generate_video(pipeline, params).frames)


def test_frames_beyond_the_window_name_the_option(tiny_video):
    _, model_folder, adapter_folder = tiny_video
    pipeline = load_video_pipeline(model_folder, adapter_folder)
    with pytest.raises(SdcliError, match="--context-length"):
        pipeline.prepare(VideoParams("a cat", frames=33, width=64, height=64))
    with pytest.raises(SdcliError, match="longer than the motion adapter's 32-frame window"):
        pipeline.prepare(VideoParams("a cat", frames=40, width=64, height=64, context_length=33))
    with pytest.raises(SdcliError, match="fewer than the context length"):
        VideoParams("a cat", frames=8, context_length=16).validate()
