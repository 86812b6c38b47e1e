"""Bad numbers, absurd sizes and bad files: one-line errors in sdcli's own terms, exit code 2, before any work is
done; and prompts of any length tokenized at the cost of a short one. No torch needed: the model is the golden
test's tiny checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import sdcli
import sdcli.sizing
from data_paths import TEST_DATA
from sdcli.cli import main
from sdcli.config import UNetConfig, VAEConfig
from sdcli.errors import SdcliError
from sdcli.nn.layers import Conv2d
from sdcli.ops.parameter import parameters, unprepared_bytes
from sdcli.nn.tokenizer import WINDOW_CHARACTERS, ClipTokenizer
from sdcli.params import MAX_IMAGE_SIDE, GenerateParams

MODEL = TEST_DATA / "golden" / "tiny-sd1"


def generate(tmp_path, *args):
    output = tmp_path / "out.png"
    result = CliRunner().invoke(main, ["generate", "-m", str(MODEL), "-p", "a cat", "--steps", "2", "-o", str(output),
                                       *map(str, args)])
    return result, output


def assert_one_line_error(result, *words):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for word in words:
        assert word in lines[0], lines[0]
    assert "Traceback" not in result.output and "allow_pickle" not in result.output


@pytest.mark.parametrize("option", ["--guidance", "--guidance-rescale", "--eta"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_float_options_must_be_finite(tmp_path, option, value):
    result, output = generate(tmp_path, option, value)
    assert_one_line_error(result, option)
    assert not output.exists()


@pytest.mark.parametrize("option", ["--beta-start", "--beta-end"])
def test_noise_test_floats_must_be_finite(option):
    result = CliRunner().invoke(main, ["noise-test", option, "nan"])
    assert_one_line_error(result, option, "finite")


def test_prompts_file_settings_must_be_finite(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat --guidance nan\n")
    result = CliRunner().invoke(main, ["generate", "-m", str(MODEL), "--prompts-file", str(prompts), "-o",
                                       str(tmp_path / "x.png")])
    assert_one_line_error(result, "prompts.txt:1", "--guidance", "finite")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("field, value", [("guidance_scale", float("nan")), ("guidance_scale", float("inf")),
                                          ("guidance_rescale", float("nan")), ("eta", float("nan")),
                                          ("eta", -1.0)])
def test_library_validation_refuses_what_the_cli_refuses(field, value):
    with pytest.raises(SdcliError, match="finite|negative"):
        GenerateParams(prompt="a cat", **{field: value}).validate()


def test_numpy_numbers_are_numbers():
    params = GenerateParams(prompt="a cat", guidance_scale=np.float32(7.5), guidance_rescale=np.float64(0.5),
                            eta=np.float32(0)).validate()
    assert params.guidance_scale == 7.5
    with pytest.raises(SdcliError, match="guidance scale must be a finite number, got nan"):
        GenerateParams(prompt="a cat", guidance_scale=np.float32("nan")).validate()


@pytest.mark.parametrize("option", ["--width", "--height"])
def test_absurd_sizes_are_refused_at_once(tmp_path, option, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the model must not load for a size over the limit")

    monkeypatch.setattr(sdcli, "load_pipeline", no_load)
    result, _ = generate(tmp_path, option, 100000)
    assert_one_line_error(result, f"{option.lstrip('-')} 100000", str(MAX_IMAGE_SIDE))


def test_sizes_that_do_not_fit_memory_are_refused_with_the_largest_that_fits(tmp_path, monkeypatch):
    monkeypatch.setattr(sdcli.sizing, "available_memory", lambda: 20_000_000)
    result, output = generate(tmp_path, "-W", 2048, "-H", 2048, "--seed", 1)
    assert_one_line_error(result, "2048x2048", "20 MB of memory is available", "largest square size that fits is",
                          "--vae-tiling")
    assert not output.exists()


def test_the_estimate_scales_and_tiling_bounds_the_decoder():
    unet = UNetConfig.from_diffusers(json.loads((MODEL / "unet" / "config.json").read_text()))
    vae = VAEConfig.from_diffusers(json.loads((MODEL / "vae" / "config.json").read_text()))
    whole = sdcli.sizing.ImageDecoderShape.of_vae(vae, tiling=False)
    tiled = sdcli.sizing.ImageDecoderShape.of_vae(vae, tiling=True)
    small = sdcli.sizing.estimate_memory(unet, whole, 512, 512, 1, True, "cpu")
    large = sdcli.sizing.estimate_memory(unet, whole, 1024, 1024, 1, True, "cpu")
    assert large.unet_bytes == 4 * small.unet_bytes and 3 * small.decoder_bytes < large.decoder_bytes
    large_tiled = sdcli.sizing.estimate_memory(unet, tiled, 1024, 1024, 1, True, "cpu")
    assert large_tiled.decoder_bytes < large.decoder_bytes / 4
    numpy = sdcli.sizing.estimate_memory(unet, whole, 1024, 1024, 1, True, "numpy")
    assert numpy.unet_bytes > 10 * large.unet_bytes  # the reference's attention holds every score
    with pytest.raises(SdcliError, match="with --vae-tiling this size needs"):
        sdcli.sizing.check_fits(unet, whole, 2048, 2048, 1, True, "cpu", MAX_IMAGE_SIDE,
                                available=int(1.2 * large_tiled.peak_bytes * 4))


def sd15_configs():
    configs = Path(sdcli.__file__).parent / "data" / "configs" / "sd15"
    return (UNetConfig.from_diffusers(json.loads((configs / "unet" / "config.json").read_text())),
            VAEConfig.from_diffusers(json.loads((configs / "vae" / "config.json").read_text())))


def test_the_weights_count_toward_the_peak():
    """SD 1.5 in fp32: 3.4 GB of UNet weights and 0.2 GB of decoder weights to prepare."""
    unet, vae = sd15_configs()
    whole = sdcli.sizing.ImageDecoderShape.of_vae(vae, tiling=False)
    weights = (3_438_000_000, 198_000_000)
    estimate = sdcli.sizing.estimate_memory(unet, whole, 1024, 1024, 1, True, "cpu", weights)
    assert estimate.unet_peak_bytes == weights[0] + estimate.unet_bytes
    assert estimate.peak_bytes == max(weights[0] + estimate.unet_bytes, weights[1] + estimate.decoder_bytes)
    with pytest.raises(SdcliError, match=r"for the UNet \(3\.4 GB weights, 480 MB activations\), and 4\.0 GB of "
                                         r"memory is available; the largest square size that fits is 576x576"):
        sdcli.sizing.check_fits(unet, whole, 1024, 1024, 1, True, "cpu", MAX_IMAGE_SIDE, available=4_000_000_000,
                                weights=weights)
    with pytest.raises(SdcliError, match=r"no size fits \(--precision fp16 or bf16 halves the weights, --low-memory "
                                         r"streams them\)"):
        sdcli.sizing.check_fits(unet, whole, 512, 512, 1, True, "cpu", MAX_IMAGE_SIDE, available=3_500_000_000,
                                weights=weights)
    assert sdcli.sizing.check_fits(unet, whole, 512, 512, 1, True, "cpu", MAX_IMAGE_SIDE, available=4_500_000_000,
                                   weights=weights).peak_bytes < 4_000_000_000


def test_unprepared_bytes_follow_what_the_layers_hold():
    """fp16 weights of an F16 file are views of the mapped file: preparing adds them to resident memory, once, and
    again after the stage lets them go. Converted at load (fp32 from F16) they are resident already: nothing to
    add. Streamed (--low-memory): one layer widened to float32 at a time."""
    views = sdcli.load_pipeline(str(MODEL), precision="fp16")
    matrices = [parameter for parameter in parameters(views.network) if parameter.data.ndim >= 2]
    before = unprepared_bytes(views.network)
    assert before == sum(matrix.weight.nbytes for matrix in matrices) > 0
    sdcli.generate_image(views, GenerateParams(prompt="a cat", steps=1, seed=1))
    assert unprepared_bytes(views.network) == before  # unloaded when the decoder started, to be prepared again
    convolutions = [layer for layer in layers_of(views.network) if isinstance(layer, Conv2d)]
    sizes = sum(convolution.weight.weight.nbytes for convolution in convolutions)
    for convolution in convolutions:  # prepared by a call
        convolution(np.zeros((1, convolution.weight.shape[1], 4, 4), np.float32))
    assert unprepared_bytes(views.network) == before - sizes
    converted = sdcli.load_pipeline(str(MODEL), precision="fp32")
    assert unprepared_bytes(converted.network) == 0
    streamed = sdcli.load_pipeline(str(MODEL), precision="fp16", low_memory=True)
    assert unprepared_bytes(streamed.network) == max(matrix.data.size for matrix in matrices) * 4
    assert converted.reuse_memory and not streamed.reuse_memory  # its sampling loop hands large arrays back at once


def layers_of(network) -> list:
    """Every layer object of ``network`` (the sdcli.nn objects it holds, walked through lists)."""
    found, pending = [], [network]
    while pending:
        item = pending.pop()
        if isinstance(item, list):
            pending.extend(item)
        elif type(item).__module__.startswith("sdcli.nn."):
            found.append(item)
            pending.extend(vars(item).values())
    return found


@pytest.mark.parametrize("content, words", [
    (b"hello, not an array\n", "not a .npy file"),
    ("object", "holds Python objects"),
    ("damaged", "damaged"),
    ("nan", "NaN or infinite"),
    ("int", "expected float latents"),
    ("shape", "expected float latents"),
])
def test_bad_latents_files(tmp_path, content, words):
    path = tmp_path / "latents.npy"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "object":
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif content == "damaged":
        np.save(path, np.zeros((1, 4, 8, 8), np.float32))
        path.write_bytes(path.read_bytes()[:200])
    elif content == "nan":
        np.save(path, np.full((1, 4, 8, 8), np.nan, np.float32))
    elif content == "int":
        np.save(path, np.zeros((1, 4, 8, 8), np.int32))
    else:
        np.save(path, np.zeros((1, 3, 8, 8), np.float32))
    result, _ = generate(tmp_path, "--latents", path, "--seed", 1)
    assert_one_line_error(result, "--latents", words)


# -- long prompts ---------------------------------------------------------------------------------------------

LONG_PROMPTS = {
    "words": "a photograph of an astronaut riding a horse on the moon, " * 200,
    "newlines and tabs": "castle\t\ton a hill\n\n\nat dusk   " * 300,
    "digits only": "1234567890" * 800,
    "one long word": "supercalifragilistic" * 400,
    "symbols": "(((masterpiece))), [best quality]!!! " * 250,
    "long spaces": ("word" + " " * 3000) * 10,
    "special tokens": "a <|endoftext|> b <|startoftext|> c " * 300,
    "accents and cjk": "café crème 東京の夜景 ñandú " * 300,
}


@pytest.mark.parametrize("name", list(LONG_PROMPTS))
def test_long_prompts_keep_the_tokens_of_the_whole_text(name):
    tokenizer = ClipTokenizer.from_folder()
    text = LONG_PROMPTS[name]
    assert len(text) > WINDOW_CHARACTERS
    whole = tokenizer.encode(text)
    tokenized = tokenizer.tokenize(text)
    if len(whole) <= tokenizer.max_length:  # long in characters, short in tokens: nothing may be cut
        assert tokenized.ids[:len(whole)].tolist() == whole and tokenized.truncated == 0
        return
    assert tokenized.ids.tolist() == whole[:tokenizer.max_length - 1] + [tokenizer.eos_id]
    assert tokenized.length == tokenizer.max_length and 0 < tokenized.truncated <= len(whole) - tokenizer.max_length


def record_tokenized_lengths(tokenizer, monkeypatch) -> list[int]:
    """The lengths of the texts ``tokenizer`` hands its tokenizers-library tokenizer, as they come."""
    seen = []
    encode = tokenizer._tokenizer.encode

    def recording(text, *args, **kwargs):
        seen.append(len(text))
        return encode(text, *args, **kwargs)

    monkeypatch.setattr(tokenizer, "_tokenizer", type("Recording", (), {"encode": staticmethod(recording)})())
    return seen


def test_a_ten_megabyte_prompt_tokenizes_only_a_window(monkeypatch):
    tokenizer = ClipTokenizer.from_folder()
    seen = record_tokenized_lengths(tokenizer, monkeypatch)
    text = "a red fox in the snow, photograph, " * 300_000  # 10.5 MB
    tokenized = tokenizer.tokenize(text)
    assert tokenized.length == 77 and tokenized.truncated > 0
    assert max(seen) <= WINDOW_CHARACTERS


def test_a_ten_megabyte_prompt_on_the_command_line():
    """clip-test (the same prompt encoder generate uses) with a 10 MB prompt: 77 tokens, those of its beginning."""
    text = "a red fox in the snow, photograph, " * 300_000
    result = CliRunner().invoke(main, ["clip-test", "-m", str(MODEL), "-p", text, "--json"])
    assert result.exit_code == 0, result.output[-500:]
    prompt = json.loads(result.output)["prompts"][0]
    assert prompt["token_count"] == 77 and prompt["truncated_tokens"] > 0
    assert prompt["ids"] == ClipTokenizer.from_folder().tokenize(text[:1000]).ids.tolist()


def test_short_prompts_are_not_cut():
    tokenizer = ClipTokenizer.from_folder()
    assert tokenizer.window("a cat") == "a cat"
    text = "a " * WINDOW_CHARACTERS  # longer than the window but only 2048 tokens: cut, yet past 77 tokens
    assert tokenizer.window(text) == text[:WINDOW_CHARACTERS]
    text = " " * (3 * WINDOW_CHARACTERS) + "a cat"  # long, yet only two tokens: never cut, its whitespace folded
    assert tokenizer.window(text) == " a cat"
    assert tokenizer.tokenize(text).ids.tolist() == tokenizer.tokenize("a cat").ids.tolist()


@pytest.mark.parametrize("text, same_as", [
    (" " * 10_000_000 + "a cat", "a cat"),
    ("\u3000" * 3_000_000 + "a cat", "a cat"),
    (("cat" + "\n" * 100_000) * 100, "cat " * 100),
    (("a red fox" + " \t" * 50_000) * 60, "a red fox " * 60),
], ids=["ten megabytes of spaces", "ideographic spaces", "long newline runs", "long mixed runs"])
def test_prompts_of_mostly_whitespace_tokenize_only_their_words(monkeypatch, text, same_as):
    """Prefixes of a mostly-whitespace prompt stay short of 77 tokens until the whole text is taken; folded, it
    is tokenized at the cost of its words."""
    tokenizer = ClipTokenizer.from_folder()
    expected = tokenizer.tokenize(same_as)
    seen = record_tokenized_lengths(tokenizer, monkeypatch)
    tokenized = tokenizer.tokenize(text)
    assert tokenized.ids.tolist() == expected.ids.tolist() and tokenized.length == expected.length
    assert max(seen) <= 2 * WINDOW_CHARACTERS


PIECES = ["a", "cat", "ÉCOLE", "straße", "İstanbul", "東京の夜景", "'s", "'ll", "don't", "!!!", "(((", "1", "9", " ", "\t",
          "\n", "\r\n", "\u3000", "\u00a0", "\u2000", "\u0301", "e\u0301", "1\u0301", " \u0301", "\x1c", "\u200b",
          "<|endoftext|>", "<|startoftext|>", "🙂", "👍🏽", "١٢٣", "½", "\x00", "'", "x" * 60, "ab" * 40, "-" * 30,
          " " * 700, "\n" * 300, "supercalifragilistic"]


@pytest.mark.parametrize("seed", range(4))
def test_random_long_prompts_keep_the_tokens_of_the_whole_text(seed):
    """Prompts of random pieces (whitespace of every kind and length, digits with combining marks, separators,
    special tokens, long words, scripts without spaces), each longer than the window, tokenize as the whole text
    does up to the encoder's 77 tokens."""
    tokenizer = ClipTokenizer.from_folder()
    rng = np.random.default_rng(seed)
    for _ in range(60):
        pieces = PIECES if rng.random() < 0.7 else ["東京の夜景", "ab" * 40, "!!!", "\u3000", "-" * 30, "x" * 60]
        text = ""
        while len(text) <= WINDOW_CHARACTERS * rng.integers(1, 6):
            text += pieces[rng.integers(len(pieces))]
        whole = tokenizer.encode(text)
        expected = whole if len(whole) <= tokenizer.max_length else whole[:tokenizer.max_length - 1] + [
            tokenizer.eos_id]
        tokenized = tokenizer.tokenize(text)
        assert tokenized.ids[:tokenized.length].tolist() == expected, repr(text[:300])
