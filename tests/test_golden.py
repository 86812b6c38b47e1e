"""The golden end-to-end test, without torch (in the manner of llama2.c's test): ``sdcli generate`` on a tiny
committed checkpoint must draw the PNG that diffusers drew from it (tests/make_golden.py made both).

Both sides compute in float32 on the same fp16-valued weights from the same initial noise; they differ by a few
float32 roundings, which can move a pixel that lies within about 1e-5 of a rounding boundary to the next 8-bit
level and no further.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data_paths import TEST_DATA

GOLDEN = TEST_DATA / "golden"
CASE = json.loads((GOLDEN / "case.json").read_text())

TOL = {
    # the largest difference of any pixel channel, in 8-bit levels (measured: 1)
    "levels": 1,
    # the share of pixel channels that may differ at all (measured: 1 of 12288)
    "differing": 0.002,
}


def generate_args(output) -> list[str]:
    return ["generate", "-m", str(GOLDEN / "tiny-sd1"), "-p", CASE["prompt"], "-n", CASE["negative_prompt"],
            "--seed", str(CASE["seed"]), "--steps", str(CASE["steps"]), "--guidance", str(CASE["guidance"]),
            "-W", str(CASE["width"]), "-H", str(CASE["height"]), "-o", str(output), "--quiet"]


def assert_matches_golden(path) -> None:
    ours = np.asarray(Image.open(path).convert("RGB")).astype(np.int16)
    expected = np.asarray(Image.open(GOLDEN / CASE["expected"]).convert("RGB")).astype(np.int16)
    assert ours.shape == expected.shape == (CASE["height"], CASE["width"], 3)
    difference = np.abs(ours - expected)
    assert difference.max() <= TOL["levels"]
    assert np.mean(difference > 0) <= TOL["differing"]
    assert expected.std() > 10  # a picture, not a flat field


def test_sdcli_generate_draws_the_golden_png(tmp_path):
    """The installed command, in its own process, with the default (compiled) backend."""
    output = tmp_path / "golden.png"
    result = subprocess.run([sys.executable, "-m", "sdcli", *generate_args(output)], capture_output=True, text=True,
                            env={**os.environ, "SDCLI_AUTO_DOWNLOAD": "0"}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert_matches_golden(output)


def test_numpy_backend_draws_the_golden_png(tmp_path):
    from click.testing import CliRunner

    from sdcli.cli import main

    output = tmp_path / "golden.png"
    result = CliRunner().invoke(main, [*generate_args(output), "--backend", "numpy"])
    assert result.exit_code == 0, result.output
    assert_matches_golden(output)


def test_the_golden_run_imports_no_reference_library(tmp_path):
    """sdcli never imports torch, diffusers or transformers, even where they are installed."""
    code = ("import sys, sdcli.cli; sdcli.cli.main(sys.argv[1:], standalone_mode=False); "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code, *generate_args(tmp_path / "x.png")], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("name", ["text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                                  "vae/diffusion_pytorch_model.safetensors"])
def test_the_checkpoint_is_tiny(name):
    assert (GOLDEN / "tiny-sd1" / name).stat().st_size < 500_000
