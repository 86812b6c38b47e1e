"""Prompts files: one prompt per line, each optionally with its own settings in command-line style.

::

    # blank lines and lines starting with "#" are skipped
    a lighthouse at dusk, oil painting
    a red fox in snow --seed 42 --steps 20 --negative-prompt "blurry, low quality" --guidance 6
    a city street at night --width 512 --height 768 --scheduler euler_a --clip-skip 2

The prompt is the text before the first `` --name`` option, taken as it stands (no quotes are removed); the
options after it are split like a shell line (``shlex``), so values with spaces or commas are quoted. Options
take ``--name value`` or ``--name=value``. The file is UTF-8 (a byte-order mark is allowed).
"""

from __future__ import annotations

import codecs
import math
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Collection

from ..errors import SdcliError
from ..params import GenerateParams

INTEGER = re.compile(r"[+-]?\d+")
OPTION_START = re.compile(r"(?:^|\s)--(?=[A-Za-z])")  # "--" that opens an option, not a dash in the prompt


def parse_integer(text: str) -> int:
    if not INTEGER.fullmatch(text):
        raise ValueError("an integer")
    return int(text)


def parse_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("a number") from None
    if not math.isfinite(value):
        raise ValueError("a finite number")
    return value


# Option name -> (the params field it overrides, parser). "--sampler" is accepted beside "--scheduler".
OPTIONS: dict[str, tuple[str, Callable[[str], object]]] = {
    "seed": ("seed", parse_integer),
    "steps": ("steps", parse_integer),
    "guidance": ("guidance_scale", parse_number),
    "negative-prompt": ("negative_prompt", str),
    "width": ("width", parse_integer),
    "height": ("height", parse_integer),
    "scheduler": ("sampler", str),
    "sampler": ("sampler", str),
    "clip-skip": ("clip_skip", parse_integer),
}
# What a line of an image prompts file may set besides: the strength of a run from an init image.
IMAGE_OPTIONS: dict[str, tuple[str, Callable[[str], object]]] = {
    "strength": ("strength", parse_number),
}
# What a line of a video prompts file may set besides (VideoParams fields).
VIDEO_OPTIONS: dict[str, tuple[str, Callable[[str], object]]] = {
    "frames": ("frames", parse_integer),
    "fps": ("fps", parse_integer),
}


@dataclass(frozen=True)
class PromptLine:
    """One prompt of a prompts file. ``overrides`` are keyed by GenerateParams field name (``guidance_scale``,
    ``negative_prompt``, ``sampler``, ``clip_skip``, ...) so ``params.with_(prompt=p.prompt, **p.overrides)``
    applies them; ``line`` is the 1-based line number in the file."""

    prompt: str
    overrides: dict[str, object] = field(default_factory=dict)
    line: int = 0


def parse_options(text: str, where: str, samplers: Collection[str] | None,
                  options: dict[str, tuple[str, Callable[[str], object]]] = OPTIONS) -> dict[str, object]:
    """The ``--name value`` options of one line (names of ``options``) as params overrides; ``where`` is
    "FILE:LINE"."""
    try:
        tokens = shlex.split(text)
    except ValueError as error:
        raise SdcliError(f"{where}: {str(error).lower()} in the options") from None
    overrides: dict[str, object] = {}
    position = 0
    while position < len(tokens):
        token = tokens[position]
        if not token.startswith("--") or len(token) == 2:
            raise SdcliError(f"{where}: unexpected {token!r} among the options (write --name value)")
        name, equals, value = token[2:].partition("=")
        if name not in options:
            raise SdcliError(f"{where}: unknown option --{name} (allowed: "
                             f"{', '.join('--' + option for option in options)})")
        if not equals:
            if position + 1 == len(tokens):
                raise SdcliError(f"{where}: --{name} needs a value")
            value = tokens[position + 1]
            position += 1
        position += 1
        target, parse = options[name]
        if target in overrides:
            raise SdcliError(f"{where}: --{name} is given twice")
        try:
            overrides[target] = parse(value)
        except ValueError as error:
            raise SdcliError(f"{where}: --{name} expects {error}, got {value!r}") from None
        if target == "sampler" and samplers is not None and value not in samplers:
            raise SdcliError(f"{where}: unknown {name} {value!r} (choose from {', '.join(sorted(samplers))})")
    return overrides


def check_image_request(prompt: str, overrides: dict[str, object]) -> None:
    GenerateParams(prompt=prompt, **overrides).validate()  # type: ignore[arg-type]


def parse_line(text: str, where: str, samplers: Collection[str] | None,
               options: dict[str, tuple[str, Callable[[str], object]]] = OPTIONS,
               check: Callable[[str, dict[str, object]], None] = check_image_request) -> tuple[str, dict[str, object]]:
    """A non-comment line -> (prompt, overrides), with the overrides checked like a full request (``check``
    raises SdcliError)."""
    start = OPTION_START.search(text)
    prompt = (text if start is None else text[:start.start()]).strip()
    if not prompt:
        raise SdcliError(f"{where}: no prompt before the options")
    overrides = parse_options(text[start.start():], where, samplers, options) if start is not None else {}
    try:
        check(prompt, overrides)
    except SdcliError as error:
        raise SdcliError(f"{where}: {error}") from None
    return prompt, overrides


def read_prompts_file(path: str | Path, *, samplers: Collection[str] | None = None,
                      extra_options: dict[str, tuple[str, Callable[[str], object]]] | None = None,
                      check: Callable[[str, dict[str, object]], None] = check_image_request) -> list[PromptLine]:
    """Every prompt of the prompts file at ``path`` in order (format in the module docstring).

    ``samplers``, when given, are the scheduler names a line may choose. ``extra_options`` are options a line may
    set besides :data:`OPTIONS` (``VIDEO_OPTIONS`` for clips), and ``check(prompt, overrides)`` validates a line's
    request (an image's GenerateParams by default; raises SdcliError). Raises a one-line SdcliError ("FILE:LINE:
    ...") for an unknown option, a bad value, text that is not UTF-8, a missing file or a file without prompts.
    """
    path = Path(path).expanduser()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SdcliError(f"{path}: no such prompts file") from None
    except IsADirectoryError:
        raise SdcliError(f"{path} is a folder, not a prompts file") from None
    except OSError as error:
        raise SdcliError(f"cannot read the prompts file {path}: {error.strerror}") from None
    raw = raw.removeprefix(codecs.BOM_UTF8)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[:error.start].count(b"\n") + 1
        raise SdcliError(f"{path}:{line}: not UTF-8 text (byte {raw[error.start]:#04x}); save the file as UTF-8") \
            from None
    prompts = []
    for number, line in enumerate(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        prompt, overrides = parse_line(stripped, f"{path}:{number}", samplers, {**OPTIONS, **(extra_options or {})},
                                       check)
        prompts.append(PromptLine(prompt, overrides, number))
    if not prompts:
        raise SdcliError(f"{path} holds no prompts (only blank lines and # comments)")
    return prompts
