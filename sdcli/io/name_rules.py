"""Exact name maps from a checkpoint layout to canonical (diffusers) tensor names, by anchored rules.

A family's single-file maps (:mod:`sdcli.families.sd_names`, the AnimateDiff motion-module map) build their
network shape only (nothing is read) and translate every name it takes by a short list of rules. A rule is one
anchored pattern over a whole canonical name that parses it into its parts, and the function that names the
stored tensor from them. There is no substring renaming: a name that no rule matches, or that more than one
matches, is an error naming it, so a network change a map does not know fails instead of loading wrong. Each map
holds exactly one entry per tensor the network takes, and ``check_bijection`` asserts that no stored tensor, or
part of one, feeds two entries.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from .checkpoint import NameMap, SourceKey

Shapes = dict[str, tuple[int, ...]]

WEIGHT_BIAS = ("weight", "bias")


def one_of(names: Iterable[str], group: str | None = None) -> str:
    """A pattern matching exactly one of ``names`` (whole module paths, dots literal), captured as ``group``."""
    choice = "|".join(re.escape(name) for name in names)
    return f"(?P<{group}>{choice})" if group else f"(?:{choice})"


PARAM = one_of(WEIGHT_BIAS, "param")  # the last part of every name: a module's weight or bias
INDEX = r"\d+"  # a block, layer or level number


@dataclass(frozen=True)
class Rule:
    """Canonical names that ``pattern`` matches whole, and the stored tensor each comes from.

    ``source`` names the stored tensor from the match, without the component's prefix: a name, or a SourceKey
    for a part of a fused tensor. It raises ``NoPlace`` for a parsed index the layout has no place for. With
    ``as_canonical_shape`` the stored tensor is read in the canonical tensor's shape (a 1x1 conv kernel as the
    Linear weight it is).
    """

    pattern: str
    source: Callable[[re.Match], str | SourceKey]
    as_canonical_shape: bool = False


class NoPlace(ValueError):
    """A canonical name that a rule parses but whose index the single-file layout has no place for."""


def below(match: re.Match, group: str, count: int) -> int:
    """The index captured as ``group``, which must be below ``count`` (the layout has no place for others)."""
    index = int(match[group])
    if index >= count:
        raise NoPlace(f"{group} {index} is not below {count}")
    return index


def translate(shapes: Shapes, rules: Iterable[Rule], prefix: str, what: str) -> NameMap:
    """The map of every canonical tensor in ``shapes`` (the network's, in build order) through ``rules``."""
    compiled = [(re.compile(rule.pattern), rule) for rule in rules]
    mapping: NameMap = {}
    for canonical, shape in shapes.items():
        matches = [(match, rule) for pattern, rule in compiled if (match := pattern.fullmatch(canonical))]
        if len(matches) != 1:
            found = "no rule" if not matches else f"{len(matches)} rules ({', '.join(r.pattern for _, r in matches)})"
            raise ValueError(f"{what} tensor {canonical!r} matches {found} of the single-file map")
        match, rule = matches[0]
        try:
            source = rule.source(match)
        except NoPlace as error:
            raise ValueError(f"{what} tensor {canonical!r} has no place in the single-file layout: {error}") \
                from None
        key = SourceKey(source) if isinstance(source, str) else source
        mapping[canonical] = replace(key, name=prefix + key.name,
                                     shape=tuple(shape) if rule.as_canonical_shape else key.shape)
    check_bijection(mapping)
    return mapping


def network_shapes(build: Callable) -> Shapes:
    """Every tensor the network ``build(params)`` takes, with its shape; nothing is read."""
    from .weights import tensor_shapes  # here: sdcli.io.weights imports sdcli.io.checkpoint

    return tensor_shapes(build)


def check_bijection(mapping: NameMap) -> None:
    """Raise ValueError unless every stored tensor (or part of one) feeds exactly one canonical tensor.

    A tensor is used whole at most once, never both whole and in parts, and a fused tensor is split into all of
    its ``count`` parts, each used once, with a single ``count``.
    """
    uses: dict[str, list[tuple[str, tuple[int, int] | None]]] = defaultdict(list)
    for canonical, source in mapping.items():
        uses[source.name].append((canonical, source.part))
    problems = []
    for stored, entries in uses.items():
        parts = [part for _, part in entries]
        users = ", ".join(canonical for canonical, _ in entries)
        if None in parts:
            if len(entries) > 1:
                problems.append(f"{stored} feeds {users}")
            continue
        counts = {count for _, count in parts}
        indices = sorted(index for index, _ in parts)
        if len(counts) != 1 or indices != list(range(next(iter(counts)))):
            problems.append(f"{stored} parts {sorted(parts)} feed {users}")
    if problems:
        raise ValueError("name map is not a bijection: " + "; ".join(problems))
