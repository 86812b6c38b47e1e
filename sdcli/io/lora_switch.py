"""Switching a built network between LoRA sets, changing only the weights the LoRAs touch.

A LoRA set is a list of ``(LoRA, scale)`` pairs, as :class:`~sdcli.io.lora.LoraMergedSource` merges them. A run
whose jobs ask for different sets (A1111's ``<lora:name:weight>`` tags that differ from one prompt line to the
next) would otherwise rebuild the UNet and text encoder per job, and pack every weight again.

The design: a network is built once over its tensor source and keeps, by full name, the :class:`Parameter` each
weight became (``load_network(named=...)``). A LoRA touches a few of them (every attention projection, say, of
the UNet's 686 tensors). Switching from set A to set B goes over the names either set touches and, for each,
exchanges what the network's parameter holds (:meth:`Parameter.exchange`) with the version B needs:

- ``W + B's deltas`` for a name B touches: made once per set (a new float32 copy, as ``LoraMergedSource`` reads
  it) and kept, prepared, from then on, so that a batch that comes back to a set does not merge it again;
- the base weight otherwise: the view of the mapped file the network was built with (or made again from the
  source exactly as the build made it), never ``W + delta - delta``, so that returning to no LoRA gives the bits
  of a network that never had one.

What the network held is parked under the set it belonged to (a base view drops its prepared form when parked:
the file still holds it). The cache is keyed by the set: each pair's file and scale, in order. It keeps every
set's merged copies for the switch's life: a run that cycles through many sets holds a copy of the touched layers
per set.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from ..ops import Ops
from ..ops.parameter import Parameter, Weight
from .lora import Lora, LoraMergedSource, LoraSpec, read_loras
from .weights import TensorSource, held_parameter

log = logging.getLogger("sdcli")

LoraSet = Sequence[LoraSpec]  # (LoRA or the path of its file, scale) pairs
SetKey = tuple[tuple[str, float], ...]


def set_key(loras: Sequence[tuple[Lora, float]]) -> SetKey:
    """What identifies a LoRA set in the cache: each file's resolved path and its scale, in order."""
    return tuple((str(lora.path.resolve()), float(scale)) for lora, scale in loras)


class LoraSwitch:
    """The weights of one built network (``parameters``: full name -> the Parameter the network holds), switchable
    between LoRA sets; ``active`` is the set the network was built with (its parameters hold its merged copies).

    ``component`` ("unet", "text_encoder") picks the LoRA layers that apply; ``aliases`` are the other spellings
    of the weight names a LoRA may use (see :class:`~sdcli.io.lora.LoraMergedSource`).
    """

    def __init__(self, component: str, base: TensorSource, parameters: Mapping[str, Parameter], ops: Ops,
                 precision: str, *, aliases: Mapping[str, str] | None = None, active: LoraSet = (),
                 stream: bool = False):
        self.component, self._base, self._parameters = component, base, dict(parameters)
        self._ops, self._precision, self._aliases, self._stream = ops, precision, dict(aliases or {}), stream
        active = read_loras(active)
        self._active: SetKey = set_key(active)
        self._touched: dict[SetKey, frozenset[str]] = {(): frozenset()}
        if active:
            self._touched[self._active] = frozenset(self._merged_source(active).merged)
        self._parked: dict[SetKey, dict[str, Parameter]] = {}  # set -> name -> its merged copy, prepared
        self._parked_base: dict[str, Parameter] = {}  # name -> the base weight, parked while a LoRA holds it
        self.merges = 0  # the weights merged so far (a set's are merged once)

    @property
    def active(self) -> SetKey:
        return self._active

    def touched(self, loras: LoraSet) -> frozenset[str]:
        """The names of the weights ``loras`` update (checked against the network: a one-line LoraError for a
        layer that names no weight of it or does not fit)."""
        loras = read_loras(loras)
        key = set_key(loras)
        if key not in self._touched:
            self._touched[key] = frozenset(self._merged_source(loras).merged)
        return self._touched[key]

    def activate(self, loras: LoraSet) -> None:
        """Make the network compute with ``loras`` merged (none: the base weights), exchanging only the weights
        the active set or ``loras`` touch."""
        loras = read_loras(loras)
        key = set_key(loras)
        if key == self._active:
            return
        wanted = self.touched(loras)
        held = self._touched[self._active]
        source = None
        for name in sorted(held | wanted):
            parameter = self._parameters[name]
            if name in wanted:
                incoming = self._parked.get(key, {}).pop(name, None)
                if incoming is None:
                    source = source or self._merged_source(loras)
                    incoming = self._ops.prepare(Weight.from_stored(source.read(name), "F32", self._precision,
                                                                    self._ops))
                    self.merges += 1
            else:
                incoming = self._parked_base.pop(name, None)
                if incoming is None:
                    incoming = held_parameter(self._base, name, self._ops, self._precision, self._stream)
            parameter.exchange(incoming)  # incoming now holds what the network held: park it
            if name in held:
                self._parked.setdefault(self._active, {})[name] = incoming
            else:
                incoming.unload()  # a view of the file: its prepared form is made again when needed
                self._parked_base[name] = incoming
        log.info("%s: LoRA set %s active (%d weights exchanged)", self.component,
                 ", ".join(f"{path} x{scale:g}" for path, scale in key) or "none", len(held | wanted))
        self._active = key

    def _merged_source(self, loras: LoraSet) -> LoraMergedSource:
        return LoraMergedSource(self._base, loras, self.component, self._aliases)


__all__ = ["LoraSet", "LoraSwitch", "set_key"]
