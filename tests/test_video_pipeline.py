"""Text to video against diffusers' AnimateDiffPipeline on a tiny random-weight SD 1.x model and motion adapter:
the same initial latents give frames within 2/255 of diffusers' (output_type="np"), with DDIM as AnimateDiff's
examples configure it (linspace spacing, where diffusers steps each timestep t to the noise level of t - T // N),
Euler with trailing spacing and no guidance (AnimateDiff-Lightning's settings) and LCM, also with a UNet LoRA merged
as AnimateLCM uses its own. Then what the library does with a motion-adapter preset (its settings, and explicit
values over them) and with a model or adapter of another base (refused in one line before anything loads)."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch/diffusers are the video reference")
pytest.importorskip("diffusers")

import reference_models  # noqa: E402
import tiny_pipeline  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from sdcli.config import MotionAdapterConfig, UNetConfig  # noqa: E402
from sdcli.errors import CheckpointError, SdcliError  # noqa: E402
from sdcli.io.checkpoint import open_checkpoint  # noqa: E402
from sdcli.io.media import images_to_uint8  # noqa: E402
from sdcli import VideoParams, generate_video, load_video_pipeline  # noqa: E402
from sdcli.sampling.plans import SAMPLERS  # noqa: E402

TOL = {
    # |ours - diffusers| per channel, in 8-bit steps (the bound): both decode float32 frames and round
    "frame_levels": 2,
}
# the scheduler settings of diffusers' AnimateDiff examples, and of AnimateDiff-Lightning's model card
ANIMATEDIFF_DDIM = {"beta_schedule": "linear", "clip_sample": False, "timestep_spacing": "linspace",
                    "steps_offset": 1}
LIGHTNING_EULER = {"timestep_spacing": "trailing", "beta_schedule": "linear"}
# guoyww/animatediff-motion-adapter-sdxl-beta's config.json: three levels of SDXL's channels, no mid-block module
SDXL_ADAPTER_CONFIG = {"block_out_channels": [320, 640, 1280], "motion_layers_per_block": 2,
                       "motion_mid_block_layers_per_block": 1, "motion_max_seq_length": 32,
                       "motion_norm_num_groups": 32, "motion_num_attention_heads": 8,
                       "motion_transformer_layers_per_block": 1, "motion_transformer_layers_per_mid_block": 1,
                       "use_motion_mid_block": False, "conv_in_channels": None}
CASES = {
    # name: (sdcli sampler, diffusers scheduler class, scheduler options, steps, guidance, frames)
    "ddim": ("ddim", "DDIMScheduler", ANIMATEDIFF_DDIM, 4, 7.5, 5),
    "euler": ("euler", "EulerDiscreteScheduler", LIGHTNING_EULER, 4, 1.0, 6),
    # one step: LCM's later steps add noise that diffusers draws from torch's generator
    "lcm": ("lcm", "LCMScheduler", {"beta_schedule": "linear"}, 1, 1.0, 3),
}


@pytest.fixture(scope="module")
def tiny_video(tmp_path_factory):
    """(diffusers AnimateDiffPipeline, model folder, adapter folder) on random weights."""
    return tiny_pipeline.make_tiny_video_model(tmp_path_factory.mktemp("animatediff"))


def reference_frames(reference, scheduler_class: str, options: dict, prompt: str, negative: str, steps: int,
                     guidance: float, latents: np.ndarray) -> np.ndarray:
    """diffusers' frames (B, F, H, W, 3) in [0, 1] from unit-variance ``latents`` (B, 4, F, h, w)."""
    reference.scheduler = tiny_pipeline.scheduler_from_file(scheduler_class, tiny_pipeline.CONFIGS / "sd15",
                                                            **options)
    with torch.no_grad():
        result = reference(prompt=[prompt] * len(latents), negative_prompt=[negative] * len(latents),
                           num_frames=latents.shape[2], num_inference_steps=steps, guidance_scale=guidance,
                           latents=torch.from_numpy(latents), height=latents.shape[3] * 8,
                           width=latents.shape[4] * 8, output_type="np")
    return np.asarray(result.frames)


@pytest.mark.parametrize("case", sorted(CASES))
def test_frames_match_diffusers(tiny_video, case):
    reference, model_folder, adapter_folder = tiny_video
    sampler, scheduler_class, options, steps, guidance, frames = CASES[case]
    latents = np.random.default_rng(7).standard_normal((2, 4, frames, 8, 8)).astype(np.float32)
    prompt, negative = "a corgi running on a beach", "blurry"
    expected = reference_frames(reference, scheduler_class, options, prompt, negative, steps, guidance, latents)
    pipeline = load_video_pipeline(model_folder, adapter_folder, scheduler_options=options)
    params = VideoParams(prompt, negative, frames=frames, steps=steps, sampler=sampler, guidance_scale=guidance,
                         seed=0, width=64, height=64, batch_size=2, decode_chunk=4)
    video = generate_video(pipeline, params, initial_noise=latents)
    assert video.frames.shape == (2, frames, 3, 64, 64)
    ours = np.stack([images_to_uint8(clip) for clip in video.frames])  # (B, F, H, W, 3)
    theirs = np.round(expected * 255).astype(np.int16)
    assert ours.shape == theirs.shape
    assert np.max(np.abs(ours.astype(np.int16) - theirs)) <= TOL["frame_levels"]


def test_decode_chunk_does_not_change_the_frames(tiny_video):
    _, model_folder, adapter_folder = tiny_video
    pipeline = load_video_pipeline(model_folder, adapter_folder, scheduler_options=ANIMATEDIFF_DDIM)
    params = VideoParams("a cat", frames=5, steps=2, sampler="ddim", seed=3, width=64, height=64)
    whole = generate_video(pipeline, params.with_(decode_chunk=16))
    chunked = generate_video(pipeline, params.with_(decode_chunk=2))
    assert np.array_equal(whole.frames, chunked.frames)


def test_bad_video_parameters_are_refused(tiny_video):
    _, model_folder, adapter_folder = tiny_video
    pipeline = load_video_pipeline(model_folder, adapter_folder)
    with pytest.raises(SdcliError, match="at most 32 frames at once; use --context-length for longer clips"):
        pipeline.prepare(VideoParams("a cat", frames=33))
    with pytest.raises(SdcliError, match="frames must be a positive integer"):
        pipeline.prepare(VideoParams("a cat", frames=0))
    with pytest.raises(SdcliError, match="width must be a positive multiple of 8"):
        pipeline.prepare(VideoParams("a cat", width=60))


# -- motion-adapter presets: their settings, from the library ------------------------------------------------------

@pytest.fixture
def preset_weights(tiny_video, tmp_path, monkeypatch):
    """A weights folder ($SDCLI_WEIGHTS) holding the tiny adapter as the animatediff-lightning and animatelcm
    presets are downloaded, and a copy of the lightning file under a name that is no preset's."""
    _, _, adapter_folder = tiny_video
    monkeypatch.setenv("SDCLI_WEIGHTS", str(tmp_path / "weights"))
    lightning = tiny_pipeline.install_adapter_preset(adapter_folder, tmp_path / "weights", "animatediff-lightning")
    tiny_pipeline.install_adapter_preset(adapter_folder, tmp_path / "weights", "animatelcm",
                                         tiny_unet_lora(tiny_video))
    plain = tmp_path / "plain.safetensors"
    plain.write_bytes(lightning.read_bytes())
    return plain


def test_a_preset_brings_its_sampler_steps_guidance_and_scheduler(tiny_video, preset_weights):
    """animatediff-lightning by name: Euler over trailing timesteps and linear betas, 4 steps, no guidance, as its
    model card runs it; the same clip as the same file under another name with all of that given explicitly."""
    _, model_folder, _ = tiny_video
    pipeline = load_video_pipeline(model_folder, "animatediff-lightning")
    assert pipeline.motion_adapter.preset.name == "animatediff-lightning"
    params, plan = pipeline.prepare(VideoParams("a corgi", frames=3, width=64, height=64, seed=5))
    assert (params.sampler, params.steps, params.guidance_scale, params.timestep_spacing) == ("euler", 4, 1.0,
                                                                                           "trailing")
    assert pipeline.scheduler_config["beta_schedule"] == "linear"
    expected = SAMPLERS["euler"].plan({**tiny_pipeline.scheduler_config(tiny_pipeline.CONFIGS / "sd15"),
                                       **LIGHTNING_EULER}, 4)
    assert np.array_equal(plan.sigmas, expected.sigmas) and np.array_equal(plan.timesteps, expected.timesteps)

    clip = generate_video(pipeline, VideoParams("a corgi", frames=3, width=64, height=64, seed=5))
    explicit = load_video_pipeline(model_folder, preset_weights, scheduler_options=LIGHTNING_EULER)
    assert explicit.motion_adapter.preset is None
    same = generate_video(explicit, VideoParams("a corgi", frames=3, width=64, height=64, seed=5, sampler="euler",
                                                steps=4, guidance_scale=1.0))
    assert np.array_equal(clip.frames, same.frames)
    plain, _ = explicit.prepare(VideoParams("a corgi"))  # a file that is no preset: AnimateDiff's DDIM
    assert (plain.sampler, plain.steps, plain.guidance_scale) == ("ddim", 50, 7.5)


def tiny_unet_lora(tiny_video) -> dict[str, np.ndarray]:
    """A random kohya-named LoRA over every linear and convolution weight of the tiny UNet (AnimateLCM's naming)."""
    _, model_folder, _ = tiny_video
    source = open_checkpoint(model_folder).source("unet")
    shapes = {name: tuple(source.shape(name)) for name in source.keys()}
    return reference_models.kohya_lora(shapes, reference_models.lora_targets(shapes), alphas="same")


def test_the_animatelcm_preset_merges_its_lora(tiny_video, preset_weights):
    """animatelcm by name merges its LoRA file at 0.8: the clip of loras=[(file, 0.8)], not that of no LoRA."""
    _, model_folder, _ = tiny_video
    params = VideoParams("a corgi", frames=3, width=64, height=64, seed=5, steps=2)
    by_name = generate_video(load_video_pipeline(model_folder, "animatelcm"), params)
    lora = preset_weights.parent / "weights" / "animatelcm" / "AnimateLCM_sd15_t2v_lora.safetensors"
    explicit = generate_video(load_video_pipeline(model_folder, "animatelcm", loras=[(lora, 0.8)]), params)
    plain = generate_video(load_video_pipeline(model_folder, "animatelcm", loras=()), params)
    assert np.array_equal(by_name.frames, explicit.frames)
    assert not np.array_equal(by_name.frames, plain.frames)


def test_explicit_values_override_a_presets(tiny_video, preset_weights):
    _, model_folder, _ = tiny_video
    pipeline = load_video_pipeline(model_folder, "animatediff-lightning")
    params, _ = pipeline.prepare(VideoParams("a corgi", steps=2, guidance_scale=1.5, timestep_spacing="linspace"))
    assert (params.sampler, params.steps, params.guidance_scale, params.timestep_spacing) == ("euler", 2, 1.5,
                                                                                           "linspace")
    params, _ = pipeline.prepare(VideoParams("a corgi", sampler="ddim"))
    assert (params.sampler, params.steps, params.guidance_scale) == ("ddim", 4, 1.0)  # the distilled step count
    lcm = load_video_pipeline(model_folder, "animatelcm")
    params, _ = lcm.prepare(VideoParams("a corgi"))
    assert (params.sampler, params.steps, params.guidance_scale) == ("lcm", 6, 1.5)
    assert lcm.scheduler_config["beta_schedule"] == "linear"
    assert lcm.motion_adapter.lora_path == preset_weights.parent / "weights" / "animatelcm" / \
        "AnimateLCM_sd15_t2v_lora.safetensors"
    assert lcm.motion_adapter.preset.lora_scale == 0.8


def test_an_sd2_model_is_refused(tiny_video, tmp_path):
    _, model_folder, adapter_folder = tiny_video
    sd2 = tiny_pipeline.as_sd2_folder(model_folder, tmp_path / "sd2")
    with pytest.raises(SdcliError, match=r"is an SD 2\.x model; AnimateDiff's motion adapters animate SD 1\.x"):
        load_video_pipeline(sd2, adapter_folder)


def test_an_adapter_for_another_unet_is_refused_before_anything_loads(tiny_video, tmp_path, monkeypatch):
    """An SDXL adapter's config (guoyww/animatediff-motion-adapter-sdxl-beta: three levels, no mid block) on an
    SD 1.x UNet, and an adapter whose channels are not the UNet's: one line, before any network is built."""
    _, model_folder, adapter_folder = tiny_video
    import sdcli.pipelines.video as video

    monkeypatch.setattr(video, "load_prompt_encoder", lambda *a, **k: pytest.fail("loaded before the check"))
    cases = {"sdxl": (SDXL_ADAPTER_CONFIG, "[320, 640, 1280] channels and [2, 2, 2] layers per level (3 levels, an "
                                           "SDXL motion adapter)"),
             "narrow": ({**tiny_pipeline.TINY_ADAPTER_CONFIG, "block_out_channels": [32, 32]},
                        "[32, 32] channels and [1, 1] layers per level (2 levels)")}
    for name, (config, adapter_layout) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"_class_name": "MotionAdapter", **config}))
        (folder / "diffusion_pytorch_model.safetensors").write_bytes(
            (adapter_folder / "diffusion_pytorch_model.safetensors").read_bytes())
        with pytest.raises(CheckpointError) as error:
            load_video_pipeline(model_folder, folder)
        message = str(error.value)
        assert "\n" not in message and message.startswith(f"{folder} was made for a UNet with {adapter_layout}, ")
        assert "this model's UNet has [32, 64] channels and 1 layers per level (2 levels)" in message


def test_an_sdxl_adapter_on_sd15_is_named():
    unet = UNetConfig.from_diffusers(json.loads((tiny_pipeline.CONFIGS / "sd15" / "unet" / "config.json").read_text()))
    with pytest.raises(CheckpointError) as error:
        MotionAdapterConfig.from_diffusers(SDXL_ADAPTER_CONFIG).for_unet(unet, source="sdxl-beta")
    assert str(error.value) == (
        "sdxl-beta was made for a UNet with [320, 640, 1280] channels and [2, 2, 2] layers per level (3 levels, an "
        "SDXL motion adapter), this model's UNet has [320, 640, 1280, 1280] channels and 2 layers per level (4 "
        "levels): use an adapter made for this base model (AnimateDiff's for SD 1.5: sdcli download --list)")


def test_a_unet_lora_merges_as_diffusers_applies_it(tiny_video, tmp_path):
    """AnimateLCM's use of its UNet LoRA: ``load_lora_weights(file)``, ``set_adapters(["lcm-lora"], [0.8])`` and
    LCM sampling in diffusers; sdcli merges the same file (kohya names, as AnimateLCM's) into the UNet's weights."""
    pytest.importorskip("peft", reason="diffusers loads LoRA files with peft")
    reference, model_folder, adapter_folder = tiny_video
    source = open_checkpoint(model_folder).source("unet")
    shapes = {name: tuple(source.shape(name)) for name in source.keys()}
    path = tmp_path / "lcm_lora.safetensors"
    save_file(reference_models.kohya_lora(shapes, reference_models.lora_targets(shapes), alphas="same"), str(path))
    sampler, scheduler_class, options, steps, guidance, frames = CASES["lcm"]
    latents = np.random.default_rng(8).standard_normal((1, 4, frames, 8, 8)).astype(np.float32)
    reference.load_lora_weights(str(tmp_path), weight_name=path.name, adapter_name="lcm-lora")
    try:
        reference.set_adapters(["lcm-lora"], [0.8])
        expected = reference_frames(reference, scheduler_class, options, "a corgi", "", steps, guidance, latents)
    finally:
        reference.unload_lora_weights()
    params = VideoParams("a corgi", frames=frames, steps=steps, sampler=sampler, guidance_scale=guidance, seed=0,
                         width=64, height=64)
    frames_of = {}
    for loras in ([(path, 0.8)], []):
        pipeline = load_video_pipeline(model_folder, adapter_folder, scheduler_options=options, loras=loras)
        video = generate_video(pipeline, params, initial_noise=latents)
        frames_of[bool(loras)] = np.stack([images_to_uint8(clip) for clip in video.frames]).astype(np.int16)
    theirs = np.round(expected * 255).astype(np.int16)
    assert np.max(np.abs(frames_of[True] - theirs)) <= TOL["frame_levels"]
    assert np.max(np.abs(frames_of[False] - theirs)) > 10 * TOL["frame_levels"]  # the LoRA changed the frames


def test_each_stage_lets_its_weights_go_and_the_next_clip_is_the_same(tiny_video):
    """As for images: after a clip the UNet with its motion modules holds no prepared weights (they are made again
    from the mapped files on the next call), and the next clip with the same settings is the same."""
    from sdcli.ops.parameter import unprepared_bytes

    _, model_folder, adapter_folder = tiny_video
    pipeline = load_video_pipeline(model_folder, adapter_folder)
    params = VideoParams("a corgi", frames=3, steps=2, width=64, height=64, seed=4)
    first = generate_video(pipeline, params)
    assert unprepared_bytes(pipeline.network) > 0
    assert np.array_equal(generate_video(pipeline, params).frames, first.frames)
