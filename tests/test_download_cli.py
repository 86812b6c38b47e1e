"""`sdcli download` and first-use downloads end to end against the fake Hub of tests/hub_server.py (127.0.0.1
only): real subprocesses for what a script sees (files, exit codes, one-line errors, the token kept out of every
output), CliRunner with a monkeypatched preset table for presets and for `generate --model PRESET` downloading a
tiny real model on first use.

Every subprocess runs the working tree's sdcli with HOME, HF_HOME and the working folder in tmp_path, HF_ENDPOINT
at the fake Hub and no proxy, so neither the real home nor any other host is ever reached.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from hub_server import FakeHub
from sdcli import cli, models
from sdcli.cli import main
from sdcli.families.animatediff import ADAPTER_FILES, MotionAdapterPreset, VideoDefaults
from sdcli.models import ModelPreset

REPO_ROOT = Path(__file__).resolve().parents[1]
CLEARED = ("SDCLI_WEIGHTS", "SDCLI_AUTO_DOWNLOAD", "HF_HOME", "HF_HUB_CACHE", "XDG_CACHE_HOME", "HF_HUB_OFFLINE",
           "HF_TOKEN", "HF_TOKEN_PATH", "HF_ENDPOINT", "COLUMNS")
TOKEN = "hf_sEcReT0123456789abcdef"

NEEDED = ["model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json", "unet/config.json",
          "vae/config.json", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
          "tokenizer/tokenizer_config.json", "tokenizer/vocab.json"]
WEIGHTS = {"fp16": ["text_encoder/model.fp16.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
                    "vae/diffusion_pytorch_model.fp16.safetensors"],
           "fp32": ["text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                    "vae/diffusion_pytorch_model.safetensors"]}
EXTRAS = ["text_encoder/pytorch_model.bin", "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.fp16.bin",
          "unet/diffusion_pytorch_model.non_ema.safetensors", "unet/diffusion_flax_model.msgpack", "unet/model.onnx",
          "safety_checker/model.safetensors", "safety_checker/config.json", "v1-5-pruned-emaonly.ckpt",
          "v1-5-pruned-emaonly.safetensors", "README.md"]


def repo_files(seed: int = 0) -> dict[str, bytes]:
    """A diffusers-shaped repo: small JSON/text files, weights of a few tens of kB, and every extra a real SD repo
    holds that sdcli must not fetch."""
    rng = random.Random(seed)
    return {path: (rng.randbytes(rng.randrange(20_000, 60_000)) if path.endswith((".safetensors", ".bin", ".ckpt",
                                                                               ".msgpack", ".onnx"))
                   else b'{"name": "%s"}' % path.encode())
            for path in NEEDED + WEIGHTS["fp16"] + WEIGHTS["fp32"] + EXTRAS}


# The motion-adapter presets' repositories (their real file lists, small random contents) and a repo id that holds a
# diffusers MotionAdapter: path -> expected on disk after 'sdcli download NAME'.
LIGHTNING = "animatediff_lightning_4step_diffusers.safetensors"
LCM_LORA = "AnimateLCM_sd15_t2v_lora.safetensors"
ADAPTER_REPOS = {
    "guoyww/animatediff-motion-adapter-v1-5-2": [".gitattributes", "README.md", "config.json",
                                                 "diffusion_pytorch_model.fp16.safetensors",
                                                 "diffusion_pytorch_model.safetensors"],
    "ByteDance/AnimateDiff-Lightning": [".gitattributes", "LICENSE.md", "README.md", "comfyui/workflow.json",
                                        "animatediff_lightning_report.pdf"]
                                       + [f"animatediff_lightning_{n}step_{kind}.safetensors" for n in (2, 4, 8)
                                          for kind in ("comfyui", "diffusers")],
    "wangfuyun/AnimateLCM": [".gitattributes", "AnimateLCM_sd15_t2v.ckpt", LCM_LORA, "README.md", "config.json",
                             "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.safetensors"],
    "someone/adapter": ["README.md", "config.json", "diffusion_pytorch_model.bin",
                        "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.safetensors"],
}
ADAPTER_DOWNLOADS = {  # name -> (folder under the weights dir, its files)
    "animatediff-v1-5-2": ("animatediff-v1-5-2", {"config.json", "diffusion_pytorch_model.safetensors"}),
    "animatediff-lightning": ("animatediff-lightning", {LIGHTNING}),
    "animatelcm": ("animatelcm", {"config.json", "diffusion_pytorch_model.fp16.safetensors", LCM_LORA}),
    "someone/adapter": ("someone--adapter", {"config.json", "diffusion_pytorch_model.fp16.safetensors"}),
}


def adapter_files(repo_id: str, seed: int = 0) -> dict[str, bytes]:
    rng = random.Random(f"{repo_id}:{seed}")
    return {path: (rng.randbytes(rng.randrange(20_000, 60_000)) if path.endswith((".safetensors", ".bin", ".ckpt"))
                   else b'{"name": "%s"}' % path.encode())
            for path in ADAPTER_REPOS[repo_id]}


def on_disk(folder: Path) -> set[str]:
    """The model files in a folder, without the download's own records."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")
            if p.is_file() and ".sdcli-download" not in p.parts}


@pytest.fixture(scope="module")
def hub():
    with FakeHub() as server:
        server.add_repo("org/tiny", repo_files())
        server.add_repo("org/gated", repo_files(1), gated=True)
        for repo_id in ADAPTER_REPOS:
            server.add_repo(repo_id, adapter_files(repo_id))
        server.add_repo("ByteDance/AnimateDiff-Lightning", adapter_files("ByteDance/AnimateDiff-Lightning", 1),
                        revision="v1")
        server.tokens = {TOKEN: {"org/gated"}, "hf_otherToken42": {"org/elsewhere"}}
        yield server


def sdcli_run(tmp_path: Path, hub: FakeHub, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m sdcli ARGS`` from the working tree, in tmp_path, talking only to the fake Hub."""
    clean = {key: value for key, value in os.environ.items()
             if key not in CLEARED and not key.lower().endswith("_proxy")}
    clean.update(PYTHONPATH=str(REPO_ROOT), HOME=str(tmp_path / "home"), HF_HOME=str(tmp_path / "hf"),
                 HF_ENDPOINT=hub.endpoint, NO_PROXY="127.0.0.1", no_proxy="127.0.0.1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "sdcli", *map(str, args)], cwd=tmp_path, env=clean,
                          capture_output=True, text=True, timeout=120)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# -- sdcli download in a subprocess --------------------------------------------------------------------------------

def test_repo_download_then_a_rerun_that_transfers_nothing(hub, tmp_path):
    hub.clear_records()
    result = sdcli_run(tmp_path, hub, "download", "org/tiny")
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "weights" / "org--tiny"
    expected = set(NEEDED + WEIGHTS["fp16"])
    assert on_disk(folder) == expected  # the fp16 weights, no pickle, ONNX, Flax, EMA or safety checker
    files = repo_files()
    assert all((folder / path).read_bytes() == files[path] for path in expected)
    megabytes = sum(len(files[path]) for path in expected) / 1e6
    assert result.stdout.strip() == (f"downloaded {len(expected)} files ({megabytes:.1f} MB) to weights/org--tiny; "
                                     "skipped 0 already present")
    lines = result.stderr.strip().splitlines()  # not a terminal: one line per file
    assert sorted(line.split()[1] for line in lines) == sorted(expected)
    assert all(line.startswith("fetched ") for line in lines)
    assert hub.total_bytes_sent() == sum(len(files[path]) for path in expected)

    hub.clear_records()
    again = sdcli_run(tmp_path, hub, "download", "org/tiny")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == (f"downloaded 0 files (0.0 MB) to weights/org--tiny; skipped {len(expected)} "
                                    "already present")
    assert all(line.endswith("(already present)") for line in again.stderr.strip().splitlines())
    assert hub.total_bytes_sent() == 0 and not hub.requests_to("cdn")


def test_fp32_variant_into_another_folder_quietly(hub, tmp_path):
    result = sdcli_run(tmp_path, hub, "download", "org/tiny", "--variant", "fp32", "--dir", "models", "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""
    assert on_disk(tmp_path / "models" / "org--tiny") == set(NEEDED + WEIGHTS["fp32"])


def test_include_replaces_the_file_list(hub, tmp_path):
    result = sdcli_run(tmp_path, hub, "download", "org/tiny", "--include", "unet/*", "--include", "model_index.json",
                       "-q")
    assert result.returncode == 0, result.stderr
    assert on_disk(tmp_path / "weights" / "org--tiny") == {
        "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors"}


def test_gated_repo_needs_a_token_that_is_never_printed(hub, tmp_path):
    refused = sdcli_run(tmp_path, hub, "download", "org/gated")
    assert refused.returncode == 3
    line = one_error_line(refused)
    assert "org/gated" in line and "HF_TOKEN" in line and "accept its license" in line
    no_access = sdcli_run(tmp_path, hub, "download", "org/gated", "--token", "hf_otherToken42")
    assert no_access.returncode == 3 and "hf_otherToken42" not in no_access.stdout + no_access.stderr
    one_error_line(no_access)
    for how in (["--token", TOKEN], []):  # the option, then the token file the Hugging Face tools store
        if not how:
            (tmp_path / "hf").mkdir(exist_ok=True)
            (tmp_path / "hf" / "token").write_text(TOKEN + "\n")
        result = sdcli_run(tmp_path, hub, "download", "org/gated", "--dir", f"w{len(how)}", *how)
        assert result.returncode == 0, result.stderr
        assert TOKEN not in result.stdout + result.stderr
        assert on_disk(tmp_path / f"w{len(how)}" / "org--gated") == set(NEEDED + WEIGHTS["fp16"])


def test_not_found_and_bad_names_are_one_line_errors(hub, tmp_path):
    missing = sdcli_run(tmp_path, hub, "download", "org/absent")
    assert missing.returncode == 2 and "org/absent" in one_error_line(missing)
    unknown = sdcli_run(tmp_path, hub, "download", "nonsense")
    assert unknown.returncode == 2 and "unknown model 'nonsense'" in one_error_line(unknown)
    revision = sdcli_run(tmp_path, hub, "download", "org/tiny", "--revision", "v9")
    assert revision.returncode == 2 and "v9" in one_error_line(revision)
    assert not (tmp_path / "weights").exists() or not any((tmp_path / "weights").rglob("*.safetensors"))


def test_offline_never_touches_the_network(hub, tmp_path):
    hub.clear_records()
    result = sdcli_run(tmp_path, hub, "download", "org/tiny", env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and "offline" in one_error_line(result)
    assert not hub.requests and not (tmp_path / "weights").exists()


def test_list_shows_every_preset(hub, tmp_path):
    result = sdcli_run(tmp_path, hub, "download", "--list")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for option, presets in (("--model", models.PRESETS), ("--motion-adapter", models.MOTION_ADAPTER_PRESETS)):
        for preset in presets.values():
            assert any(line.split()[:3] == [preset.name, option, preset.repo_id] for line in lines), preset.name
    assert "2.1 GB" in result.stdout and "4.3 GB" in result.stdout and "CreativeML OpenRAIL-M" in result.stdout
    assert "908 MB" in result.stdout and "motion-adapter" in result.stdout


# -- motion adapters: presets and repo ids ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(ADAPTER_DOWNLOADS))
def test_motion_adapter_download_then_a_rerun_that_transfers_nothing(hub, tmp_path, name):
    """Each adapter preset fetches only the files sdcli reads (the folder kind, the single file, AnimateLCM's LoRA
    with its adapter), as model presets do; a repo id holding a MotionAdapter is fetched as one."""
    folder_name, expected = ADAPTER_DOWNLOADS[name]
    repo_id = models.model_source(name).repo_id
    hub.clear_records()
    result = sdcli_run(tmp_path, hub, "download", name)
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "weights" / folder_name
    assert on_disk(folder) == expected
    files = adapter_files(repo_id)
    assert all((folder / path).read_bytes() == files[path] for path in expected)
    megabytes = sum(len(files[path]) for path in expected) / 1e6
    assert result.stdout.strip() == (f"downloaded {len(expected)} files ({megabytes:.1f} MB) to weights/"
                                     f"{folder_name}; skipped 0 already present")
    assert sorted(line.split()[1] for line in result.stderr.strip().splitlines()) == sorted(expected)
    assert hub.total_bytes_sent() == sum(len(files[path]) for path in expected)

    hub.clear_records()
    again = sdcli_run(tmp_path, hub, "download", name)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip().endswith(f"skipped {len(expected)} already present")
    assert hub.total_bytes_sent() == 0


def test_motion_adapter_download_with_dir_and_revision(hub, tmp_path):
    result = sdcli_run(tmp_path, hub, "download", "animatediff-lightning", "--dir", "models", "--revision", "v1", "-q")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""
    file = tmp_path / "models" / "animatediff-lightning" / LIGHTNING
    assert file.read_bytes() == adapter_files("ByteDance/AnimateDiff-Lightning", 1)[LIGHTNING]
    variant = sdcli_run(tmp_path, hub, "download", "animatelcm", "--variant", "fp32", "--dir", "fp32", "-q")
    assert variant.returncode == 0, variant.stderr
    assert on_disk(tmp_path / "fp32" / "animatelcm") == {"config.json", "diffusion_pytorch_model.safetensors",
                                                         LCM_LORA}


def test_video_with_a_missing_motion_adapter_in_a_script(hub, tmp_path):
    """Not a terminal, no --yes: exit 2 with the exact command, after the outputs were checked, nothing fetched."""
    hub.clear_records()
    (tmp_path / "model").mkdir()  # a model that exists: the adapter is looked up before anything loads
    result = sdcli_run(tmp_path, hub, "video", "--model", "model", "--motion-adapter", "animatediff-lightning",
                       "-p", "a corgi", "-o", "corgi.mp4")
    assert result.returncode == 2
    line = one_error_line(result)
    assert line.startswith(f"error: animatediff-lightning is not downloaded (weights/animatediff-lightning/"
                           f"{LIGHTNING} is not there")
    assert line.endswith("; run: sdcli download animatediff-lightning")
    taken = sdcli_run(tmp_path, hub, "video", "--model", "model", "--motion-adapter", "animatelcm", "-p", "a corgi",
                      "-o", "clip.png", "--yes")
    assert taken.returncode == 2 and "clip.png: a video is written as" in one_error_line(taken)
    offline = sdcli_run(tmp_path, hub, "video", "--model", "model", "--motion-adapter", "animatelcm", "-p", "a corgi",
                        "-o", "corgi.mp4", "--yes", "--offline")
    assert offline.returncode == 2 and "downloads are off" in one_error_line(offline)
    assert not hub.requests and not (tmp_path / "weights").exists()


def test_generate_with_a_missing_preset_in_a_script(hub, tmp_path):
    """Not a terminal, no --yes: exit 2, the exact command in the one error line, nothing fetched."""
    hub.clear_records()
    result = sdcli_run(tmp_path, hub, "generate", "--model", "sd15", "-p", "a cat", "--seed", "1", "-o", "cat.png")
    assert result.returncode == 2
    line = one_error_line(result)
    assert line.endswith("run: sdcli download sd15") and "weights/sd15 is not there" in line
    clip = sdcli_run(tmp_path, hub, "clip-test", "--model", "someone/model", "-p", "a cat")
    assert clip.returncode == 2 and one_error_line(clip).endswith("run: sdcli download someone/model")
    offline = sdcli_run(tmp_path, hub, "generate", "-m", "sd21", "-p", "a cat", "--seed", "1", "--yes", "--offline")
    assert offline.returncode == 2 and "downloads are off" in one_error_line(offline)
    assert not hub.requests and not list(tmp_path.glob("*.png"))


# -- presets and first use, in-process with a preset table pointing at the fake Hub ------------------------------

@pytest.fixture
def in_tmp(monkeypatch, tmp_path, hub):
    """CliRunner runs in tmp_path with the fake Hub as the endpoint and a clean environment."""
    for name in CLEARED:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def preset_for(repo_id: str, name: str = "tiny", size: int | None = None) -> ModelPreset:
    return ModelPreset(name=name, repo_id=repo_id, revision="main", layout="diffusers", files=models.DIFFUSERS_FILES,
                       variant="fp16", family="sd1", size_bytes=size, license="test", description="a test model",
                       page=f"https://huggingface.co/{repo_id}")


def invoke(*args, **kwargs):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, **kwargs)


def test_preset_download(in_tmp, monkeypatch):
    monkeypatch.setitem(models.PRESETS, "tiny", preset_for("org/tiny"))
    result = invoke("download", "tiny")
    assert result.exit_code == 0, result.output
    assert on_disk(in_tmp / "weights" / "tiny") == set(NEEDED + WEIGHTS["fp16"])
    assert "to weights/tiny; skipped 0 already present" in result.output
    assert models.resolve_model("tiny") == Path("weights/tiny")
    fp32 = invoke("download", "tiny", "--variant", "fp32", "--dir", "w32", "-q")
    assert fp32.exit_code == 0 and on_disk(in_tmp / "w32" / "tiny") == set(NEEDED + WEIGHTS["fp32"])


@pytest.fixture(scope="module")
def tiny_repo(hub, tmp_path_factory, diffusers):
    """A real tiny SD1-structured diffusers model (random weights, built with diffusers), served as org/tiny-sd1
    with plain weights only: the fp16 preset falls back to them."""
    import tiny_pipeline

    _, folder = tiny_pipeline.make_tiny_model("sd1", tmp_path_factory.mktemp("tiny") / "model")
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    hub.add_repo("org/tiny-sd1", files, lfs=[path for path in files if path.endswith(".safetensors")])
    return files


def test_generate_first_use_asks_then_downloads_and_runs(in_tmp, monkeypatch, tiny_repo):
    size = sum(len(data) for data in tiny_repo.values())
    monkeypatch.setitem(models.PRESETS, "tiny", preset_for("org/tiny-sd1", size=size))
    monkeypatch.setattr(cli, "is_interactive", lambda: True)
    args = ["generate", "-m", "tiny", "-p", "a cat", "--seed", "1", "--steps", "2", "-W", "64", "-H", "64",
            "--vae", "taesd"]
    declined = invoke(*args, "-o", "no.png", input="n\n")
    assert declined.exit_code == 2
    assert f"download tiny (about {models.format_size(size)}) to weights/tiny? [y/N]" in declined.output
    assert "run: sdcli download tiny" in declined.output and not (in_tmp / "weights" / "tiny").exists()
    accepted = invoke(*args, "-o", "yes.png", input="y\n")
    assert accepted.exit_code == 0, accepted.output
    assert (in_tmp / "yes.png").is_file()
    assert {p for p in tiny_repo if not p.startswith("safety_checker")} <= on_disk(in_tmp / "weights" / "tiny")
    assert "fetched unet/diffusion_pytorch_model.safetensors" in accepted.output


@pytest.mark.parametrize("how", ["--yes", "SDCLI_AUTO_DOWNLOAD"])
def test_clip_test_downloads_without_asking(in_tmp, monkeypatch, tiny_repo, how):
    monkeypatch.setitem(models.PRESETS, "tiny", preset_for("org/tiny-sd1"))
    if how == "SDCLI_AUTO_DOWNLOAD":
        monkeypatch.setenv("SDCLI_AUTO_DOWNLOAD", "1")
    result = invoke("clip-test", "-m", "tiny", "-p", "a cat", "--json", *([how] if how == "--yes" else []))
    assert result.exit_code == 0, result.output
    assert '"shape": [1, 77, 32]' in result.output and "[y/N]" not in result.output
    assert not models.missing_parts(in_tmp / "weights" / "tiny")


@pytest.fixture(scope="module")
def tiny_video_model(hub, tmp_path_factory, diffusers):
    """A real tiny SD1 model (a local folder) and its tiny motion adapter, served as org/tiny-adapter."""
    import tiny_pipeline

    _, model, adapter = tiny_pipeline.make_tiny_video_model(tmp_path_factory.mktemp("tiny-video"))
    files = {p.relative_to(adapter).as_posix(): p.read_bytes() for p in adapter.rglob("*") if p.is_file()}
    hub.add_repo("org/tiny-adapter", files)
    return model


def test_video_fetches_a_motion_adapter_preset_with_yes_and_uses_its_settings(in_tmp, monkeypatch, tiny_video_model):
    preset = MotionAdapterPreset(
        name="tiny-adapter", repo_id="org/tiny-adapter", revision="main", layout="motion-adapter",
        files=ADAPTER_FILES, variant=None, family="sd1", size_bytes=None, license="test",
        description="a test adapter", page="https://huggingface.co/org/tiny-adapter",
        defaults=VideoDefaults("euler", {"timestep_spacing": "trailing", "beta_schedule": "linear"}, steps=2,
                               guidance_scale=1.0))
    monkeypatch.setitem(models.MOTION_ADAPTER_PRESETS, "tiny-adapter", preset)
    args = ["video", "-m", tiny_video_model, "--motion-adapter", "tiny-adapter", "-p", "a cat", "--frames", "2",
            "-W", "64", "-H", "64", "--seed", "1", "-q", "--json"]
    refused = invoke(*args, "-o", "no.gif")
    assert refused.exit_code == 2 and "run: sdcli download tiny-adapter" in refused.output
    result = invoke(*args, "-o", "clip.gif", "--yes")
    assert result.exit_code == 0, result.output
    assert on_disk(in_tmp / "weights" / "tiny-adapter") == {"config.json", "diffusion_pytorch_model.safetensors"}
    parameters = json.loads(result.output.strip().splitlines()[-1])["parameters"]
    assert (parameters["sampler"], parameters["steps"], parameters["guidance_scale"],
            parameters["timestep_spacing"]) == ("euler", 2, 1.0, "trailing")
    assert (in_tmp / "clip.gif").is_file() and not (in_tmp / "no.gif").exists()
