"""SkyReels-V2 diffusion forcing against diffusers on tiny random models: the transformer against
SkyReelsV2Transformer3DModel (one timestep per clip or per latent frame, with and without the frame-rate embedding,
block-causal), the schedule against the pipeline's generate_timestep_matrix, and whole videos against
SkyReelsV2DiffusionForcingPipeline fed the same noise (synchronous, asynchronous, long videos window by window with
addnoise_condition), its frames emitted a window at a time; the defaults, the refusals and the family's detection."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch/diffusers are the SkyReels-V2 reference")
pytest.importorskip("diffusers")

import reference_models as ref  # noqa: E402
import wan_models  # noqa: E402

import sdcli  # noqa: E402
from sdcli.config import WanTransformerConfig  # noqa: E402
from sdcli.errors import SdcliError  # noqa: E402
from sdcli.io.weights import ArraySource, load_network  # noqa: E402
from sdcli.nn.dit_wan import WanTransformer3DModel, float64_timestep_features  # noqa: E402
from sdcli.ops import get_ops  # noqa: E402
from sdcli.pipelines.image import StepRecord  # noqa: E402
from sdcli.pipelines.skyreels import (DiffusionForcing, SkyReelsTextToVideo, latent_count,  # noqa: E402
                                      load_skyreels_pipeline)
from sdcli.pipelines.streaming import ChunkFrames  # noqa: E402
from sdcli.sampling.diffusion_forcing import SteppedSampler, forcing_schedule  # noqa: E402
from sdcli.sampling.flow import flow_plan  # noqa: E402

TOL = {
    # transformer: max |ours - diffusers| / max |diffusers|, float32 on both sides; the bound is 1e-3.
    # Measured about 2e-7: a frame's timestep or the frame-rate vectors taken wrongly show far above this.
    "transformer": 2e-5,
    # the timestep features: the same float64 sines and cosines, rounded once on both sides.
    "features": 0.0,
    # whole videos in 8-bit levels, the bound (frames in [0, 1] times 255). Measured 0.000.
    "levels": 2.0,
    # the video's latents as diffusers decodes them, max |diff| / max |diffusers|: the tiny autoencoder's frames span
    # little of [0, 1] (0.46 to 0.52), so the latents are what tells a wrong schedule, frame rate or re-noising
    # (those move them by 3e-3 to 6e-2). Float32 throughout; measured about 1e-6.
    "latents": 1e-4,
}
TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32, inject_sample_info=True)
PROMPT = "a red fox trotting through fresh snow at dawn"
NEGATIVE = "blurry, static"


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    assert ours.shape == reference.shape
    return float(np.max(np.abs(ours.astype(np.float64) - reference)) / np.max(np.abs(reference)))


# -- the transformer ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_transformer():
    from diffusers import SkyReelsV2Transformer3DModel

    torch.manual_seed(0)
    model = SkyReelsV2Transformer3DModel(**TINY).eval()
    ref.randomise_norms(model, torch.Generator().manual_seed(1), bias_scale=0.05)
    state = {name: tensor.detach().numpy() for name, tensor in model.state_dict().items()}
    return model, state


def build(config: dict, state: dict) -> WanTransformer3DModel:
    wan_config = WanTransformerConfig.from_diffusers({"_class_name": "SkyReelsV2Transformer3DModel", **config})
    return load_network(lambda params: WanTransformer3DModel(params, wan_config), ArraySource(state), get_ops("cpu"))


def reference_velocity(model, x, timesteps, text, fps: list[int] | None, blocks: int) -> np.ndarray:
    """diffusers' output, one video at a time where the frame-rate embedding meets per-frame timesteps (its
    broadcast there takes a batch of one)."""
    per_frame = timesteps.ndim == 2
    model.register_to_config(num_frame_per_block=blocks)
    try:
        with torch.no_grad():
            if per_frame and fps is not None and len(x) > 1:
                return np.concatenate([reference_velocity(model, x[i:i + 1], timesteps[i:i + 1], text[i:i + 1],
                                                          fps[i:i + 1], blocks) for i in range(len(x))])
            return model(torch.from_numpy(x), torch.from_numpy(timesteps), torch.from_numpy(text),
                         enable_diffusion_forcing=per_frame, fps=fps, return_dict=False)[0].numpy()
    finally:
        model.register_to_config(num_frame_per_block=1)


@pytest.mark.parametrize("per_frame, fps, blocks", [
    (False, 24, 1), (False, 16, 2), (True, 24, 1), (True, 16, 2), (True, None, 3),
])
def test_transformer_matches_diffusers(tiny_transformer, per_frame, fps, blocks):
    """Scalar and per-frame timesteps (integers as the pipeline gives them, 999 for a frame not started, the
    re-noised level of a frame taken over), the two frame-rate rows and none (a model without the embedding
    ignores it, as diffusers), and the block-causal mask of num_frame_per_block."""
    model, state = tiny_transformer
    frames = 6
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 4, frames, 4, 6)).astype(np.float32)
    text = rng.standard_normal((2, 7, 16)).astype(np.float32)
    timesteps = (np.array([[999, 999, 941, 941, 20, 0], [0, 0, 800, 800, 999, 999]]) if per_frame
                 else np.array([999, 417]))
    config = dict(TINY, inject_sample_info=fps is not None)
    if fps is None:
        state = {name: value for name, value in state.items() if not name.startswith("fps_")}
        model = type(model)(**config).eval()
        model.load_state_dict({name: torch.from_numpy(value) for name, value in state.items()})
    expected = reference_velocity(model, x, timesteps, text, None if fps is None else [0 if fps == 16 else 1] * 2,
                                  blocks)
    ours = build(config, state)
    ops = ours.ops
    result = ops.to_host(ours(ops.from_host(x), timesteps, ops.from_host(text), frames_per_block=blocks, fps=fps))
    assert relative_error(result, expected) <= TOL["transformer"]


def test_real_width_two_blocks():
    """SkyReels-V2-DF-1.3B's widths (12 heads of 128, feed-forward 8960, text 4096, the frame-rate embedding) with
    two blocks, a timestep per frame and blocks of 2 frames."""
    from diffusers import SkyReelsV2Transformer3DModel

    config = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                  out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=2, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", eps=1e-6, inject_sample_info=True)
    torch.manual_seed(6)
    model = SkyReelsV2Transformer3DModel(**config).eval()
    ref.randomise_norms(model, torch.Generator().manual_seed(7), bias_scale=0.05)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((1, 16, 4, 6, 10)).astype(np.float32)
    text = rng.standard_normal((1, 23, 4096)).astype(np.float32)
    timesteps = np.array([[20, 20, 995, 995]])
    expected = reference_velocity(model, x, timesteps, text, [1], blocks=2)
    ours = build(config, {name: tensor.detach().numpy() for name, tensor in model.state_dict().items()})
    ops = ours.ops
    result = ops.to_host(ours(ops.from_host(x), timesteps, ops.from_host(text), frames_per_block=2, fps=24))
    assert relative_error(result, expected) <= TOL["transformer"]


def test_num_frame_per_block_of_the_config_is_the_default(tiny_transformer):
    model, state = tiny_transformer
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 4, 4, 2, 4)).astype(np.float32)
    text = rng.standard_normal((1, 5, 16)).astype(np.float32)
    timesteps = np.array([[999, 999, 500, 500]])
    expected = reference_velocity(model, x, timesteps, text, [1], blocks=2)
    ours = build(dict(TINY, num_frame_per_block=2), state)
    ops = ours.ops
    assert relative_error(ops.to_host(ours(ops.from_host(x), timesteps, ops.from_host(text), fps=24)),
                          expected) <= TOL["transformer"]
    with pytest.raises(SdcliError, match="conditioned on the frame rate"):
        ours(ops.from_host(x), timesteps, ops.from_host(text))


def test_timestep_features_are_diffusers():
    from diffusers.models.embeddings import get_1d_sincos_pos_embed_from_grid

    timesteps = np.concatenate([np.arange(0, 1001), [417.25, 999.999]])
    expected = get_1d_sincos_pos_embed_from_grid(256, torch.from_numpy(timesteps), flip_sin_to_cos=True).float()
    assert np.max(np.abs(float64_timestep_features(timesteps, 256) - expected.numpy())) <= TOL["features"]
    for name, float64 in (("SkyReelsV2Transformer3DModel", True), ("WanTransformer3DModel", False)):
        assert WanTransformerConfig.from_diffusers({"_class_name": name}).float64_timestep_features is float64


# -- the schedule ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("blocks, steps, ar_step, ready", [(1, 4, 0, 0), (5, 30, 5, 0), (4, 3, 1, 1), (3, 5, 2, 2),
                                                           (6, 4, 0, 3), (3, 2, 7, 0)])
def test_schedule_is_generate_timestep_matrix(blocks, steps, ar_step, ready):
    from diffusers import SkyReelsV2DiffusionForcingPipeline

    block = 2
    template = torch.arange(steps * 100, 0, -100)
    step_matrix, step_index, update_mask, intervals = SkyReelsV2DiffusionForcingPipeline.generate_timestep_matrix(
        None, blocks * block, template, blocks * block, ar_step, ready * block, block)
    schedule = forcing_schedule(blocks, steps, ar_step, ready)
    assert np.array_equal(np.repeat(schedule.progress, block, axis=1), step_index.numpy())
    assert np.array_equal(np.repeat(schedule.moves, block, axis=1), update_mask.numpy())
    assert intervals == [(0, blocks * block)] * schedule.rows
    timesteps = np.stack([schedule.timesteps(row, template.numpy(), block) for row in range(schedule.rows)])
    assert np.array_equal(timesteps, step_matrix.numpy())


def test_stepped_sampler_is_the_sampler():
    """Advanced from outside, without overwriting its start, the sampler gives what it gives over a denoiser; with
    it (the pipeline's view), only from the second step's correction on do they part."""
    plan = flow_plan("unipc", wan_models.SKYREELS_SCHEDULER, 5)
    x0 = np.random.default_rng(5).standard_normal((1, 3, 2, 4)).astype(np.float32)
    velocity = lambda x, sigma: np.float32(0.5) * x - np.float32(sigma)  # noqa: E731  an analytic model

    from sdcli.sampling.flow import FlowDenoiser

    plain = [step.x for step in plan.sample(FlowDenoiser(lambda x, t: velocity(x, t[0] / 1000), plan), x0.copy())]
    for overwrite in (False, True):
        sampler, steps = SteppedSampler(plan, x0.copy(), overwrite_start=overwrite), []
        for i in range(plan.steps):
            steps.append(sampler.step(velocity(sampler.x, plan.timesteps[i] / 1000)).x)
        same = [np.array_equal(a, b) for a, b in zip(steps, plain)]
        assert same == ([True] * 5 if not overwrite else [True, False, False, False, False])


# -- whole videos ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_skyreels(tmp_path_factory):
    import diffusers.pipelines.skyreels_v2.pipeline_skyreels_v2_diffusion_forcing as module

    folder = tmp_path_factory.mktemp("skyreels") / "tiny-skyreels"
    reference = wan_models.make_tiny_skyreels(folder)
    # the pipeline cleans prompts with ftfy unguarded (WanPipeline skips it without ftfy); these prompts are plain
    had = hasattr(module, "ftfy")
    original = getattr(module, "ftfy", None)
    module.ftfy = getattr(module, "ftfy", types.SimpleNamespace(fix_text=lambda text: text))
    yield reference, folder
    if had:
        module.ftfy = original
    else:
        del module.ftfy


@pytest.fixture(scope="module")
def pipeline(tiny_skyreels):
    return sdcli.load_video_pipeline(str(tiny_skyreels[1]))


class Replay:
    """The noise diffusers drew, handed out in the order it drew it."""

    def __init__(self, draws: list[np.ndarray]):
        self.draws = list(draws)

    def __call__(self, shape):
        draw = self.draws.pop(0)
        assert draw.shape == shape
        return draw


def reference_video(reference, **options):
    """diffusers' frames (B, F, H, W, 3) in [0, 1], the latents it decoded (denormalised) and the noise it drew: each
    window's starting latents from its generator, the re-noising of the frames taken over from torch's."""
    draws, decoded = [], []
    prepare, randn_like, decode = reference.prepare_latents, torch.randn_like, reference.vae.decode

    def recording_prepare(*args, **kwargs):
        result = prepare(*args, **kwargs)
        draws.append(result[0].clone())
        return result

    def recording_randn_like(tensor, *args, **kwargs):
        draws.append(randn_like(tensor, *args, **kwargs))
        return draws[-1].clone()

    def recording_decode(z, *args, **kwargs):
        decoded.append(z.clone())
        return decode(z, *args, **kwargs)

    reference.prepare_latents, reference.vae.decode, torch.randn_like = recording_prepare, recording_decode, \
        recording_randn_like
    try:
        frames = reference(generator=torch.Generator().manual_seed(0), output_type="np", **options).frames
    finally:
        del reference.prepare_latents, reference.vae.decode
        torch.randn_like = randn_like
        reference.transformer.register_to_config(num_frame_per_block=1)  # causal_block_size sets it for good
    return frames, decoded[0].numpy(), [draw.numpy() for draw in draws]


def denormalised(pipeline, latents: np.ndarray) -> np.ndarray:
    ops = pipeline.vae.ops
    return ops.to_host(pipeline.vae.denormalize(ops.from_host(latents)))


@pytest.mark.parametrize("frames, steps, fps, forcing", [
    (9, 3, 24, DiffusionForcing(ar_step=0)),  # synchronous, one window
    (21, 3, 24, DiffusionForcing(ar_step=2, causal_block_size=2)),  # asynchronous: 3 blocks of 2 latent frames
    (29, 3, 16, DiffusionForcing(base_num_frames=13, overlap_history=5, addnoise_condition=20)),  # 3 windows
    # 5 windows of 2 blocks, the 3 frames taken over cut to 2 (one block), re-noised to 35.5 (timestep 35)
    (29, 2, 24, DiffusionForcing(base_num_frames=13, overlap_history=9, ar_step=1, causal_block_size=2,
                                 addnoise_condition=35.5)),
], ids=["synchronous", "asynchronous", "long", "long-asynchronous"])
def test_videos_match_diffusion_forcing_pipeline(tiny_skyreels, pipeline, frames, steps, fps, forcing):
    reference, _ = tiny_skyreels
    options = {name: getattr(forcing, name) for name in ("base_num_frames", "overlap_history", "ar_step",
                                                         "causal_block_size", "addnoise_condition")
               if getattr(forcing, name) is not None}
    expected, expected_latents, draws = reference_video(
        reference, prompt=PROMPT, negative_prompt=NEGATIVE, height=32, width=48, num_frames=frames,
        num_inference_steps=steps, guidance_scale=5.0, fps=fps, **options)
    params = sdcli.VideoParams(PROMPT, negative_prompt=NEGATIVE, frames=frames, width=48, height=32, steps=steps,
                               guidance_scale=5.0, fps=fps, seed=1)
    records = list(pipeline.run(params, forcing, noise=Replay(draws)))
    chunks = [record for record in records if isinstance(record, ChunkFrames)]
    layout = pipeline.layout(pipeline.prepare(params)[0], forcing)
    # each window's frames as soon as it is finished: its steps, then its chunk, then the next window's steps
    kinds = [type(record) for record in records]
    expected_kinds = []
    for schedule in layout.schedules:
        expected_kinds += [StepRecord] * schedule.rows + [ChunkFrames]
    assert kinds == expected_kinds and [chunk.index for chunk in chunks] == list(range(len(layout.windows)))
    counts = [chunk.frames.shape[1] for chunk in chunks]
    assert counts == [1 + 4 * (chunks[0].latents.shape[2] - 1)] + [4 * c.latents.shape[2] for c in chunks[1:]]
    assert [chunk.first_frame for chunk in chunks] == list(np.cumsum([0] + counts[:-1]))
    video = np.concatenate([chunk.frames for chunk in chunks], axis=1)  # (B, F, 3, H, W) in [-1, 1]
    ours = np.clip(video.transpose(0, 1, 3, 4, 2) / 2 + 0.5, 0, 1)
    assert ours.shape == expected.shape == (1, frames, 32, 48, 3)
    assert float(np.abs(ours.astype(np.float64) - expected).max() * 255) <= TOL["levels"]
    latents = np.concatenate([chunk.latents for chunk in chunks], axis=2)
    assert relative_error(denormalised(pipeline, latents), expected_latents) <= TOL["latents"]


def test_defaults_are_the_examples(pipeline):
    params, plan = pipeline.prepare(sdcli.VideoParams(PROMPT))
    assert (params.width, params.height, params.frames, params.fps, params.steps) == (960, 544, 97, 24, 30)
    assert (params.guidance_scale, params.flow_shift, params.sampler, params.negative_prompt) == (6.0, 8.0, "unipc", "")
    layout = pipeline.layout(params)
    assert layout.forcing == DiffusionForcing(97, 17, 0, 1, 20) and len(layout.windows) == 1
    assert pipeline.layout(params, DiffusionForcing(ar_step=5)).block == 5
    # diffusers' docs: 257 frames, windows of 97 overlapping by 17 -> three windows of 25 latent frames
    long = pipeline.layout(params.with_(frames=257), DiffusionForcing(ar_step=5))
    assert [(w.frames, w.prefix, w.kept_from) for w in long.windows] == [(25, 0, 0), (25, 5, 5), (25, 5, 5)]
    # 30 steps + 4 blocks lagging 5 each; later windows: the block taken over is done, 3 lag behind the next
    assert [schedule.rows for schedule in long.schedules] == [50, 45, 45]
    assert sum(w.new_frames for w in long.windows) == latent_count(257)


def test_refusals_are_one_line(pipeline):
    params = sdcli.VideoParams(PROMPT, frames=81, width=32, height=32, steps=2)
    with pytest.raises(SdcliError, match=r"window of 21 latent frames, not whole causal blocks of 5: use --frames 77$"):
        pipeline.layout(pipeline.prepare(params)[0], DiffusionForcing(ar_step=5))
    with pytest.raises(SdcliError, match=r"base_num_frames 93 is 24 latent frames: give one of whole blocks"):
        pipeline.layout(pipeline.prepare(params.with_(frames=201))[0], DiffusionForcing(93, ar_step=5))
    with pytest.raises(SdcliError, match="runs UniPC"):
        pipeline.prepare(params.with_(sampler="euler"))
    with pytest.raises(SdcliError, match="overlap_history 97 leaves nothing new"):
        pipeline.layout(pipeline.prepare(params.with_(frames=121))[0], DiffusionForcing(overlap_history=97))
    for wrong in (DiffusionForcing(ar_step=-1), DiffusionForcing(causal_block_size=0),
                  DiffusionForcing(addnoise_condition=float("nan")), DiffusionForcing(base_num_frames=0)):
        with pytest.raises(SdcliError):
            pipeline.layout(pipeline.prepare(params)[0], wrong)


def test_family_preset_and_seeded_runs(tiny_skyreels, pipeline):
    """The folder reads as architecture skyreels-v2-df of the Wan family, the video dispatch loads it, Wan's own
    loader refuses it by name; the preset; a seeded video repeats, and generate_video puts its chunks together."""
    _, folder = tiny_skyreels
    checkpoint = sdcli.open_checkpoint(str(folder))
    assert checkpoint.family == "skyreels-v2-df" and checkpoint.model_family.name == "wan"
    assert isinstance(pipeline, SkyReelsTextToVideo) and isinstance(load_skyreels_pipeline(str(folder)),
                                                                     SkyReelsTextToVideo)
    assert checkpoint.config("transformer").inject_sample_info
    with pytest.raises(SdcliError, match="a SkyReels-V2 one"):
        from sdcli.pipelines.wan import load_wan_pipeline
        load_wan_pipeline(checkpoint)
    preset = sdcli.models.PRESETS["skyreels-v2-df-1.3b-540p"]
    assert preset.repo_id == "Skywork/SkyReels-V2-DF-1.3B-540P-Diffusers" and preset.family == "skyreels-v2-df"
    params = sdcli.VideoParams(PROMPT, frames=9, width=16, height=16, steps=2, seed=7)
    video = sdcli.generate_video(pipeline, params)
    chunks = [r.frames for r in pipeline.run(params) if isinstance(r, ChunkFrames)]
    assert video.frames.shape == (1, 9, 3, 16, 16) and np.array_equal(video.frames, np.concatenate(chunks, axis=1))
    assert {"text_encoding_s", "denoising_s", "decode_s"} <= set(video.timings) and video.timings["steps"] == 2
    assert not np.array_equal(video.frames, sdcli.generate_video(pipeline, params.with_(seed=8)).frames)
    start = np.random.default_rng(9).standard_normal((1, 16, 3, 2, 2)).astype(np.float32)  # the one window's noise
    given = sdcli.generate_video(pipeline, params, initial_noise=start)
    assert np.array_equal(given.frames, pipeline.generate(params, noise=lambda shape: start).frames)
    with pytest.raises(SdcliError, match=r"noise drawn must have shape \(1, 16, 3, 2, 2\)"):
        sdcli.generate_video(pipeline, params, initial_noise=start[:, :, :2])


# -- the command ----------------------------------------------------------------------------------------------------

def test_video_command_writes_each_window(tiny_skyreels, pipeline, tmp_path):
    """``sdcli video`` on a SkyReels-V2 folder: a long video in windows, the PNG frames of the first window written
    before the second starts, the same frames as the library makes; the DF options reach the run."""
    from click.testing import CliRunner
    from PIL import Image

    from sdcli.cli import main
    from sdcli.pipelines.skyreels import DiffusionForcing
    import sdcli.pipelines.skyreels as skyreels_module

    _, folder = tiny_skyreels
    params = sdcli.VideoParams(PROMPT, frames=17, width=16, height=16, steps=2, seed=3)
    forcing = DiffusionForcing(base_num_frames=9, overlap_history=5, addnoise_condition=20)
    expected = pipeline.generate(params, forcing).frames[0]  # (F, 3, H, W)
    seen = []
    original_run = skyreels_module.SkyReelsTextToVideo.run

    def watched(self, *args, **kwargs):
        for item in original_run(self, *args, **kwargs):
            if isinstance(item, ChunkFrames):
                seen.append(len(list((tmp_path / "frames").glob("*.png"))))
            yield item

    skyreels_module.SkyReelsTextToVideo.run = watched
    try:
        result = CliRunner().invoke(main, [
            "video", "-m", str(folder), "--stream", "-p", PROMPT, "--frames", "17", "-W", "16", "-H", "16",
            "--steps", "2", "--seed", "3", "--base-num-frames", "9", "--overlap-history", "5",
            "--addnoise-condition", "20", "-o", str(tmp_path / "frames") + "/", "--json"], catch_exceptions=False)
    finally:
        skyreels_module.SkyReelsTextToVideo.run = original_run
    assert result.exit_code == 0, result.output
    pngs = sorted((tmp_path / "frames").glob("frame_*.png"))
    assert len(pngs) == 17 and seen[:2] == [0, 9]  # the first window's 9 frames are out before the second's come
    written = np.stack([np.asarray(Image.open(p)) for p in pngs])
    np.testing.assert_array_equal(written, sdcli.images_to_uint8(expected))
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["seed"] == 3 and record["timings"]["steps"] > 0


@pytest.mark.parametrize("args, message", [
    (["--ar-step", "1", "-m", "sd15", "--motion-adapter", "x"], "apply to SkyReels-V2 diffusion forcing"),
    (["--chunks", "2"], "--chunks applies to streaming models"),
])
def test_forcing_options_elsewhere_are_refused(tiny_skyreels, args, message):
    from click.testing import CliRunner

    from sdcli.cli import main

    model = [] if "-m" in args else ["-m", str(tiny_skyreels[1])]
    result = CliRunner().invoke(main, ["video", *model, "-p", PROMPT, *args], catch_exceptions=False)
    assert result.exit_code == 2 and message in result.output, result.output
