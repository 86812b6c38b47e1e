"""Named models (presets), where their weights live on disk, and how a model argument becomes an opened checkpoint.

A model argument (``--model``) is looked up in this order:

1. an **existing path**: a diffusers folder or a single ``.safetensors`` file, used as it is;
2. a **preset name** (``sd15``, see :data:`PRESETS`, every model family's presets): ``<weights>/sd15`` when it
   holds everything sdcli reads (for a single-file preset: the file inside that folder), else the Hugging Face
   cache's snapshot of the preset's repository when that snapshot holds it;
3. a **Hub repo id** (``org/name``): ``<weights>/org--name`` (``/`` becomes ``--``, as the Hugging Face cache
   names its folders), else the Hugging Face cache;
4. a **folder name** under ``<weights>`` that a user put there by hand.

``<weights>`` is ``$SDCLI_WEIGHTS``, else ``./weights`` (:func:`weights_dir`). The Hugging Face
cache is ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``: a repository lives in
``models--ORG--NAME/``, ``refs/<revision>`` holds the commit a revision points at, and ``snapshots/<commit>/`` the
files (symlinks into ``blobs/``).

A preset or repo id found nowhere raises :class:`ModelNotDownloadedError`, whose one-line message carries the exact
``sdcli download`` command, unless the caller allows the download: then the files are fetched from the Hub into
``<weights>/<name>`` (:func:`download_model`). ``HF_HUB_OFFLINE=1`` (or ``offline=True``) never downloads.

:func:`open_checkpoint` opens what a model argument names as the model family that recognises it.

A motion adapter argument (``--motion-adapter``) is looked up the same way (:func:`resolve_motion_adapter`), with
the motion-adapter presets (:data:`MOTION_ADAPTER_PRESETS`, ``animatediff-lightning``, ...) and, for a repo id or
a folder, a diffusers ``MotionAdapter`` (``config.json`` and its weights) where a model has ``model_index.json``
and its networks. ``sdcli download`` fetches both kinds; a repo id whose listing holds a motion adapter rather
than a model is fetched as one. :func:`open_motion_adapter` opens what an adapter argument names, knowing its
preset (whose settings the video pipeline applies).

The presets list only the files sdcli reads. A diffusers repository also holds pickles, EMA and non-EMA copies,
ONNX and Flax exports and a safety checker that sdcli never uses (and must not unpickle); those are not fetched.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

from .config import read_json
from .errors import CheckpointError, ModelNotFoundError, SdcliError
from .families import FAMILIES, Family, ModelPreset, family_of
from .families import animatediff
from .families.animatediff import ADAPTER_FILES, ADAPTER_STEM, MotionAdapterPreset, OpenedAdapter
from .io.checkpoint import MISSING_MODEL_HINT, Checkpoint, open_checkpoint as open_path

if TYPE_CHECKING:  # sdcli.hub imports requests; it is imported only when a download happens
    from .hub import DownloadProgress, DownloadResult, HubClient, RepoFile

logger = logging.getLogger("sdcli")

AUTO_DOWNLOAD_ENV = "SDCLI_AUTO_DOWNLOAD"
VARIANTS = ("fp16", "bf16", "fp32")  # what --variant offers; fp32 means the plain (unsuffixed) weight files

WEIGHTS_ENV = "SDCLI_WEIGHTS"

# What sdcli reads from a diffusers repository of any family (a repo id names no family until it is downloaded).
DIFFUSERS_FILES = tuple(dict.fromkeys(pattern for family in FAMILIES.values() for pattern in family.diffusers_files))

PRESETS: dict[str, ModelPreset] = {preset.name: preset for family in FAMILIES.values() for preset in family.presets}
MODEL_PRESETS = tuple(PRESETS)  # preset names, in the table's order
MOTION_ADAPTER_PRESETS: dict[str, MotionAdapterPreset] = {preset.name: preset for preset in animatediff.PRESETS}
ADAPTER_LAYOUT = "motion-adapter"  # a diffusers MotionAdapter: config.json and its weights at the top
MISSING_ADAPTER_HINT = ("give a diffusers MotionAdapter folder, a motion-module .safetensors file, a preset "
                        f"({', '.join(MOTION_ADAPTER_PRESETS)}) or a Hub repo id (org/name)")

COMMIT = re.compile(r"^[0-9a-f]{40}$")
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".json")  # "a/b.safetensors" is a path


class ModelNotDownloadedError(ModelNotFoundError):
    """A preset or Hub repo id whose weights are not on this machine; ``command`` is what fetches them."""

    def __init__(self, message: str, command: str):
        super().__init__(message)
        self.command = command


def weights_dir() -> Path:
    """Where named models live: ``$SDCLI_WEIGHTS``, else ``./weights``."""
    return Path(os.environ.get(WEIGHTS_ENV) or "weights").expanduser()


default_weights_dir = weights_dir  # for the functions below whose weights_dir argument shadows it

EMBEDDINGS_FOLDER = "embeddings"


def embedding_folders(given: Sequence[str | Path] = ()) -> list[Path]:
    """The folders whose textual-inversion embeddings a run loads: ``given``, else ``<weights>/embeddings`` where
    it exists (as the webui loads its ``embeddings/`` folder), else none."""
    if given:
        return [Path(folder).expanduser() for folder in given]
    default = weights_dir() / EMBEDDINGS_FOLDER
    return [default] if default.is_dir() else []


# -- what a model argument names ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSource:
    """What to fetch for a model name: a preset, or a repo id with the files sdcli reads from a diffusers repo."""

    name: str  # the preset name or the repo id, as the user gives it to 'sdcli download'
    repo_id: str
    revision: str
    layout: str  # "diffusers", "single-file", "motion-adapter", or "custom" (a repo id with --include patterns)
    patterns: tuple[str, ...]
    variant: str | None
    preset: ModelPreset | None = None
    folder: str | None = None  # the folder under the weights dir, where the name does not say it

    @property
    def folder_name(self) -> str:
        """The folder under the weights dir: the preset name, or ``org--name`` for a repo id."""
        if self.folder is not None:
            return self.folder
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
    """``--variant`` as the Hub's selection takes it: "fp16", "bf16", or None for the plain weights ("fp32")."""
    if variant is None:
        return default
    if variant not in VARIANTS:
        raise SdcliError(f"unknown variant {variant!r}; choose one of: {', '.join(VARIANTS)}")
    return None if variant == "fp32" else variant


def model_source(name: str, *, revision: str | None = None, variant: str | None = None,
                 include: Iterable[str] = ()) -> ModelSource:
    """The preset (of a model or a motion adapter) or repo id ``name``, with ``--revision``/``--variant``/
    ``--include`` applied: what ``sdcli download`` fetches.

    ``include`` replaces the preset's files (or, for a repo id, the diffusers files sdcli reads).
    """
    include = tuple(include)
    preset = PRESETS.get(name) or MOTION_ADAPTER_PRESETS.get(name)
    if preset is not None:
        if preset.layout == "single-file" and variant is not None:
            hint = (" (for half-size SD 1.5 weights: sdcli download sd15, or sd15-single-fp16)"
                    if name in PRESETS else "")
            raise SdcliError(f"{preset.name} is a single file; --variant applies to diffusers models{hint}")
        layout = preset.layout if not include else "custom"
        return ModelSource(preset.name, preset.repo_id, revision or preset.revision, layout,
                           include or preset.files, variant_option(variant, preset.variant), preset)
    if is_repo_id(name):
        return ModelSource(name, name, revision or "main", "custom" if include else "diffusers",
                           include or DIFFUSERS_FILES, variant_option(variant, "fp16"))
    raise ModelNotFoundError(f"unknown model {name!r}: give a preset ({', '.join(MODEL_PRESETS)}), a motion adapter "
                             f"preset ({', '.join(MOTION_ADAPTER_PRESETS)}) or a Hub repo id like org/name")


def motion_adapter_source(name: str) -> ModelSource:
    """The motion-adapter preset or repo id ``name``: a repo id is looked for (and fetched) as a diffusers
    MotionAdapter, not as a model."""
    if name in MOTION_ADAPTER_PRESETS:
        return model_source(name)
    if is_repo_id(name):
        return ModelSource(name, name, "main", ADAPTER_LAYOUT, ADAPTER_FILES, "fp16")
    raise ModelNotFoundError(f"unknown motion adapter {name!r}: {MISSING_ADAPTER_HINT}")


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


def missing_adapter_parts(folder: Path, preset: ModelPreset | None = None) -> list[str]:
    """What a diffusers MotionAdapter folder lacks for sdcli to load it (its config and weights, plain, fp16 or
    sharded, as :func:`missing_parts` counts them), and the preset's LoRA file when it has one: [] when complete."""
    missing = [] if (folder / "config.json").is_file() else ["config.json"]
    if not _has_weights(folder, ADAPTER_STEM):
        missing.append("motion adapter weights")
    lora = getattr(preset, "lora", None)
    if lora is not None and not (folder / lora).is_file():
        missing.append(lora)
    return missing


def missing_parts(folder: Path) -> list[str]:
    """What a diffusers folder lacks for sdcli to load it: [] when complete as some family's model, else what the
    family it comes closest to lacks.

    Weights count in any form sdcli reads: the plain or fp16 safetensors file, or a shard index whose shards are
    all there. Files are followed through symlinks (a Hugging Face cache snapshot), so a dangling link is missing.
    The tokenizer tables are not required: sdcli ships the CLIP ones.
    """
    return min((_missing_for(family, folder) for family in FAMILIES.values()), key=len)


def _missing_for(family: Family, folder: Path) -> list[str]:
    missing = [name for name in family.diffusers_configs if not (folder / name).is_file()]
    for component, stem in family.components.items():
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
        missing = _missing(source, target)
        if not missing:
            return Lookup(target, target, "")
        single = _single_file_in(target) if source.preset is None else None
        if single is not None:
            return Lookup(single, target, "")
        problem = f"{target} is incomplete (no {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"
    for repo in source.cached_repos:
        snapshot = cached_snapshot(repo, source.revision, cache)
        if snapshot is not None and not _missing(source, snapshot):
            return Lookup(snapshot, target, "")
    return Lookup(None, target, problem)


def _missing(source: ModelSource, folder: Path) -> list[str]:
    """What ``folder`` lacks to hold ``source``: a motion adapter's parts, or a model's."""
    return missing_adapter_parts(folder, source.preset) if source.layout == ADAPTER_LAYOUT else missing_parts(folder)


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


@dataclass(frozen=True)
class _Kind:
    """What a name is looked up as: a model or a motion adapter (its presets, its sources, its words)."""

    noun: str  # in messages: "no model at ..."
    presets: dict[str, ModelPreset]
    source: Callable[[str], ModelSource]
    hint: str  # what to give instead, for a name found nowhere
    option: str  # the option that takes it


MODELS = _Kind("model", PRESETS, model_source, MISSING_MODEL_HINT, "--model")
MOTION_ADAPTERS = _Kind("motion adapter", MOTION_ADAPTER_PRESETS, motion_adapter_source, MISSING_ADAPTER_HINT,
                        "--motion-adapter")


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
    return _resolve(name_or_path, MODELS, weights_dir=weights_dir, allow_download=allow_download, offline=offline,
                    confirm=confirm, progress=progress, endpoint=endpoint, token=token, cache=cache)


def resolve_motion_adapter(name_or_path: str | Path, *, weights_dir: str | Path | None = None,
                           allow_download: bool = False, offline: bool | None = None,
                           confirm: Callable[[str], bool] | None = None, progress: "DownloadProgress | None" = None,
                           endpoint: str | None = None, token: str | None = None, cache: Path | None = None) -> Path:
    """The path of the motion adapter ``name_or_path`` names: an existing path, a motion-adapter preset, a Hub repo
    id (a diffusers MotionAdapter repository) or a folder under the weights dir, looked up and downloaded exactly as
    :func:`resolve_model` does for models."""
    return _resolve(name_or_path, MOTION_ADAPTERS, weights_dir=weights_dir, allow_download=allow_download,
                    offline=offline, confirm=confirm, progress=progress, endpoint=endpoint, token=token, cache=cache)


def _resolve(name_or_path: str | Path, kind: _Kind, *, weights_dir: str | Path | None, allow_download: bool,
             offline: bool | None, confirm: Callable[[str], bool] | None, progress: "DownloadProgress | None",
             endpoint: str | None, token: str | None, cache: Path | None) -> Path:
    """:func:`resolve_model` for either kind of name."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        return path
    for other in (MODELS, MOTION_ADAPTERS):
        if other is not kind and text in other.presets:
            raise ModelNotFoundError(f"{text} is a {other.noun} preset, not a {kind.noun}: give it to "
                                     f"{other.option}; {kind.noun} presets: {', '.join(kind.presets)}")
    weights = Path(weights_dir).expanduser() if weights_dir is not None else default_weights_dir()
    if text in kind.presets or (is_repo_id(text) and not _names_local_folder(text)):
        source = kind.source(text)
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
        raise ModelNotFoundError(f"no {kind.noun} at {path} (nor at {named}), and {text!r} is not a preset "
                                 f"({', '.join(kind.presets)}): {kind.hint}")
    raise ModelNotFoundError(f"no {kind.noun} at {path}: {kind.hint}")


def _names_local_folder(text: str) -> bool:
    """``org/name`` whose first part is a local folder (``weights/sd15``) is a path, not a repo id."""
    return Path(text.split("/", 1)[0]).is_dir()


def find_model(model: str | Path) -> Path:
    """The path ``model`` names, never downloading (:func:`resolve_model` with its defaults). A model found nowhere
    raises ModelNotFoundError; for a preset or repo id the message names the ``sdcli download`` command."""
    return resolve_model(model)


def open_checkpoint(model: str | Path, variant: str | None = None) -> Checkpoint:
    """Open the model ``model`` names (a path, a preset or a repo id, never downloading: :func:`find_model`) as
    the model family that recognises it."""
    return open_path(find_model(model), variant)


def motion_adapter_preset(name_or_path: str | Path) -> MotionAdapterPreset | None:
    """The motion-adapter preset ``name_or_path`` is: a preset name (that is no existing path), the preset's
    repository id (for a MotionAdapter folder preset), or a path that is one's download: ``<dir>/<preset>`` as
    ``sdcli download`` fills it, a single-file preset's file, or a Hugging Face cache snapshot of its repository.
    None for any other adapter."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if text in MOTION_ADAPTER_PRESETS and not path.exists():
        return MOTION_ADAPTER_PRESETS[text]
    for preset in MOTION_ADAPTER_PRESETS.values():
        if preset.layout == ADAPTER_LAYOUT and text == preset.repo_id and not path.exists():
            return preset
        if preset.layout == "single-file" and path.name == preset.filename:
            return preset
        if path.is_dir() and (path.name == preset.name or (
                path.parent.name == "snapshots"
                and path.parent.parent.name == "models--" + preset.repo_id.replace("/", "--"))):
            return preset
    return None


def open_motion_adapter(motion_adapter: str | Path, variant: str | None = None) -> OpenedAdapter:
    """Open the motion adapter ``motion_adapter`` names (a path, a preset or a repo id, never downloading), with
    the preset it is (:func:`motion_adapter_preset`), whose settings the video pipeline applies."""
    path = resolve_motion_adapter(motion_adapter)
    preset = motion_adapter_preset(motion_adapter) or motion_adapter_preset(path)
    return animatediff.open_motion_adapter(path, variant, preset)


def model_family(model: str | Path) -> Family | None:
    """The family of the model ``model`` names, when that is known without downloading anything: a preset's (from
    the table), or that of a model on this machine (recognised, nothing loaded). None for a preset or repo id that
    is not on this machine yet, and for a name that names nothing."""
    preset = PRESETS.get(str(model))
    if preset is not None:
        return family_of(preset.family)
    try:
        path = resolve_model(model, offline=True)
    except ModelNotFoundError:
        return None
    return open_path(path).model_family


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
    """Fetch a preset (of a model or a motion adapter) or repo id from the Hub into ``<weights>/<preset>`` (or
    ``<weights>/org--name``).

    Lists the repository, keeps the files sdcli reads (the preset's, or ``include``'s patterns) with the variant
    rule, checks that a diffusers selection holds a whole model (or motion adapter: a repo id whose listing holds a
    MotionAdapter rather than a model is fetched as one), then downloads (resuming, verifying, skipping what is
    already there and verified). ``progress`` gets the hub's per-file calls; if it also has ``begin(files)``, that
    is called first with the selected files (for an overall total).
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
    if source.preset is None and source.layout == "diffusers" and holds_motion_adapter(listing):
        source = replace(source, layout=ADAPTER_LAYOUT, patterns=ADAPTER_FILES)
    selected = hub.select_files(listing, list(source.patterns), source.variant)
    check_selection(source, selected, listing)
    selected = sorted(selected, key=lambda f: (f.size or 0, f.path))  # configs first, the big weights last
    if progress is not None and hasattr(progress, "begin"):
        progress.begin(selected)
    folder.mkdir(parents=True, exist_ok=True)
    result = client.download(source.repo_id, [f.path for f in selected], folder, revision=source.revision,
                             progress=progress)
    path = folder / source.preset.filename if source.layout == "single-file" else folder  # or an adapter's folder
    if source.layout == "custom":
        path = _single_file_in(folder) or folder
    outcome = DownloadOutcome(source, path, folder, selected, result)
    logger.info("%s (%s@%s, commit %s)", outcome.summary(), source.repo_id, source.revision, result.commit)
    return outcome


def holds_motion_adapter(listing: list["RepoFile"]) -> bool:
    """A repository listing that is a diffusers MotionAdapter (``config.json`` and its safetensors weights at the
    top) rather than a model (``model_index.json`` and a folder per network)."""
    paths = {f.path for f in listing}
    return ("config.json" in paths and "model_index.json" not in paths
            and any(p.startswith(ADAPTER_STEM) and p.endswith(".safetensors") for p in paths))


def check_selection(source: ModelSource, selected: list["RepoFile"], listing: list["RepoFile"]) -> None:
    """Refuse, before any transfer, a selection that would not make a model (or motion adapter) sdcli can load."""
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
    if source.layout == ADAPTER_LAYOUT:
        missing = ["config.json"] if "config.json" not in chosen else []
        if not any(p.startswith(ADAPTER_STEM) and p.endswith(".safetensors") for p in chosen):
            pickled = any(f.path.startswith(ADAPTER_STEM) and f.path.endswith((".bin", ".ckpt", ".pt", ".pth"))
                          for f in listing)
            missing.append("motion adapter weights" + (" (only pickles, which sdcli refuses)" if pickled else ""))
        lora = getattr(source.preset, "lora", None)
        if lora is not None and lora not in chosen:
            missing.append(lora)
        if missing:
            raise ModelNotFoundError(f"{where} is not a diffusers motion adapter sdcli can read: no "
                                     f"{', '.join(missing)}")
        return
    families = [family_of(source.preset.family)] if source.preset else list(FAMILIES.values())
    family, missing = min(((family, _unselected(family, chosen, listing)) for family in families),
                          key=lambda pair: len(pair[1]))
    if missing:
        single = [f.path for f in listing if "/" not in f.path and f.path.endswith(".safetensors")]
        hint = (f"; for a single-file checkpoint pick it: sdcli download {source.name} --include {single[0]}"
                if single else "")
        raise ModelNotFoundError(f"{where} is not a diffusers {family.title} model sdcli can read: no "
                                 f"{', '.join(missing)}{hint}")


def _unselected(family: Family, chosen: set[str], listing: list["RepoFile"]) -> list[str]:
    """What a selection lacks of a diffusers model of ``family``."""
    missing = [name for name in family.diffusers_configs if name not in chosen]
    for component, stem in family.components.items():
        if not any(p.startswith(f"{component}/{stem}") and p.endswith(".safetensors") for p in chosen):
            pickled = any(f.path.startswith(f"{component}/") and f.path.endswith((".bin", ".ckpt", ".pt", ".pth"))
                          for f in listing)
            missing.append(f"{component} weights" + (" (only pickles, which sdcli refuses)" if pickled else ""))
    return missing


__all__ = ["AUTO_DOWNLOAD_ENV", "DownloadOutcome", "MODEL_PRESETS", "MOTION_ADAPTER_PRESETS",
           "ModelNotDownloadedError", "ModelPreset", "ModelSource", "MotionAdapterPreset", "PRESETS", "WEIGHTS_ENV",
           "auto_download", "cached_snapshot", "DIFFUSERS_FILES", "download_command", "download_model",
           "download_prompt", "find_local", "find_model", "format_size", "hf_cache_dir", "holds_motion_adapter",
           "is_repo_id", "missing_adapter_parts", "missing_parts", "model_family", "model_source",
           "motion_adapter_preset", "motion_adapter_source", "open_checkpoint", "open_motion_adapter",
           "resolve_model", "resolve_motion_adapter", "weights_dir"]


def resolve_streaming_generator(preset, *, weights_dir: str | Path | None = None, allow_download: bool = False,
                                offline: bool | None = None, confirm: Callable[[str], bool] | None = None,
                                progress: "DownloadProgress | None" = None) -> Path:
    """The converted generator of a streaming preset (:mod:`sdcli.families.self_forcing`): there already, or its
    pickle downloaded and converted to safetensors once, with ``allow_download`` or when ``confirm`` agrees."""
    from .families.self_forcing import prepare_generator

    weights = Path(weights_dir).expanduser() if weights_dir is not None else default_weights_dir()

    def download() -> Path:
        source = ModelSource(preset.name, preset.repo_id, preset.revision, "custom", (preset.file,), None,
                             folder=preset.name)
        outcome = download_model(source, weights_dir=weights, progress=progress, offline=offline)
        return outcome.folder / preset.file

    def convert(pickle: Path, target: Path, key: str) -> None:
        from .io.torch_pickle import convert_checkpoint

        convert_checkpoint(pickle, target, key=key)

    return prepare_generator(preset, weights, allow_download=allow_download, confirm=confirm, download=download,
                             convert=convert)


def model_architecture(model: str | Path) -> str | None:
    """The architecture of the model ``model`` names ("sd1", "wan21", "skyreels-v2-df", ...), when that is known
    without downloading anything (as :func:`model_family`); None otherwise."""
    preset = PRESETS.get(str(model))
    if preset is not None:
        return preset.family
    try:
        path = resolve_model(model, offline=True)
    except ModelNotFoundError:
        return None
    return open_path(path).family
