"""The command line end to end: CliRunner for the behaviour, real subprocesses for the installed entry point."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from sdcli.cli import main

torch = pytest.importorskip("torch", reason="torch/transformers/diffusers are the references")
diffusers = pytest.importorskip("diffusers")

import reference_models as ref  # noqa: E402
from data_paths import CONFIGS  # noqa: E402

TINY_TEXT_CONFIG = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                        layer_norm_eps=1e-5, projection_dim=32)
TOL = {
    "fp32": 1e-4,  # float32 end to end on a tiny model
    # noise-test's tables against diffusers': float64 sums and products rounded to float32 against torch's
    # float32 cumprod, which is at most a few ulps of values <= 1 apart
    "tables": 1e-6,
}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    model = ref.random_clip_text_model(TINY_TEXT_CONFIG, seed=3)
    folder = ref.write_diffusers_folder(tmp_path_factory.mktemp("tiny") / "tiny-sd1", CONFIGS / "sd15",
                                        TINY_TEXT_CONFIG, ref.canonical_state(model))
    return folder, model


def run(args, **kwargs):
    return CliRunner().invoke(main, args, catch_exceptions=False, **kwargs)


def test_help_lists_every_command():
    result = run(["--help"])
    assert result.exit_code == 0
    for command in ("download", "clip-test", "noise-test", "generate", "video"):
        assert command in result.output


def test_clip_test_json_matches_transformers(tiny_model):
    folder, model = tiny_model
    result = run(["clip-test", "--model", str(folder), "--prompt", "a cat", "--prompt", "a dog on a skateboard",
                  "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["shape"] == [2, 77, 32]
    ids = np.array([p["ids"] for p in report["prompts"]])
    assert ids.shape == (2, 77) and report["prompts"][0]["token_count"] == 4
    with torch.no_grad():
        expected = model(input_ids=torch.from_numpy(ids)).last_hidden_state.numpy()
    assert report["stats"]["mean"] == pytest.approx(float(expected.mean()), abs=TOL["fp32"])
    assert report["stats"]["std"] == pytest.approx(float(expected.std()), abs=TOL["fp32"])
    assert report["model"]["family"] == "sd1"


def test_clip_test_save_and_overwrite(tiny_model, tmp_path):
    folder, model = tiny_model
    out = tmp_path / "emb.npy"
    args = ["clip-test", "-m", str(folder), "-p", "a cat", "-n", "blurry", "--save", str(out)]
    assert run(args).exit_code == 0
    saved = np.load(out)
    assert saved.shape == (2, 77, 32) and saved.dtype == np.float32
    again = run(args)
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert run(args + ["--overwrite"]).exit_code == 0
    assert [p.name for p in tmp_path.iterdir()] == ["emb.npy"]  # no temporary files left behind


def test_clip_test_human_output(tiny_model):
    folder, _ = tiny_model
    result = run(["clip-test", "-m", str(folder), "-p", "a cat", "--clip-skip", "2"])
    assert result.exit_code == 0
    assert "embedding (1, 77, 32)" in result.output and "49406 320 2368 49407" in result.output


def test_clip_test_missing_model_is_one_line(tmp_path):
    result = run(["clip-test", "--model", str(tmp_path / "nowhere"), "--prompt", "a cat"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "no model at" in lines[0] and "WEIGHTS.md" in lines[0]


def test_clip_test_refuses_pickles(tmp_path):
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"not really a pickle")
    result = run(["clip-test", "--model", str(checkpoint), "--prompt", "a cat"])
    assert result.exit_code == 2
    assert "pickle" in result.output and "safetensors" in result.output


def test_clip_test_bad_clip_skip(tiny_model):
    folder, _ = tiny_model
    result = run(["clip-test", "-m", str(folder), "-p", "a cat", "--clip-skip", "9"])
    assert result.exit_code == 2 and "clip_skip must be between 1 and 3" in result.output


def test_noise_test_json_equals_diffusers():
    result = run(["noise-test", "--json", "--steps", "20"])
    assert result.exit_code == 0
    report = json.loads(result.output)
    reference = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        steps_offset=1, set_alpha_to_one=False)
    reference.set_timesteps(20)
    np.testing.assert_allclose(report["betas"], reference.betas.numpy(), atol=TOL["tables"], rtol=0)
    np.testing.assert_allclose(report["alphas_cumprod"], reference.alphas_cumprod.numpy(), atol=TOL["tables"], rtol=0)
    assert report["timesteps"] == reference.timesteps.tolist()
    assert len(report["sigmas"]) == 1000


def test_noise_test_options_and_model(tiny_model):
    folder, _ = tiny_model
    result = run(["noise-test", "--model", str(folder), "--schedule", "linear", "--beta-start", "0.0001",
                  "--beta-end", "0.02", "--train-steps", "500", "--steps", "10", "--spacing", "trailing", "--json"])
    report = json.loads(result.output)
    reference = diffusers.DDIMScheduler(num_train_timesteps=500, beta_schedule="linear", beta_start=0.0001,
                                        beta_end=0.02, timestep_spacing="trailing")
    reference.set_timesteps(10)
    np.testing.assert_allclose(report["alphas_cumprod"], reference.alphas_cumprod.numpy(), atol=TOL["tables"], rtol=0)
    assert report["timesteps"] == reference.timesteps.tolist()
    table = run(["noise-test", "--steps", "5"])
    assert table.exit_code == 0 and "alpha_bar" in table.output and "sigma" in table.output


def test_noise_test_bad_arguments():
    assert run(["noise-test", "--steps", "0"]).exit_code == 2
    assert run(["noise-test", "--schedule", "cubic"]).exit_code == 2
    result = run(["noise-test", "--beta-start", "0.5", "--beta-end", "0.1"])
    assert result.exit_code == 2 and "above" in result.output
    result = run(["noise-test", "--steps", "2000"])
    assert result.exit_code == 2 and "between 1 and" in result.output


BLOCK_REFERENCES = (
    "import importlib.abc, sys\n"
    "class Block(importlib.abc.MetaPathFinder):\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] in ('torch', 'tensorflow', 'jax', 'diffusers', 'transformers'):\n"
    "            raise ImportError('blocked: ' + name)\n"
    "sys.meta_path.insert(0, Block())\n"
)


def run_with_references_blocked(argv: list[str]) -> subprocess.CompletedProcess:
    """``sdcli *argv`` in a real subprocess with the reference frameworks made unimportable; the child also
    asserts that torch never entered sys.modules."""
    code = BLOCK_REFERENCES + (
        "import runpy\n"
        f"sys.argv = ['sdcli', *{[str(a) for a in argv]!r}]\n"
        "try:\n"
        "    runpy.run_module('sdcli', run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    assert not exit.code, exit.code\n"
        "assert 'torch' not in sys.modules\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_import_and_cli_never_touch_torch(tiny_model, tmp_path):
    folder, _ = tiny_model
    result = run_with_references_blocked(["clip-test", "--model", folder, "--prompt", "a cat", "--json"])
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["shape"] == [1, 77, 32]


def test_installed_entry_point(tiny_model):
    folder, _ = tiny_model
    result = subprocess.run(["sdcli", "clip-test", "-m", str(folder), "-p", "a cat", "--json"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    missing = subprocess.run(["sdcli", "clip-test", "-m", "no/such/model", "-p", "a cat"],
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
