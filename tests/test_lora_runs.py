"""LoRAs in runs, without the references: A1111's ``<lora:name:weight>`` tags and the ``--lora`` option, the
per-job LoRA sets of a batch (each set merged once, and no LoRA giving the base bits back exactly), and the
one-line refusals, with nothing written. The model is the golden test's tiny SD1 checkpoint."""

from __future__ import annotations

import re

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

import sdcli
from data_paths import TEST_DATA
from sdcli.cli import main
from sdcli.errors import LoraError, SdcliError
from sdcli.families import sd_networks
from sdcli.io.checkpoint import open_checkpoint
from sdcli.io.lora import Lora
from sdcli.io.lora_tags import LoraUse, parse_lora_option, split_lora_tags

MODEL = TEST_DATA / "golden" / "tiny-sd1"


def weight_shapes(component: str) -> dict[str, tuple[int, ...]]:
    source = open_checkpoint(MODEL).source(component)
    return {name: tuple(source.shape(name)) for name in source.keys()
            if name.endswith(".weight") and len(source.shape(name)) >= 2 and "embedding" not in name}


def kohya(shapes: dict[str, tuple[int, ...]], prefix: str, seed: int, rank: int = 2) -> dict[str, np.ndarray]:
    """A random kohya LoRA over every weight of ``shapes``: ``<prefix><module with underscores>.lora_down``
    (rank, in[, kh, kw]), ``.lora_up`` (out, rank[, 1, 1]) and ``.alpha``."""
    rng = np.random.default_rng(seed)
    lora = {}
    for name, shape in shapes.items():
        module = prefix + name.removesuffix(".weight").replace(".", "_")
        lora[f"{module}.lora_down.weight"] = rng.standard_normal((rank, *shape[1:])).astype(np.float32)
        lora[f"{module}.lora_up.weight"] = rng.standard_normal((shape[0], rank, *(1,) * (len(shape) - 2))).astype(
            np.float32)
        lora[f"{module}.alpha"] = np.array(1.0, np.float32)
    return lora


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """A LoRA folder: ``style`` (UNet and text encoder), ``detail`` (UNet only) and ``sdxl`` (a text encoder
    that only SDXL has)."""
    folder = tmp_path_factory.mktemp("loras")
    unet, text = weight_shapes("unet"), weight_shapes("text_encoder")
    save_file({**kohya(unet, "lora_unet_", 1), **kohya(text, "lora_te_", 2)}, str(folder / "style.safetensors"))
    save_file(kohya(dict(list(unet.items())[::3]), "lora_unet_", 3), str(folder / "detail.safetensors"))
    save_file(kohya(text, "lora_te2_", 4), str(folder / "sdxl.safetensors"))
    return folder


def test_tags_are_taken_out_of_the_prompt():
    """A1111's extra-network syntax: <lora:name>, <lora:name:weight> (both networks), <lora:name:te:unet>."""
    text, uses = split_lora_tags("a cat <lora:style>, oil <lora:detail:0.6> painting<lora:x:0.5:-1.25>")
    assert text == "a cat , oil  painting"
    assert uses == [LoraUse("style", 1.0, 1.0), LoraUse("detail", 0.6, 0.6), LoraUse("x", 0.5, -1.25)]
    assert split_lora_tags("no tags (here:1.2) <3") == ("no tags (here:1.2) <3", [])
    for prompt, message in [("<lora:x:nan>", "not a finite number"), ("<lora:x:big>", "not a finite number"),
                            ("<lora::1>", "write <lora:name>"), ("<lora:x:1:2:3>", "write <lora:name>"),
                            ("<hypernet:x:1>", "<lora:name:weight> tags only")]:
        with pytest.raises(LoraError, match=message):
            split_lora_tags(prompt)
    assert parse_lora_option("style:0.7") == LoraUse("style", 0.7, 0.7)
    assert parse_lora_option("loras/a.safetensors") == LoraUse("loras/a.safetensors")
    assert parse_lora_option("C:\\loras\\a.safetensors") == LoraUse("C:\\loras\\a.safetensors")
    with pytest.raises(LoraError, match="not a finite number"):
        parse_lora_option("style:inf")


def test_switching_sets_merges_each_once_and_comes_back_exactly(loras, monkeypatch):
    """A UNet switched between LoRA sets: a set seen before is not merged again (the deltas are computed once per
    set: counted), its output is the same bits, and no LoRA gives the base output bits; a UNet loaded with the set
    merged at load computes the same bits as one switched to it."""
    deltas = []
    original = Lora.delta
    monkeypatch.setattr(Lora, "delta", lambda self, *args: deltas.append(args[0]) or original(self, *args))
    style, detail = sdcli.read_lora(loras / "style.safetensors"), sdcli.read_lora(loras / "detail.safetensors")
    unet = sd_networks.load_unet(MODEL)
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)  # (B, C, h, w)
    context = rng.standard_normal((1, 77, 4)).astype(np.float32)  # (B, S, D)
    timesteps = np.array([500.0])
    outputs = {}
    sets = {"none": [], "style": [(style, 0.8)], "both": [(style, 0.8), (detail, -0.5)]}
    for name in ["none", "style", "both", "none", "style", "both", "style"]:
        unet.lora_switch.activate(sets[name])
        output = unet(sample, timesteps, context)
        if name in outputs:
            np.testing.assert_array_equal(output, outputs[name])
        outputs[name] = output
    switch = unet.lora_switch
    style_layers, detail_layers = len(style.layers_of("unet")), len(detail.layers_of("unet"))
    assert len(deltas) == style_layers + (style_layers + detail_layers)  # one product per layer per set, once
    assert switch.merges == len(switch.touched(sets["style"])) + len(switch.touched(sets["both"]))
    assert np.abs(outputs["style"] - outputs["none"]).max() > 1e-3
    assert np.abs(outputs["both"] - outputs["style"]).max() > 1e-3
    np.testing.assert_array_equal(sd_networks.load_unet(MODEL, loras=sets["both"])(sample, timesteps, context),
                                  outputs["both"])
    np.testing.assert_array_equal(sd_networks.load_unet(MODEL)(sample, timesteps, context), outputs["none"])


def generate(tmp_path, *args, prompt="a cat"):
    output = tmp_path / "out.png"
    result = CliRunner().invoke(main, ["generate", "-m", str(MODEL), "--steps", "2", "--seed", "3", "-o",
                                       str(output), *map(str, args)] + (["-p", prompt] if prompt else []))
    return result, output


def pixels(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path))


def test_tags_and_options_make_the_same_images(loras, tmp_path):
    """A prompts file whose lines carry different tags (none, one, two, none): each image is the one a run with
    the same LoRAs as --lora options makes, and the lines without tags are the plain run's bits."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na cat <lora:style:0.8>\n<lora:detail:-0.5>a cat<lora:style:0.8>\na cat\n")
    (tmp_path / "batch").mkdir()
    result = CliRunner().invoke(main, ["generate", "-m", str(MODEL), "--steps", "2", "--seed", "3",
                                       "--prompts-file", str(prompts), "--lora-dir", str(loras), "-o",
                                       str(tmp_path / "batch" / "{index}.png")])
    assert result.exit_code == 0, result.output
    runs = {}
    for name, options in [("plain", []), ("style", ["--lora", "style:0.8"]),
                          ("both", ["--lora", f"{loras / 'detail.safetensors'}:-0.5", "--lora", "style:0.8"])]:
        folder = tmp_path / name
        folder.mkdir()
        seeds = {"plain": 3, "style": 4, "both": 5}[name]
        result, output = generate(folder, "--lora-dir", loras, "--seed", seeds, *options)
        assert result.exit_code == 0, result.output
        runs[name] = pixels(output)
    batch = [pixels(tmp_path / "batch" / f"{index}.png") for index in range(1, 5)]
    np.testing.assert_array_equal(batch[0], runs["plain"])
    np.testing.assert_array_equal(batch[1], runs["style"])
    np.testing.assert_array_equal(batch[2], runs["both"])
    assert np.abs(batch[1].astype(int) - runs["plain"]).max() > 0  # the LoRA shows (at seed 4 as at 3)
    (tmp_path / "low").mkdir()  # the prompts encoded ahead, each with its own text-encoder LoRA set
    result = CliRunner().invoke(main, ["generate", "-m", str(MODEL), "--steps", "2", "--seed", "3", "--low-memory",
                                       "--prompts-file", str(prompts), "--lora-dir", str(loras), "-o",
                                       str(tmp_path / "low" / "{index}.png")])
    assert result.exit_code == 0, result.output
    for index in range(1, 5):
        np.testing.assert_array_equal(pixels(tmp_path / "low" / f"{index}.png"), batch[index - 1])
    plain_6, _ = generate(tmp_path / "batch", "--seed", 6, "-o", str(tmp_path / "plain6.png"))
    assert plain_6.exit_code == 0, plain_6.output
    np.testing.assert_array_equal(batch[3], pixels(tmp_path / "plain6.png"))


def assert_one_line_error(result, *patterns):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for pattern in patterns:
        assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in result.output


def test_bad_loras_are_one_line_errors_and_nothing_is_written(loras, tmp_path):
    (tmp_path / "lora.ckpt").write_bytes(b"\x80\x02}q\x00.")
    save_file({"model.diffusion_model.out.2.weight": np.ones((4, 4), np.float32)}, str(tmp_path / "model.safetensors"))
    other = kohya({"down_blocks.9.resnets.0.conv1.weight": (8, 8, 3, 3)}, "lora_unet_", 0)
    other.update(kohya({"up_blocks.7.attentions.0.proj_in.weight": (8, 8)}, "lora_unet_", 0))
    save_file(other, str(tmp_path / "other.safetensors"))
    attn2 = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file({f"{attn2}.lora_down.weight": np.ones((4, 2048), np.float32),
               f"{attn2}.lora_up.weight": np.ones((640, 4), np.float32)}, str(tmp_path / "xl-unet.safetensors"))
    deep = "unet.down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2"
    save_file({f"{deep}.lora_A.weight": np.ones((4, 5120), np.float32),
               f"{deep}.lora_B.weight": np.ones((1280, 4), np.float32)}, str(tmp_path / "xl-blocks.safetensors"))
    cases = [
        (["--lora-dir", loras], "a cat <lora:nope:0.5>", [r"unknown LoRA 'nope'", r"available: detail, sdxl, style"]),
        (["--lora", tmp_path / "lora.ckpt"], "a cat", [r"pickle", "sdcli convert"]),
        (["--lora", tmp_path / "model.safetensors"], "a cat", [r"not a LoRA file"]),
        (["--lora-dir", loras, "--lora", "sdxl"], "a cat", [r"a LoRA for SDXL \(lora_te2_"]),
        (["--lora", f"{tmp_path / 'other.safetensors'}:0.5"], "a cat",
         [r"LoRA layer down_blocks_9_resnets_0_conv1 names no weight",
          r"1 more of its 2 layers match nothing either: up_blocks_7_attentions_0_proj_in\)", "another model"]),
        (["--lora", tmp_path / "xl-unet.safetensors"], "a cat", [r"a LoRA for SDXL \(.*attn2_to_k.* 2048-wide"]),
        (["--lora", tmp_path / "xl-blocks.safetensors"], "a cat", [r"a LoRA for SDXL \(.*transformer_blocks\.9"]),
        (["--lora-dir", loras], "a cat <lora:style:nan>", [r"not a finite number"]),
        (["--lora-dir", loras, "--lora", "style:x"], "a cat", [r"unknown LoRA 'style:x'"]),
    ]
    for options, prompt, patterns in cases:
        result, output = generate(tmp_path, *options, prompt=prompt)
        assert_one_line_error(result, *patterns)
        assert not output.exists()


def test_a_tag_for_another_model_is_refused_before_any_image(loras, tmp_path):
    """A prompts file whose second line names a LoRA that does not fit: refused when the jobs are checked against
    the model, before the first image is made."""
    save_file(kohya({"down_blocks.9.resnets.0.conv1.weight": (8, 8, 3, 3)}, "lora_unet_", 0),
              str(loras / "misfit.safetensors"))
    try:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("a cat\na dog <lora:misfit>\n")
        result = CliRunner().invoke(main, ["generate", "-m", str(MODEL), "--steps", "2", "--seed", "1",
                                           "--prompts-file", str(prompts), "--lora-dir", str(loras), "-o",
                                           str(tmp_path / "{index}.png")])
        assert_one_line_error(result, r"misfit.safetensors: LoRA layer down_blocks_9_resnets_0_conv1 names no weight")
        assert not list(tmp_path.glob("*.png"))
    finally:
        (loras / "misfit.safetensors").unlink()


def test_library_calls(loras):
    """The same from Python: load_pipeline(loras=...), tags resolved in lora_dir, errors as LoraError."""
    pipeline = sdcli.load_pipeline(str(MODEL), loras=[(loras / "style.safetensors", 0.8)], lora_dir=loras)
    job = pipeline.prepare(sdcli.GenerateParams(prompt="a cat <lora:detail:0.3>", steps=1, seed=1))
    assert [(lora.name, te, unet) for lora, te, unet in job.loras] == [("style", 0.8, 0.8), ("detail", 0.3, 0.3)]
    assert [lora.name for lora, _ in job.text_encoder_loras] == ["style"]  # detail has no text-encoder layers
    with pytest.raises(SdcliError, match="unknown LoRA 'missing'"):
        pipeline.prepare(sdcli.GenerateParams(prompt="<lora:missing>", steps=1, seed=1))
