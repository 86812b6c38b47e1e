"""AUTOMATIC1111's attention syntax: a prompt -> fragments of text, each with the weight its brackets give it.

The rules of the webui's ``parse_prompt_attention`` (``modules/prompt_parser.py``):

- ``(text)`` multiplies the weight of ``text`` by 1.1, ``[text]`` divides it by 1.1; brackets nest and
  multiply (``((text))`` is 1.21);
- ``(text:1.3)`` multiplies by 1.3 instead: ``:`` then a number (optionally signed, spaces around it allowed)
  closing the innermost open ``(``;
- ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are the character itself, as text; a lone backslash is dropped;
- unbalanced brackets are not an error: a ``)`` or ``]`` with none of its kind open, and a ``:1.3)`` with no
  ``(`` open, are plain text; every ``(`` still open at the end multiplies everything after it by 1.1, every
  ``[`` by 1/1.1;
- ``BREAK`` (the word, in capitals) ends the current 75-token chunk: it becomes a marker, the text
  ``"BREAK"`` with weight -1, as the webui writes it. Inside brackets the marker's weight is multiplied like any
  other, and it is then the plain word with that (negative) weight, as in the webui;
- adjacent fragments of equal weight are merged; a prompt with no fragment is ``[("", 1.0)]``.

One difference: the webui fails on a weight that matches its pattern but is not a number (``(cat:1.2.3)``);
sdcli reads such a ``:1.2.3)`` as plain text, which leaves its ``(`` open (and says so in ``unbalanced``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
BREAK_TEXT, BREAK_WEIGHT = "BREAK", -1.0

# One token of the syntax per match, tried in this order: the escapes, "(", "[", an explicit weight closing a
# round bracket, ")", "]", a run of ordinary characters, and a lone ":" (a colon that starts no weight).
ATTENTION_TOKEN = re.compile(r"""
    \\\( | \\\) | \\\[ | \\\] | \\\\ | \\
  | \(
  | \[
  | :\s*(?P<weight>[+-]?[.\d]+)\s*\)
  | \)
  | \]
  | [^\\()\[\]:]+
  | :
""", re.VERBOSE)
BREAK_SPLIT = re.compile(r"\s*\bBREAK\b\s*", re.S)


@dataclass(frozen=True)
class Fragment:
    """A run of prompt text and its attention weight (1.0: as written)."""

    text: str
    weight: float

    @property
    def is_break(self) -> bool:
        """The BREAK marker: ends the current chunk and adds no tokens."""
        return self.text == BREAK_TEXT and self.weight == BREAK_WEIGHT


@dataclass(frozen=True)
class ParsedPrompt:
    """A prompt's fragments, and what the parser read as unbalanced (empty when every bracket is matched)."""

    fragments: list[Fragment]
    unbalanced: tuple[str, ...]  # e.g. "')' with no '(' open", "'(' never closed"


def parse_attention(text: str) -> ParsedPrompt:
    """``text`` as fragments of (text, weight), by the rules of the module docstring.

    A closing bracket multiplies the weight of every fragment since its opening one, in place and in the order the
    brackets close, as the webui does, so the weights are the webui's to the last bit; the multiplications run over
    a numpy array, so that a prompt of thousands of brackets stays quick."""
    texts: list[str] = []
    weights = np.ones(len(text) + 1)  # a fragment per character at most (BREAK: 2 fragments from 5 characters)
    open_round: list[int] = []  # where each open "(" started, as an index into texts
    open_square: list[int] = []
    unbalanced: list[str] = []

    def append(fragment: str, weight: float = 1.0) -> None:
        weights[len(texts)] = weight
        texts.append(fragment)

    def multiply_from(start: int, multiplier: float) -> None:
        with np.errstate(over="ignore"):  # thousands of brackets overflow to inf, as Python's floats do
            weights[start:len(texts)] *= multiplier

    for match in ATTENTION_TOKEN.finditer(text):
        token, weight = match.group(0), match.group("weight")
        number = _number(weight)
        if token.startswith("\\"):
            append(token[1:])
        elif token == "(":
            open_round.append(len(texts))
        elif token == "[":
            open_square.append(len(texts))
        elif number is not None and open_round:
            multiply_from(open_round.pop(), number)
        elif token == ")" and open_round:
            multiply_from(open_round.pop(), ROUND_MULTIPLIER)
        elif token == "]" and open_square:
            multiply_from(open_square.pop(), SQUARE_MULTIPLIER)
        else:
            if weight is not None and number is None:
                unbalanced.append(f"{token!r} is not a weight (read as text)")
            elif token.endswith(")") or token == "]":
                unbalanced.append(f"{token!r} with no {'[' if token == ']' else '('!r} open")
            for i, part in enumerate(BREAK_SPLIT.split(token)):
                if i:
                    append(BREAK_TEXT, BREAK_WEIGHT)
                append(part)
    for start in open_round:
        multiply_from(start, ROUND_MULTIPLIER)
    for start in open_square:
        multiply_from(start, SQUARE_MULTIPLIER)
    unbalanced += ["'(' never closed"] * min(len(open_round), 1) + ["'[' never closed"] * min(len(open_square), 1)
    if not texts:
        append("")
    merged: list[tuple[list[str], float]] = [([texts[0]], float(weights[0]))]  # runs of equal weight
    for fragment, weight in zip(texts[1:], weights[1:len(texts)].tolist()):
        if weight == merged[-1][1]:
            merged[-1][0].append(fragment)
        else:
            merged.append(([fragment], weight))
    return ParsedPrompt([Fragment("".join(parts), weight) for parts, weight in merged], tuple(unbalanced))


def _number(weight: str | None) -> float | None:
    """The explicit weight as a float; None without one, or when it is not a number (``1.2.3``, ``.``)."""
    if weight is None:
        return None
    try:
        return float(weight)
    except ValueError:
        return None
