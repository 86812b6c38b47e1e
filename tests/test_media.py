"""Image output: pixels against diffusers' image processor, PNG text chunks, the A1111 parameters text, atomic
writes and output path planning.

Every comparison here is exact: the uint8 pixels are a fixed sequence of float32 operations that must land on
the same integers as diffusers' (a one-level difference would be a bug in the rounding, not noise), and the rest
is text and file names. This holds on any CPU: the operations (x / 2 + 0.5, clamping, * 255, rounding half to
even) are IEEE 754 basic operations, correctly rounded whatever the instruction set.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdcli.errors import SdcliError
from sdcli.io.files import OutputExistsError
from sdcli.io.media import (
    a1111_parameters,
    images_to_uint8,
    read_png_text,
    save_png,
)
from sdcli.io.outputs import plan_output_paths, prompt_slug
from sdcli.params import GenerateParams
from sdcli.sampling.plans import SAMPLERS

# The web UI's pattern for one "Key: value" field of the settings line (modules/infotext_utils.py, re_param):
# the reader our text has to satisfy.
A1111_FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def diffusers_pixels(images: np.ndarray, torch) -> np.ndarray:
    """(B, 3, H, W) -> (B, H, W, 3) uint8 through diffusers' own postprocess to PIL images."""
    from diffusers.image_processor import VaeImageProcessor

    pil_images = VaeImageProcessor().postprocess(torch.from_numpy(images), output_type="pil")
    return np.stack([np.asarray(image) for image in pil_images])


def png_chunks(path: Path) -> list[tuple[bytes, bytes]]:
    """(type, data) of every chunk of a PNG file, read by hand to see which text chunk types were written."""
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, offset = [], 8
    while offset < len(raw):
        (length,) = struct.unpack(">I", raw[offset:offset + 4])
        kind, data = raw[offset + 4:offset + 8], raw[offset + 8:offset + 8 + length]
        assert struct.unpack(">I", raw[offset + 8 + length:offset + 12 + length])[0] == zlib.crc32(kind + data)
        chunks.append((kind, data))
        offset += 12 + length
    return chunks


def parse_a1111(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, settings) the way the web UI's parse_generation_parameters splits them."""
    *lines, last = text.split("\n")
    negative = [line[len("Negative prompt: "):] for line in lines if line.startswith("Negative prompt: ")]
    prompt = "\n".join(line for line in lines if not line.startswith("Negative prompt: "))
    settings = {key: json.loads(value) if value.startswith('"') else value
                for key, value in A1111_FIELD.findall(last)}
    return prompt, (negative or [""])[0], settings


# ---------------------------------------------------------------------------------------------- pixels

def test_uint8_matches_diffusers_on_random_values(torch, diffusers):
    rng = np.random.default_rng(0)
    images = (rng.standard_normal((2, 3, 17, 23)) * 1.5).astype(np.float32)  # about a third outside [-1, 1]
    images[0, 0, 0, :4] = [-np.inf, np.inf, -1e30, 1e30]
    ours = images_to_uint8(images)
    assert ours.shape == (2, 17, 23, 3) and ours.dtype == np.uint8 and ours.flags.c_contiguous
    np.testing.assert_array_equal(ours, diffusers_pixels(images, torch))


def test_uint8_matches_diffusers_on_rounding_ties(torch, diffusers):
    # Inputs near x = 2 (k + 0.5) / 255 - 1, whose pixel value lies on or next to k + 0.5: within 64 float32
    # steps of each, keep those where the float32 product is exactly k + 0.5 (round half to even decides), and
    # their neighbours one step either side.
    centres = (2 * (np.arange(255) + 0.5) / 255 - 1).astype(np.float32)
    candidates = [centres]
    up, down = centres, centres
    for _ in range(64):
        up, down = np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(-np.inf))
        candidates += [up, down]
    candidates = np.concatenate(candidates)
    scaled = (candidates * np.float32(0.5) + np.float32(0.5)) * np.float32(255)
    ties = candidates[scaled - np.floor(scaled) == 0.5]
    values = np.concatenate([ties, np.nextafter(ties, np.float32(np.inf)), np.nextafter(ties, np.float32(-np.inf)),
                             np.float32([-1.0, -0.0, 0.0, 1.0])])
    tied_levels = np.floor((ties * np.float32(0.5) + np.float32(0.5)) * np.float32(255))
    assert len(np.unique(tied_levels % 2)) == 2  # ties below even and odd levels: half-up would differ
    images = np.resize(values, (3 * 32 * ((values.size + 95) // 96),)).reshape(1, 3, 32, -1).astype(np.float32)
    np.testing.assert_array_equal(images_to_uint8(images), diffusers_pixels(images, torch))


def test_uint8_writes_nan_as_black_and_says_so(caplog):
    images = np.zeros((1, 3, 2, 2), np.float32)
    images[0, 1, 1, 1] = np.nan
    with caplog.at_level("WARNING", logger="sdcli"):
        pixels = images_to_uint8(images)
    assert pixels[0, 1, 1, 1] == 0 and pixels[0, 0, 0, 0] == 128
    assert "NaN" in caplog.text


def test_uint8_refuses_other_shapes():
    with pytest.raises(ValueError, match="B, 3, H, W"):
        images_to_uint8(np.zeros((3, 8, 8), np.float32))


# ---------------------------------------------------------------------------------------------- PNG files

TEXT = {
    "parameters": "a red fox, snow\nSteps: 20, Sampler: Euler a",
    "latin": "café crème à 20 °C",
    "sdcli": json.dumps({"prompt": "富士山と桜, 夕焼け 🌸 — «Ünïcødé»"}, ensure_ascii=False),
}


def test_png_round_trip_keeps_pixels_and_text(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (13, 21, 3), dtype=np.uint8)
    written = save_png(tmp_path / "out.png", pixels, TEXT)
    assert written == tmp_path / "out.png"
    with Image.open(written) as image:
        assert image.mode == "RGB" and image.format == "PNG"
        np.testing.assert_array_equal(np.asarray(image), pixels)
    assert read_png_text(written) == TEXT
    kinds = {data.split(b"\0", 1)[0].decode("latin-1"): kind for kind, data in png_chunks(written)
             if kind in (b"tEXt", b"iTXt", b"zTXt")}
    assert kinds == {"parameters": b"tEXt", "latin": b"tEXt", "sdcli": b"iTXt"}  # iTXt only where needed


def test_png_write_failure_leaves_nothing(tmp_path, monkeypatch):
    seen = []

    def failing_save(self, target, *args, **kwargs):
        seen.append(Path(target))
        Path(target).write_bytes(b"\x89PNG half a file")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_png(tmp_path / "out.png", np.zeros((4, 4, 3), np.uint8), {})
    assert seen[0].parent == tmp_path and seen[0].name != "out.png"  # the temporary lives beside the target
    assert list(tmp_path.iterdir()) == []


def test_png_refuses_an_existing_file_unless_overwrite(tmp_path):
    target = tmp_path / "out.png"
    target.write_bytes(b"precious")
    with pytest.raises(OutputExistsError, match="pass --overwrite"):
        save_png(target, np.zeros((4, 4, 3), np.uint8), {})
    assert target.read_bytes() == b"precious" and list(tmp_path.iterdir()) == [target]
    save_png(target, np.full((4, 4, 3), 7, np.uint8), {"k": "v"}, overwrite=True)
    assert read_png_text(target) == {"k": "v"} and list(tmp_path.iterdir()) == [target]


def test_png_refuses_bad_pixels_and_keywords(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        save_png(tmp_path / "a.png", np.zeros((4, 4, 3), np.float32), {})
    with pytest.raises(ValueError, match="keyword"):
        save_png(tmp_path / "a.png", np.zeros((4, 4, 3), np.uint8), {"clé ✓": "x"})
    with pytest.raises(SdcliError, match="does not exist"):
        save_png(tmp_path / "missing" / "a.png", np.zeros((4, 4, 3), np.uint8), {})
    assert list(tmp_path.iterdir()) == []


def test_read_png_text_errors_are_one_line(tmp_path):
    with pytest.raises(SdcliError, match="no such file"):
        read_png_text(tmp_path / "none.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(SdcliError, match="not an image"):
        read_png_text(tmp_path / "text.png")
    Image.new("RGB", (2, 2)).save(tmp_path / "photo.jpg")
    with pytest.raises(SdcliError, match="not a PNG"):
        read_png_text(tmp_path / "photo.jpg")


# ---------------------------------------------------------------------------------------------- A1111 text

def test_a1111_text_full_example():
    params = GenerateParams(prompt="a red fox in snow", negative_prompt="blurry, low quality", steps=20,
                            guidance_scale=7, sampler="dpmpp_2m_karras", clip_skip=2)
    text = a1111_parameters(params, seed=1234, width=512, height=768, model="v1-5-pruned-emaonly",
                            model_hash="6ce0161689")
    assert text == ("a red fox in snow\n"
                    "Negative prompt: blurry, low quality\n"
                    "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.0, Seed: 1234, Size: 512x768, "
                    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Clip skip: 2")


def test_a1111_text_leaves_out_defaults():
    params = GenerateParams(prompt="a lighthouse at dusk", steps=50, sampler="pndm")
    text = a1111_parameters(params, seed=1, width=512, height=512, model="sd15")
    assert text == ("a lighthouse at dusk\n"
                    "Steps: 50, Sampler: PLMS, CFG scale: 7.5, Seed: 1, Size: 512x512, Model: sd15")


def test_a1111_text_sampler_labels():
    expected = {"ddim": "DDIM", "pndm": "PLMS", "euler": "Euler", "euler_a": "Euler a", "heun": "Heun",
                "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_karras": "DPM++ 2M Karras", "lcm": "LCM", "unipc": "UniPC",
                "ddpm": "DDPM"}
    assert {name: spec.label for name, spec in SAMPLERS.items()} == expected
    for sampler, label in [*expected.items(), ("my_sampler", "my_sampler")]:
        text = a1111_parameters(GenerateParams(prompt="p", sampler=sampler), seed=1, width=8, height=8, model="m")
        assert parse_a1111(text)[2]["Sampler"] == label
    text = a1111_parameters(GenerateParams(prompt="p", sampler="pndm"), seed=1, width=8, height=8, model="m",
                            sampler_label="X y")
    assert parse_a1111(text)[2]["Sampler"] == "X y"


def test_a1111_text_optional_fields_and_extra():
    params = GenerateParams(prompt="p", sampler="ddim", eta=0.3, guidance_rescale=0.7)
    text = a1111_parameters(params, seed=5, width=64, height=64, model="m",
                            extra={"Lora hashes": "fox: 0a1b2c, snow: 3d4e5f", "Tiling": "Tiling", "Skipped": None})
    assert text.endswith("Model: m, Eta DDIM: 0.3, CFG Rescale: 0.7, "
                         'Lora hashes: "fox: 0a1b2c, snow: 3d4e5f", Tiling')
    no_eta = a1111_parameters(GenerateParams(prompt="p", sampler="euler", eta=0.3), seed=5, width=8, height=8,
                              model="m")
    assert "Eta" not in no_eta


def test_a1111_text_quotes_values_the_web_ui_reader_needs_quoted():
    awkward = {"Model": 'models, "v2": final', "Comment": '"quoted"', "Plain": 'say "hi"', "Lines": "a\nb"}
    params = GenerateParams(prompt="zwei Füchse, 雪\nsecond line", negative_prompt="blurry, \"bad\": yes")
    text = a1111_parameters(params, seed=42, width=512, height=512, model=awkward["Model"],
                            extra={key: value for key, value in awkward.items() if key != "Model"})
    assert 'Model: "models, \\"v2\\": final"' in text and 'Plain: say "hi"' in text
    prompt, negative, settings = parse_a1111(text)
    assert prompt == params.prompt and negative == params.negative_prompt
    assert {key: settings[key] for key in awkward} == awkward
    assert settings["Seed"] == "42" and settings["Size"] == "512x512"


# ---------------------------------------------------------------------------------------------- output paths

def test_plan_one_image_to_a_file(tmp_path):
    assert plan_output_paths(tmp_path / "out.png", 1, [7]) == [tmp_path / "out.png"]
    assert plan_output_paths(tmp_path / "out.PNG", 1, [7]) == [tmp_path / "out.PNG"]
    assert plan_output_paths(str(tmp_path / "out"), 1, [7]) == [tmp_path / "out.png"]  # .png added


def test_plan_refuses_other_suffixes(tmp_path):
    for name in ("out.jpg", "out.webp", "img-{seed}.jpg"):
        with pytest.raises(SdcliError, match=r"PNG.*\.png"):
            plan_output_paths(tmp_path / name, 1, [7])


def test_plan_several_images_to_numbered_files(tmp_path):
    assert plan_output_paths(tmp_path / "out.png", 3, [1, 2, 3]) == [tmp_path / f"out-{i}.png" for i in (1, 2, 3)]
    twelve = plan_output_paths(tmp_path / "out.png", 12, list(range(12)))
    assert [path.name for path in twelve] == [f"out-{i:02d}.png" for i in range(1, 13)]


def test_plan_into_an_existing_folder_numbers_on(tmp_path):
    assert plan_output_paths(tmp_path, 2, [11, 22]) == [tmp_path / "00001-11.png", tmp_path / "00002-22.png"]
    (tmp_path / "00007-5.png").touch()
    (tmp_path / "notes.txt").touch()
    assert plan_output_paths(str(tmp_path), 1, [3]) == [tmp_path / "00008-3.png"]


def test_plan_into_a_new_folder(tmp_path):
    assert plan_output_paths(f"{tmp_path}/new/", 1, [9]) == [tmp_path / "new" / "00001-9.png"]
    assert (tmp_path / "new").is_dir()
    with pytest.raises(SdcliError, match="parent .* does not exist"):
        plan_output_paths(f"{tmp_path}/a/b/", 1, [9])
    assert not (tmp_path / "a").exists()
    (tmp_path / "file").touch()
    with pytest.raises(SdcliError, match="is a file"):
        plan_output_paths(f"{tmp_path}/file/", 1, [9])


def test_plan_templates(tmp_path):
    seeds, prompts = [5, 6, 7], ["A red fox, in snow!", "a red fox, in snow", "星空の下の狐"]
    paths = plan_output_paths(str(tmp_path / "{index:03d}-{seed}-{prompt}"), 3, seeds, prompts)
    assert [path.name for path in paths] == ["001-5-a-red-fox-in-snow.png", "002-6-a-red-fox-in-snow.png",
                                             "003-7-星空の下の狐.png"]
    assert plan_output_paths(str(tmp_path / "img_{seed}.png"), 2, [1, 2]) == [tmp_path / "img_1.png",
                                                                              tmp_path / "img_2.png"]
    assert plan_output_paths(str(tmp_path / "{seed}"), 1, [42]) == [tmp_path / "42.png"]


def test_plan_template_errors(tmp_path):
    with pytest.raises(SdcliError, match=r"images 1 and 2 the same file .*\{index\} or \{seed\}"):
        plan_output_paths(str(tmp_path / "{prompt}.png"), 2, [1, 2], ["fox", "fox"])
    with pytest.raises(SdcliError, match=r"unknown field \{steps\}"):
        plan_output_paths(str(tmp_path / "{steps}.png"), 1, [1])
    with pytest.raises(SdcliError, match="brace"):
        plan_output_paths(str(tmp_path / "{seed.png"), 1, [1])
    with pytest.raises(SdcliError, match="output template"):
        plan_output_paths(str(tmp_path / "{prompt:05d}.png"), 1, [1], ["fox"])
    with pytest.raises(SdcliError, match="does not exist"):
        plan_output_paths(str(tmp_path / "{prompt}" / "{seed}.png"), 1, [1], ["fox"])


def test_plan_refuses_existing_files_up_front(tmp_path):
    (tmp_path / "out-2.png").touch()
    (tmp_path / "out-3.png").touch()
    with pytest.raises(OutputExistsError) as caught:
        plan_output_paths(tmp_path / "out.png", 3, [1, 2, 3])
    message = str(caught.value)
    assert "\n" not in message and "out-2.png exists" in message and "pass --overwrite" in message
    assert "1 more" in message
    assert len(plan_output_paths(tmp_path / "out.png", 3, [1, 2, 3], overwrite=True)) == 3
    (tmp_path / "single.png").touch()
    with pytest.raises(OutputExistsError, match=r"single\.png exists; pass --overwrite to replace it$"):
        plan_output_paths(tmp_path / "single.png", 1, [1])


def test_plan_refuses_missing_folders_and_folder_names(tmp_path):
    with pytest.raises(SdcliError, match="folder .* does not exist") as caught:
        plan_output_paths(tmp_path / "nowhere" / "out.png", 1, [1])
    assert not isinstance(caught.value, OutputExistsError)
    (tmp_path / "7.png").mkdir()
    with pytest.raises(SdcliError, match="is a folder"):
        plan_output_paths(str(tmp_path / "{seed}.png"), 1, [7])


def test_plan_checks_its_arguments(tmp_path):
    with pytest.raises(ValueError):
        plan_output_paths(tmp_path / "out.png", 2, [1])
    with pytest.raises(ValueError):
        plan_output_paths(tmp_path / "out.png", 0, [])
    with pytest.raises(ValueError, match="prompts"):
        plan_output_paths(str(tmp_path / "{prompt}.png"), 1, [1])
    with pytest.raises(SdcliError, match="empty"):
        plan_output_paths("", 1, [1])


def test_prompt_slug():
    assert prompt_slug("A photo of an astronaut, riding a horse!") == "a-photo-of-an-astronaut-riding-a-horse"
    long = prompt_slug("masterpiece, best quality, highly detailed landscape with mountains and a lake")
    assert long == "masterpiece-best-quality-highly-detailed" and len(long) <= 40
    assert prompt_slug("x" * 60) == "x" * 40
    assert prompt_slug("(((___)))") == "prompt"
    assert prompt_slug("Ｆｕｌｌｗｉｄｔｈ ＡＢＣ / ../etc") == "fullwidth-abc-etc"
