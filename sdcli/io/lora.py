"""LoRA files: low-rank updates of a network's weights, read from one safetensors file and merged into copies of
the layers they touch.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models". A LoRA layer updates one Linear or
convolution weight W (out, in[, kh, kw]) of a network with a "down" matrix A (rank, in[, kh, kw]) and an "up"
matrix B (out, rank[, 1, 1]):

    W' = W + scale * (alpha / rank) * (B @ A)        convolutions as (out, rank) @ (rank, in*kh*kw)

``scale`` is the user's weight for the whole LoRA (diffusers' ``set_adapters([name], [0.8])`` or
``fuse_lora(lora_scale=0.8)``, A1111's ``<lora:name:0.8>``); ``alpha`` is the file's constant for the layer.

The namings read are the ones diffusers' ``load_lora_weights`` reads for SD 1.x/2.x:

- **kohya** (kohya-ss sd-scripts, A1111, LyCORIS's LoCon): ``lora_unet_<module>.lora_down.weight``,
  ``.lora_up.weight`` and ``.alpha`` (``lora_te_`` / ``lora_te1_`` for the text encoder, ``lora_te2_`` for a
  second one), the module's dots written as underscores: ``lora_unet_down_blocks_0_attentions_0_proj_in``. An
  underscore may be a dot or part of a name (``to_out_0`` is ``to_out.0``), so these names are resolved against the
  names of the network's weights (:class:`LoraMergedSource`), never by substring renaming. A missing ``.alpha``
  means alpha = rank.
- **peft** (diffusers' ``save_lora_weights`` since 0.24): ``unet.<module>.lora_A.weight`` (down) and
  ``lora_B.weight`` (up). alpha comes from the ``lora_adapter_metadata`` that diffusers since 0.35 writes into the
  file's header (peft's ``LoraConfig``: ``lora_alpha``, ``alpha_pattern``, ``use_rslora``); a file without it has
  alpha = rank, as diffusers assumes.
- **older diffusers**: ``unet.<module>.lora.down.weight`` / ``lora.up.weight``, and the attention processors'
  ``<attention>.processor.to_q_lora.down.weight`` (``to_k``, ``to_v``; ``to_out_lora`` is ``to_out.0``); the text
  encoder's ``self_attn.to_q_lora`` (``q_proj``, ...) and ``mlp.fc1.lora_linear_layer``. alpha = rank.

A LoRA is merged into a network by loading the network from a :class:`LoraMergedSource` over the component's
tensor source: the tensors a LoRA touches are read as new float32 arrays ``W + delta``, every other tensor is the
base source's own (a view of the mapped file); the file is never written.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..dtypes import stored_float32
from ..errors import LoraError
from .checkpoint import PICKLE_SUFFIXES, pickle_refusal
from .safetensors import SafetensorsFile
from .weights import TensorSource

KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")  # the prefixes of the dotted namings
METADATA_KEY = "lora_adapter_metadata"  # diffusers' JSON of each component's peft LoraConfig, in the header

# Adapters of other kinds, by a tensor-name fragment only they use: refused by name instead of merged wrong.
OTHER_KINDS = {"dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "hada_": "LoHa", "lokr_": "LoKr",
               "lora_mid": "LoCon with a Tucker middle (lora_mid)", "oft_": "OFT", "boft_": "BOFT",
               "lora_B.bias": "LoRA with biases"}

# the dotted namings, each a pattern over a whole name after its component: the module, and which end it is
_PEFT = re.compile(r"(?P<module>.+)\.lora_(?P<end>[AB])\.weight")
_LORA_LAYER = re.compile(r"(?P<module>.+)\.(?:lora|lora_linear_layer)\.(?P<end>down|up)\.weight")
_PROCESSOR = re.compile(r"(?P<module>.+?)(?:\.processor)?\.(?P<projection>to_q|to_k|to_v|to_out)_lora\."
                        r"(?P<end>down|up)\.weight")
# the attention processors' projections, as the UNet's attention and CLIP's self-attention name them
_UNET_PROJECTIONS = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_CLIP_PROJECTIONS = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


@dataclass(frozen=True)
class LoraLayer:
    """One weight's update: its tensors in the file, and the file's own factor of their product."""

    component: str  # "unet", "text_encoder" or "text_encoder_2"
    module: str  # as the file spells it: "down_blocks.0.attentions.0.proj_in", or kohya "down_blocks_0_..."
    underscored: bool  # kohya: dots written as underscores, resolved against the network's names
    down: str  # A (rank, in[, kh, kw])
    up: str  # B (out, rank[, 1, 1])
    down_shape: tuple[int, ...]
    up_shape: tuple[int, ...]
    factor: float  # alpha / rank (alpha / sqrt(rank) for rsLoRA)

    @property
    def rank(self) -> int:
        return self.down_shape[0]


@dataclass
class Lora:
    """A LoRA file, read: its layers by component, with their tensors still in the mapped file.
    Made by :func:`read_lora`."""

    path: Path
    format: str  # "kohya", "peft" or "diffusers"
    layers: tuple[LoraLayer, ...]
    file: SafetensorsFile = field(repr=False)

    @property
    def name(self) -> str:
        """The file's name without ``.safetensors``: how A1111's ``<lora:name:weight>`` calls it."""
        return self.path.stem

    def components(self) -> list[str]:
        """The components the LoRA has layers for, in the order of COMPONENTS."""
        present = {layer.component for layer in self.layers}
        return [component for component in COMPONENTS if component in present]

    def layers_of(self, component: str) -> list[LoraLayer]:
        return [layer for layer in self.layers if layer.component == component]

    def delta(self, layer: LoraLayer, scale: float, shape: tuple[int, ...]) -> np.ndarray:
        """``scale * factor * (B @ A)`` as a new float32 array of ``shape`` (the weight's, checked to fit)."""
        up = self._float32(layer.up).reshape(layer.up_shape[0], layer.rank)  # (out, rank)
        down = self._float32(layer.down).reshape(layer.rank, -1)  # (rank, in*kh*kw)
        with np.errstate(over="ignore", invalid="ignore"):  # a non-finite result is refused by the caller
            product = up @ down  # (out, in*kh*kw)
            product *= np.float32(scale * layer.factor)
        self.file.release(layer.up)
        self.file.release(layer.down)
        return product.reshape(shape)

    def _float32(self, name: str) -> np.ndarray:
        return stored_float32(self.file.view(name), self.file.info(name).dtype)


def read_lora(path: str | Path) -> Lora:
    """The LoRA file at ``path`` (a ``.safetensors`` file in one of the namings above), or a one-line error.
    Only the header is read here; the tensors stay in the mapped file until they are merged."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise pickle_refusal(path)
    if not path.is_file():
        raise LoraError(f"{path}: no such LoRA file")
    file = SafetensorsFile(path)
    keys = file.keys()
    if not keys:
        raise LoraError(f"{path}: not a LoRA file (it holds no tensors)")
    for fragment, kind in OTHER_KINDS.items():
        found = next((key for key in keys if fragment in key), None)
        if found is not None:
            raise LoraError(f"{path}: a {kind} adapter ({found}); sdcli merges plain LoRA layers only")
    if (sdxl := sdxl_evidence(file)) is not None:
        raise LoraError(f"{path}: a LoRA for SDXL ({sdxl}); sdcli runs SD 1.x/2.x models, whose layers it does "
                        "not fit")
    kohya = [key for key in keys if key.startswith(tuple(KOHYA_PREFIXES))]
    if kohya:
        if len(kohya) != len(keys):
            other = next(key for key in keys if not key.startswith(tuple(KOHYA_PREFIXES)))
            raise LoraError(f"{path}: mixes kohya names (lora_unet_...) with others ({other})")
        return Lora(path, "kohya", _kohya_layers(file, path), file)
    layers, format = _dotted_layers(file, path)
    return Lora(path, format, layers, file)


# SDXL's UNet has up to 10 transformer blocks per attention (SD 1.x/2.x one), a 2048-wide cross-attention (768
# and 1024) and two text encoders (kohya's lora_te1_ and lora_te2_, diffusers' text_encoder_2)
_SDXL_BLOCK = re.compile(r"transformer_blocks[._][1-9]")
_SDXL_CONTEXT = re.compile(r"attn2[._]to_[kv].*(lora_down|lora_A|lora\.down)")


def sdxl_evidence(file: SafetensorsFile) -> str | None:
    """The first tensor of ``file`` only an SDXL LoRA has (see above), or None."""
    for key in file.keys():
        if key.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) or _SDXL_BLOCK.search(key):
            return key
        if _SDXL_CONTEXT.search(key) and tuple(file.info(key).shape)[1:2] == (2048,):
            return f"{key} reads a 2048-wide context"
    return None


def _kohya_layers(file: SafetensorsFile, path: Path) -> tuple[LoraLayer, ...]:
    """``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (see the module docstring)."""
    parts: dict[str, dict[str, str]] = {}  # lora name -> {"lora_down.weight": key, ...}
    for key in file.keys():
        name, _, end = key.partition(".")
        if end not in ("lora_down.weight", "lora_up.weight", "alpha"):
            raise LoraError(f"{path}: unknown tensor {key} (a kohya LoRA holds lora_down.weight, lora_up.weight "
                            "and alpha per layer)")
        parts.setdefault(name, {})[end] = key
    layers = []
    for name, found in parts.items():
        if "lora_down.weight" not in found or "lora_up.weight" not in found:
            missing = "lora_up" if "lora_down.weight" in found else "lora_down"
            raise LoraError(f"{path}: layer {name} has no {missing}.weight")
        prefix = next(prefix for prefix in KOHYA_PREFIXES if name.startswith(prefix))
        down, up = found["lora_down.weight"], found["lora_up.weight"]
        rank = _rank(file, path, down, up)
        alpha = _alpha(file, path, found["alpha"]) if "alpha" in found else float(rank)
        layers.append(_layer(file, KOHYA_PREFIXES[prefix], name[len(prefix):], True, down, up, alpha / rank))
    return tuple(layers)


def _dotted_layers(file: SafetensorsFile, path: Path) -> tuple[tuple[LoraLayer, ...], str]:
    """The peft and older diffusers namings (see the module docstring), and which of them the file uses."""
    ends: dict[tuple[str, str], dict[str, str]] = {}  # (component, module) -> {"down": key, "up": key}
    formats = set()
    for key in file.keys():
        component, rest = _component(key)
        if match := _PEFT.fullmatch(rest):
            module, end, format = match["module"], {"A": "down", "B": "up"}[match["end"]], "peft"
        elif match := _PROCESSOR.fullmatch(rest):
            projections = _UNET_PROJECTIONS if component == "unet" else _CLIP_PROJECTIONS
            module, end, format = f"{match['module']}.{projections[match['projection']]}", match["end"], "diffusers"
        elif match := _LORA_LAYER.fullmatch(rest):
            module, end, format = match["module"], match["end"], "diffusers"
        else:
            raise LoraError(f"{path}: not a LoRA file, or of an unknown naming: tensor {key} is none of kohya's "
                            "lora_unet_*.lora_down.weight, peft's *.lora_A.weight, diffusers' *.lora.down.weight")
        formats.add(format)
        if end in ends.setdefault((component, module), {}):
            raise LoraError(f"{path}: layer {component}.{module} has two {end} tensors")
        ends[(component, module)][end] = key
    if len(formats) > 1:
        raise LoraError(f"{path}: mixes peft names (lora_A, lora_B) with older diffusers ones (lora.down, lora.up)")
    format = formats.pop()
    configs = _peft_configs(file, path) if format == "peft" else {}
    layers = []
    for (component, module), found in ends.items():
        if "down" not in found or "up" not in found:
            raise LoraError(f"{path}: layer {component}.{module} has no {'up' if 'down' in found else 'down'} "
                            "tensor")
        rank = _rank(file, path, found["down"], found["up"])
        factor = _peft_factor(configs.get(component), module, rank, path)
        layers.append(_layer(file, component, module, False, found["down"], found["up"], factor))
    return tuple(layers), format


def _component(key: str) -> tuple[str, str]:
    """(component, the rest) of a dotted name; names without a component's prefix are the UNet's (diffusers'
    ``save_attn_procs`` writes them so)."""
    head, _, rest = key.partition(".")
    return (head, rest) if head in COMPONENTS else ("unet", key)


def _layer(file: SafetensorsFile, component: str, module: str, underscored: bool, down: str, up: str,
           factor: float) -> LoraLayer:
    return LoraLayer(component, module, underscored, down, up, tuple(file.info(down).shape),
                     tuple(file.info(up).shape), factor)


def _rank(file: SafetensorsFile, path: Path, down: str, up: str) -> int:
    """The rank of a down/up pair, after checking that their shapes pair up."""
    down_shape, up_shape = tuple(file.info(down).shape), tuple(file.info(up).shape)
    for name in (down, up):
        if file.info(name).dtype not in ("F32", "F16", "BF16", "F64"):
            raise LoraError(f"{path}: {name} holds {file.info(name).dtype} values, not floats")
    if (len(down_shape) < 2 or len(up_shape) < 2 or down_shape[0] == 0 or up_shape[1] != down_shape[0]
            or math.prod(up_shape[2:]) != 1):
        raise LoraError(f"{path}: {down} {down_shape} and {up} {up_shape} are not a LoRA pair (down (rank, in, ...), "
                        "up (out, rank[, 1, 1]))")
    return down_shape[0]


def _alpha(file: SafetensorsFile, path: Path, key: str) -> float:
    values = stored_float32(file.view(key), file.info(key).dtype).reshape(-1)
    if values.size != 1 or not np.isfinite(values[0]):
        raise LoraError(f"{path}: {key} is not one finite number")
    return float(values[0])


def _peft_configs(file: SafetensorsFile, path: Path) -> dict[str, dict]:
    """Each component's peft LoraConfig from the header's ``lora_adapter_metadata`` ({} without it)."""
    raw = file.metadata.get(METADATA_KEY)
    if raw is None:
        return {}
    try:
        metadata = json.loads(raw)
    except json.JSONDecodeError:
        raise LoraError(f"{path}: its {METADATA_KEY} is not JSON") from None
    if not isinstance(metadata, dict):
        raise LoraError(f"{path}: its {METADATA_KEY} is not a JSON object")
    configs: dict[str, dict] = {}
    for key, value in metadata.items():
        component, _, option = key.partition(".")
        configs.setdefault(component, {})[option] = value
    return configs


def _peft_factor(config: dict | None, module: str, rank: int, path: Path) -> float:
    """alpha / rank as peft computes it for ``module`` from its LoraConfig (alpha = rank without one)."""
    if config is None:
        return 1.0
    if config.get("use_dora"):
        raise LoraError(f"{path}: a DoRA adapter (use_dora); sdcli merges plain LoRA layers only")
    alpha = config.get("lora_alpha", 8)  # peft's default
    for pattern, value in (config.get("alpha_pattern") or {}).items():  # peft's get_pattern_key: first match
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise LoraError(f"{path}: the lora_alpha of {module} in its {METADATA_KEY} is not a number: {alpha!r}")
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


# -- merging ------------------------------------------------------------------------------------------------------

LoraSpec = tuple["Lora | str | Path", float]


def read_loras(loras: Iterable[LoraSpec]) -> list[tuple[Lora, float]]:
    """``(lora, scale)`` pairs with every path read (:func:`read_lora`) and every scale checked."""
    pairs = []
    for lora, scale in loras:
        lora = lora if isinstance(lora, Lora) else read_lora(lora)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise LoraError(f"{lora.path}: the LoRA's scale must be a finite number, not {scale!r}")
        pairs.append((lora, float(scale)))
    return pairs


def _without_trailing_ones(shape: Sequence[int]) -> tuple[int, ...]:
    """A shape with its trailing 1s dropped: (in, 1, 1) of a 1x1 convolution is (in,) of a Linear."""
    shape = tuple(shape)
    while shape and shape[-1] == 1:
        shape = shape[:-1]
    return shape


class _Targets:
    """The weights of a tensor source by every spelling a LoRA may give their module: dotted as the source names
    them (and as ``aliases`` do), and kohya's with underscores for dots."""

    def __init__(self, names: Iterable[str], aliases: Mapping[str, str]):
        names = set(names)
        self.dotted = {name[:-len(".weight")]: name for name in names if name.endswith(".weight")}
        for alias, name in aliases.items():
            if alias.endswith(".weight") and name in names:
                self.dotted.setdefault(alias[:-len(".weight")], name)
        self.underscored: dict[str, str | None] = {}  # None: two weights spell so
        for module, name in self.dotted.items():
            key = module.replace(".", "_")
            self.underscored[key] = name if self.underscored.get(key, name) == name else None

    def find(self, layer: LoraLayer) -> str | None:
        return (self.underscored if layer.underscored else self.dotted).get(layer.module)


class LoraMergedSource:
    """A tensor source whose weights are ``base``'s with the layers of ``loras`` (``(lora, scale)`` pairs) added.

    Only ``component``'s layers are merged. Every LoRA layer must name a weight of ``base`` (by its canonical
    name, by one of ``aliases``: another spelling -> canonical name, such as a single-file checkpoint's original
    names, or by either with kohya's underscores) and fit its shape; both are checked here, from the headers, so
    that a LoRA for another network fails before anything is read.

    A touched tensor is read as a new float32 array, ``W + sum of scale * factor * (B @ A)`` computed in float32
    from the stored values (as diffusers' ``fuse_lora`` computes it: merging in float64 and rounding once lands
    further from its bits than float32 does). The network owns that copy (it is writeable, where the file's views
    are not, which is how the loader tells them apart). Untouched tensors are the base source's views of the file.
    """

    def __init__(self, base: TensorSource, loras: Sequence[tuple[Lora, float]], component: str = "unet",
                 aliases: Mapping[str, str] | None = None):
        self._base = base
        listed = ", ".join(f"{lora.path.name} x{scale:g}" for lora, scale in loras)
        self.description = f"{base.description} with LoRA {listed}"
        targets = _Targets(base.keys(), aliases or {})
        self._updates: dict[str, list[tuple[Lora, LoraLayer, float]]] = {}
        for lora, scale in loras:
            updated: dict[str, LoraLayer] = {}  # weight name -> the layer of this LoRA that updates it
            layers = lora.layers_of(component)
            unmatched = [layer.module for layer in layers if targets.find(layer) is None]
            if unmatched:
                first = next(layer for layer in layers if layer.module == unmatched[0])
                why = "two weights" if first.underscored and first.module in targets.underscored else "no weight"
                more = (f" ({len(unmatched) - 1} more of its {len(layers)} layers match nothing either: "
                        f"{', '.join(unmatched[1:4])}{', ...' if len(unmatched) > 4 else ''})"
                        if len(unmatched) > 1 else "")
                raise LoraError(f"{lora.path}: LoRA layer {unmatched[0]} names {why} of {base.description}{more}; "
                                "is the LoRA for another model?")
            for layer in layers:
                name = targets.find(layer)
                if name in updated:
                    raise LoraError(f"{lora.path}: LoRA layers {updated[name].module} and {layer.module} both update "
                                    f"{name}")
                updated[name] = layer
                shape = tuple(base.shape(name))
                if (len(shape) < 2 or layer.up_shape[0] != shape[0]
                        or _without_trailing_ones(layer.down_shape[1:]) != _without_trailing_ones(shape[1:])):
                    raise LoraError(f"{lora.path}: LoRA layer {layer.module} (down {layer.down_shape}, up "
                                    f"{layer.up_shape}) does not fit {name} {shape} of {base.description}")
                self._updates.setdefault(name, []).append((lora, layer, scale))

    @property
    def merged(self) -> list[str]:
        """The names of the tensors a LoRA touches."""
        return list(self._updates)

    def keys(self) -> list[str]:
        return self._base.keys()

    def dtype(self, name: str) -> str:
        return "F32" if name in self._updates else self._base.dtype(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._base.shape(name)

    def read(self, name: str) -> np.ndarray:
        updates = self._updates.get(name)
        if updates is None:
            return self._base.read(name)
        merged = np.array(stored_float32(self._base.read(name), self._base.dtype(name)), np.float32)  # a copy
        for lora, layer, scale in updates:
            delta = lora.delta(layer, scale, merged.shape)
            if not np.isfinite(delta).all():
                raise LoraError(f"{lora.path}: LoRA layer {layer.module} has non-finite values (inf or NaN) at "
                                f"scale {scale:g}")
            merged += delta
        self._base.release(name)
        return merged

    def release(self, name: str | None = None) -> None:
        self._base.release(name)

    def unexpected(self) -> list[str]:
        return self._base.unexpected()


__all__ = ["Lora", "LoraLayer", "LoraMergedSource", "read_lora", "read_loras"]
