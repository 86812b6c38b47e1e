"""A1111's LoRA tags inside prompts, ``<lora:name:weight>``, and LoRA names resolved in a LoRA folder.

A1111 (``extra_networks.parse_prompt``) finds every ``<kind:arg:arg...>`` in a prompt, removes it from the text
and hands its arguments to the network of that kind; for ``lora`` they are the name, the text-encoder weight
(default 1.0) and the UNet weight (default: the text-encoder weight). stable-diffusion.cpp reads the same tags.
A1111 also removes tags of the kinds it has no network for (``<hypernet:...>``) and skips them with a warning;
sdcli refuses them in one line instead of dropping what it cannot apply.

A name is the file's name in the LoRA folder without ``.safetensors`` (``<lora:detail:0.6>`` is
``loras/detail.safetensors``); an ``--lora`` option also takes a path.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import LoraError
from .lora import Lora, read_lora

TAG = re.compile(r"<(?P<kind>[^:<>]+):(?P<args>[^<>]*)>")  # A1111's re_extra_net: <kind:args>


@dataclass(frozen=True)
class LoraUse:
    """One LoRA a job asks for: its name or path, and its weights for the text encoder and the UNet."""

    name: str
    text_encoder_weight: float = 1.0
    unet_weight: float = 1.0


def _weight(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise LoraError(f"{where}: the weight {text!r} is not a finite number")
    return value


def split_lora_tags(prompt: str) -> tuple[str, list[LoraUse]]:
    """``prompt`` without its ``<lora:...>`` tags, and the LoRAs they ask for, in order. A tag of another kind
    is a one-line error."""
    uses = []
    for match in TAG.finditer(prompt):
        tag = match.group(0)
        if match["kind"].strip() != "lora":
            raise LoraError(f"{tag} in the prompt: sdcli applies <lora:name:weight> tags only")
        args = [arg.strip() for arg in match["args"].split(":")]
        if not args[0] or len(args) > 3:
            raise LoraError(f"{tag} in the prompt: write <lora:name>, <lora:name:weight> or "
                            "<lora:name:text_encoder_weight:unet_weight>")
        te_weight = _weight(args[1], tag) if len(args) > 1 else 1.0
        unet_weight = _weight(args[2], tag) if len(args) > 2 else te_weight
        uses.append(LoraUse(args[0], te_weight, unet_weight))
    return TAG.sub("", prompt), uses


def parse_lora_option(value: str) -> LoraUse:
    """``FILE_OR_NAME[:WEIGHT]`` (the ``--lora`` option) as a LoraUse with one weight for both networks. A colon
    followed by something that is not a number belongs to the path (``C:\\loras\\x.safetensors``)."""
    name, colon, weight = value.rpartition(":")
    if not colon or not weight or re.search(r"[\\/]", weight) or not re.fullmatch(r"[-+0-9.eEinfa]+", weight):
        return LoraUse(value)
    scale = _weight(weight, f"--lora {value}")
    return LoraUse(name, scale, scale)


def available_loras(folder: str | Path) -> list[str]:
    """The LoRA names in ``folder`` (its ``.safetensors`` files), sorted."""
    folder = Path(folder)
    return sorted(path.stem for path in folder.glob("*.safetensors")) if folder.is_dir() else []


def resolve_lora(name: str, folder: str | Path) -> Lora:
    """The LoRA ``name`` calls: a path to a file, else ``NAME.safetensors`` in ``folder``; a one-line error
    naming a few of the available ones when there is none."""
    path = Path(name).expanduser()
    if path.suffix and (path.is_file() or len(path.parts) > 1):
        return read_lora(path)
    candidate = Path(folder) / f"{name}.safetensors"
    if candidate.is_file():
        return read_lora(candidate)
    if path.suffix in (".pt", ".ckpt", ".bin", ".pth") or (Path(folder) / name).is_file():
        return read_lora(Path(folder) / name if (Path(folder) / name).is_file() else path)
    names = available_loras(folder)
    shown = ", ".join(names[:8]) + (f", ... ({len(names) - 8} more)" if len(names) > 8 else "")
    raise LoraError(f"unknown LoRA {name!r}: no {candidate}" + (f"; available: {shown}" if names else
                                                                 f" (the folder holds no .safetensors files)"))


def prompt_loras(prompt: str, folder: str | Path) -> list[tuple[Lora, float, float]]:
    """The LoRAs the ``<lora:...>`` tags of ``prompt`` name, read from ``folder`` (headers only), each with its
    text-encoder and UNet weight: how a run checks its prompts before any model loads."""
    _, uses = split_lora_tags(prompt)
    return [(resolve_lora(use.name, folder), use.text_encoder_weight, use.unet_weight) for use in uses]


__all__ = ["LoraUse", "available_loras", "parse_lora_option", "prompt_loras", "resolve_lora", "split_lora_tags"]
