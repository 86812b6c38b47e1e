"""Textual-inversion embeddings: learned token vectors, read from one safetensors file each.

Gal et al. 2022, "An Image is Worth One Word: Personalizing Text-to-Image Generation using Textual Inversion". An
embedding is n vectors (n, D) of the text encoder's token-embedding width D (768 for SD1's CLIP, 1024 for SD2's
OpenCLIP), standing where its name appears in a prompt. The layouts read:

- **AUTOMATIC1111** (the webui, and most files on model sites): one tensor ``emb_params`` (n, D), or
  ``string_to_param.*`` (the webui's ``.pt`` layout flattened), or ``*`` (that layout converted with
  ``sdcli convert --key string_to_param``). The name is the file's stem, as the webui names it.
- **diffusers** (``learned_embeds.safetensors`` of ``save_textual_inversion`` and the sd-concepts-library): one
  tensor named by its token, (D,) or (n, D). The name is that token (``<cat-toy>``).

An SDXL embedding (``clip_l`` and ``clip_g``, for SDXL's two text encoders) is recognised and refused, naming its
widths. Pickles (``.pt``, ``.bin``) are refused with the command that converts them.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EmbeddingError, SafetensorsError
from .checkpoint import PICKLE_SUFFIXES
from .safetensors import SafetensorsFile

log = logging.getLogger("sdcli")

A1111_KEYS = ("emb_params", "*")  # a single tensor of the webui's layout; "string_to_param.*" also
A1111_PREFIX = "string_to_param."
SDXL_KEYS = ("clip_l", "clip_g")
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
MAX_VECTORS = 75  # a chunk's prompt tokens: an embedding must fit in one
SUFFIX = ".safetensors"


@dataclass(frozen=True)
class TextualInversion:
    """One embedding: the name that calls it in prompts, its vectors, and where it was read from."""

    name: str
    vectors: np.ndarray  # (n, D) float32
    path: Path | None = None
    from_folder: bool = False  # found by scanning a folder: skipped (not refused) when its width does not fit

    @property
    def width(self) -> int:
        return self.vectors.shape[1]


def read_embedding(path: str | Path, from_folder: bool = False) -> TextualInversion:
    """The embedding in the safetensors file ``path`` (see the module docstring), or a one-line error."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        target = shlex.quote(str(path.with_suffix(SUFFIX)))
        raise EmbeddingError(f"{path} is a pickle ({path.suffix}); sdcli reads only .safetensors because loading a "
                             "pickle can run arbitrary code from the file. Convert it once with: sdcli convert "
                             f"{shlex.quote(str(path))} {target} --key string_to_param (an AUTOMATIC1111 embedding; "
                             "a diffusers learned_embeds.bin needs no --key), which runs nothing from the file")
    if not path.is_file():
        raise EmbeddingError(f"{path}: no such embedding file")
    with SafetensorsFile(path) as file:
        keys = file.keys()
        if all(key in keys for key in SDXL_KEYS):
            widths = ", ".join(f"{key} {file.info(key).shape[-1]} wide" for key in SDXL_KEYS)
            raise EmbeddingError(f"{path}: an SDXL embedding ({widths}), for SDXL's two text encoders; an SD 1.x "
                                 "model's text encoder is 768 wide, an SD 2.x model's 1024")
        a1111 = [key for key in keys if key in A1111_KEYS or key.startswith(A1111_PREFIX)]
        if len(a1111) == 1:
            key, name = a1111[0], path.stem
        elif len(keys) == 1 and not a1111:
            key = name = keys[0]
        else:
            listed = ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")
            raise EmbeddingError(f"{path}: not a textual-inversion embedding (tensors: {listed or 'none'}); expected "
                                 "one tensor: emb_params or string_to_param.* (AUTOMATIC1111), or one named by its "
                                 "token (diffusers)")
        info = file.info(key)
        if info.dtype not in FLOAT_DTYPES or len(info.shape) not in (1, 2) or 0 in info.shape:
            raise EmbeddingError(f"{path}: the embedding {key} must be float vectors (D,) or (n, D), got "
                                 f"{info.dtype} {info.shape}")
        vectors = np.array(file.float32(key), dtype=np.float32).reshape(-1, info.shape[-1])  # (n, D), a copy
    if len(vectors) > MAX_VECTORS:
        raise EmbeddingError(f"{path}: {len(vectors)} vectors; an embedding must fit in a 75-token chunk")
    if not np.isfinite(vectors).all():
        raise EmbeddingError(f"{path}: the embedding holds values that are not finite")
    if not name.strip():
        raise EmbeddingError(f"{path}: the embedding's name {name!r} cannot appear in a prompt")
    return TextualInversion(name, vectors, path, from_folder)


def read_embeddings(files: Iterable[str | Path] = (), folders: Iterable[str | Path] = ()) -> list[TextualInversion]:
    """The embeddings of ``files`` and of every ``.safetensors`` file in ``folders`` (not their subfolders), in
    that order, each folder's in name order; two embeddings of the same name are a one-line error. A file given by
    name that cannot be read is a one-line error; one a folder holds is skipped with a warning, so that one damaged
    download in the default folder does not stop every run."""
    found = [read_embedding(path) for path in files]
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise EmbeddingError(f"{folder}: no such embeddings folder")
        paths = sorted(path for path in folder.iterdir() if path.suffix.lower() == SUFFIX and path.is_file())
        pickles = [path.name for path in folder.iterdir() if path.suffix.lower() in PICKLE_SUFFIXES]
        if pickles:
            log.warning("%s: skipped %d pickle file(s) (%s); convert them with sdcli convert", folder, len(pickles),
                        ", ".join(sorted(pickles)[:3]))
        for path in paths:  # a file the folder holds that cannot be read is skipped, as the webui skips it
            try:
                found.append(read_embedding(path, from_folder=True))
            except (EmbeddingError, SafetensorsError) as error:
                log.warning("skipped an embedding that cannot be read: %s", error)
    names: dict[str, TextualInversion] = {}
    for embedding in found:
        if embedding.name in names:
            raise EmbeddingError(f"two embeddings are named {embedding.name!r}: {names[embedding.name].path} and "
                                 f"{embedding.path}")
        names[embedding.name] = embedding
    return found
