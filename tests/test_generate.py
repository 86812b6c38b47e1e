"""`sdcli generate` end to end on a tiny random model: real subprocesses for what a shell script sees (files,
exit codes, one-line errors, Ctrl-C), CliRunner for the rest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("torch", reason="the tiny model is built with diffusers")
pytest.importorskip("diffusers")

import tiny_pipeline as tiny  # noqa: E402
from test_cli import run_with_references_blocked  # noqa: E402

from sdcli.cli import main  # noqa: E402
from sdcli.rng import BatchNoise  # noqa: E402

FAST = ["--steps", "3", "--width", "64", "--height", "64"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    _, folder = tiny.make_tiny_model("sd1", tmp_path_factory.mktemp("cli") / "tiny-sd1")
    return folder


def sdcli_run(*args, timeout=300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["sdcli", *map(str, args)], capture_output=True, text=True, timeout=timeout, **kwargs)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_png_with_its_parameters(model, tmp_path):
    out = tmp_path / "cat.png"
    result = sdcli_run("generate", "-m", model, "-p", "a cat, sitting", "-n", "blurry", "--seed", 7, *FAST,
                       "-o", out)
    assert result.returncode == 0, result.stderr
    image = Image.open(out)
    assert image.size == (64, 64) and image.mode == "RGB"
    parameters = image.text["parameters"]
    assert parameters.splitlines()[0] == "a cat, sitting"
    assert "Negative prompt: blurry" in parameters and "Seed: 7" in parameters and "Size: 64x64" in parameters
    assert "Steps: 3" in parameters and "Sampler: PLMS" in parameters  # the model's own scheduler: PNDM
    record = json.loads(image.text["sdcli"])
    assert record["seed"] == 7 and record["parameters"]["prompt"] == "a cat, sitting"
    assert "saved" in result.stdout and "peak memory" in result.stdout
    assert not [p for p in tmp_path.iterdir() if p.name != "cat.png"]  # no temporary left behind


def test_same_arguments_same_png(model, tmp_path):
    args = ["generate", "-m", model, "-p", "a dog", "--seed", "3", "--scheduler", "euler_a", *FAST]
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    assert invoke(*args, "-o", first).exit_code == 0
    assert invoke(*args, "-o", second).exit_code == 0
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))


def test_overwrite_is_honoured(model, tmp_path):
    out = tmp_path / "x.png"
    out.write_bytes(b"precious")
    refused = sdcli_run("generate", "-m", model, "-p", "a cat", *FAST, "-o", out)
    assert refused.returncode == 2 and "--overwrite" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and out.read_bytes() == b"precious"
    done = sdcli_run("generate", "-m", model, "-p", "a cat", *FAST, "-o", out, "--overwrite")
    assert done.returncode == 0, done.stderr
    assert Image.open(out).size == (64, 64)


def test_prompts_file_gives_one_file_per_prompt(model, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\n\n# a comment\na blue bird --seed 100 --steps 2\na green frog --scheduler ddim\n")
    out = tmp_path / "out"
    out.mkdir()
    result = sdcli_run("generate", "-m", model, "--prompts-file", prompts, "--seed", 1, *FAST, "-o", f"{out}/",
                       "--json")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 3 and len(list(out.iterdir())) == 3
    assert [r["parameters"]["prompt"] for r in records] == ["a red fox", "a blue bird", "a green frog"]
    assert [r["seed"] for r in records] == [1, 100, 2]
    assert records[1]["parameters"]["steps"] == 2 and records[2]["parameters"]["sampler"] == "ddim"
    for record in records:
        assert Image.open(record["path"]).text["parameters"].startswith(record["parameters"]["prompt"])


def test_several_images_in_batches_and_latents_round_trip(model, tmp_path):
    saved = tmp_path / "latents.npy"
    result = invoke("generate", "-m", model, "-p", "a cat", "--seed", 5, *FAST, "-N", 3, "-b", 2,
                    "-o", tmp_path / "cat.png", "--save-latents", saved, "--json")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["seed"] for r in records] == [5, 6, 7]
    assert all(os.path.exists(r["path"]) for r in records) and len({r["path"] for r in records}) == 3
    assert np.load(saved).shape == (3, 4, 8, 8)


def test_latents_file_reproduces_the_seeded_noise(model, tmp_path):
    """--latents with the noise a seed draws gives that seed's image: the scaling is the sampler's own."""
    noise = BatchNoise([11], (4, 8, 8)).draw()
    np.save(tmp_path / "noise.npy", noise)
    seeded, injected = tmp_path / "seeded.png", tmp_path / "injected.png"
    assert invoke("generate", "-m", model, "-p", "a cat", "--seed", 11, *FAST, "-o", seeded).exit_code == 0
    result = invoke("generate", "-m", model, "-p", "a cat", "--seed", 11, "--steps", 3,
                    "--latents", tmp_path / "noise.npy", "-o", injected)
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.asarray(Image.open(seeded)), np.asarray(Image.open(injected)))


@pytest.mark.parametrize("args,message", [
    (["--width", "500"], "multiple of 8"),
    (["--steps", "0"], "--steps"),
    (["--scheduler", "nonsense"], "--scheduler"),
    (["--model", "no/such/model"], "no model at"),
    (["--prompts-file", "missing.txt", "--prompt", "x"], "either --prompt or --prompts-file"),
])
def test_bad_arguments_are_one_line_errors(model, tmp_path, args, message):
    base = ["generate", "-m", str(model), "-p", "a cat", "--steps", "2", "-o", str(tmp_path / "x.png")]
    result = sdcli_run(*base, *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
    assert not list(tmp_path.iterdir())


def test_ctrl_c_keeps_finished_images_and_leaves_no_partial_file(model, tmp_path):
    out = tmp_path / "run.png"
    # enough steps that the second image is still being made when the first is saved
    process = subprocess.Popen(["sdcli", "generate", "-m", str(model), "-p", "a cat", "--seed", "1", "-N", "3",
                                "--steps", "400", "--scheduler", "euler", "--width", "64", "--height", "64",
                                "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               # as a terminal's Ctrl-C finds it: a test run started in the background inherits an
                               # ignored SIGINT, which Python would keep (and never raise KeyboardInterrupt)
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while not list(tmp_path.glob("run-*.png")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    finished = sorted(tmp_path.glob("run-*.png"))
    assert process.returncode == 130, stderr
    assert 1 <= len(finished) < 3, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in finished]  # nothing partial
    for path in finished:
        assert Image.open(path).size == (64, 64)
    assert stderr.strip().splitlines()[-1] == "error: interrupted"


def test_generate_never_imports_torch(model, tmp_path):
    out = tmp_path / "guard.png"
    result = run_with_references_blocked(["generate", "-m", model, "-p", "a cat", "--steps", "2", "--width", "64",
                                          "--height", "64", "--vae", "taesd", "-o", out])
    assert result.returncode == 0, result.stderr
    assert Image.open(out).size == (64, 64)
