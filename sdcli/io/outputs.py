"""Where each image of a run goes, decided and checked before any work starts.

``--output`` takes one of four forms:

- **a file name**, ``out.png``: one image goes there; several go to numbered files beside it, ``out-1.png`` ..
  ``out-N.png``, the number zero-padded to the width of N (``out-01.png`` .. ``out-12.png``);
- **a folder**, an existing one or any path ending in ``/`` (created when its parent exists): images go to
  ``<folder>/<number:05d>-<seed>.png``, numbered on from the highest number already there (the AUTOMATIC1111
  web UI's convention), so runs into the same folder never collide;
- **a template** with ``{index}`` (1-based), ``{seed}`` and ``{prompt}`` (a file-name-safe slug of the prompt,
  at most 40 characters) in Python format syntax, ``runs/{prompt}-{seed}.png`` or ``img-{index:03d}.png``;
  a template that gives two images one file is refused;
- a name without a suffix gets ``.png``; any other suffix is refused (only PNG is written).

Every planned file is checked at once: an existing file without ``overwrite`` or a missing folder stops the run
before the model is even loaded.
"""

from __future__ import annotations

import os
import re
import string
import unicodedata
from pathlib import Path
from typing import Sequence

from ..errors import SdcliError
from .files import OutputExistsError, check_output

PNG_SUFFIX = ".png"
TEMPLATE_FIELDS = ("index", "seed", "prompt")
PROMPT_SLUG_LENGTH = 40
FOLDER_NUMBER = re.compile(r"(\d+)-")  # the leading "<number>-" of a file written into an output folder


def prompt_slug(prompt: str, limit: int = PROMPT_SLUG_LENGTH) -> str:
    """``prompt`` as a file-name-safe slug: lower-case words (letters and digits of any script) joined by "-",
    whole words up to ``limit`` characters; "prompt" when nothing usable is left."""
    words = re.findall(r"[^\W_]+", unicodedata.normalize("NFKC", prompt).lower())
    slug = ""
    for word in words:
        longer = f"{slug}-{word}" if slug else word
        if len(longer) > limit:
            break
        slug = longer
    if not slug and words:
        slug = words[0][:limit]  # a first word longer than the limit
    return slug or "prompt"


def template_fields(output: str) -> list[str]:
    """The replacement fields of ``output`` read as a format string; SdcliError for unknown or broken ones."""
    try:
        parsed = list(string.Formatter().parse(output))
    except ValueError as error:
        raise SdcliError(f"output {output!r}: {error} (write {{{{ or }}}} for a literal brace)") from None
    fields = [name for _, name, _, _ in parsed if name is not None]
    unknown = [name for name in fields if name not in TEMPLATE_FIELDS]
    if unknown:
        raise SdcliError(f"output {output!r}: unknown field {{{unknown[0]}}} "
                         f"(templates may use {', '.join('{' + name + '}' for name in TEMPLATE_FIELDS)})")
    return fields


def with_png_suffix(name: str, output: str) -> str:
    """``name`` ending in .png: added when there is no suffix, refused when there is another one."""
    suffix = Path(name).suffix
    if not suffix:
        return name + PNG_SUFFIX
    if suffix.lower() != PNG_SUFFIX:
        raise SdcliError(f"output {output!r}: sdcli writes PNG images; use a name ending in {PNG_SUFFIX}, "
                         f"not {suffix}")
    return name


def next_folder_number(folder: Path) -> int:
    """One more than the highest "<number>-" file name in ``folder`` (1 in a folder without any)."""
    numbers = [int(match.group(1)) for entry in folder.iterdir() if (match := FOLDER_NUMBER.match(entry.name))]
    return max(numbers, default=0) + 1


def templated_paths(output: str, seeds: Sequence[int], prompts: Sequence[str] | None) -> list[Path]:
    """``output`` formatted once per image; SdcliError when two images would share a file."""
    fields = template_fields(output)
    if "prompt" in fields and prompts is None:
        raise ValueError("a template with {prompt} needs the prompts")
    if output.endswith(("/", os.sep)):
        raise SdcliError(f"output {output!r}: a template names files; end it with a file name")
    probe = "".join(literal + ("x" if name is not None else "")
                    for literal, name, _, _ in string.Formatter().parse(output))
    with_png_suffix(probe, output)  # refuses a suffix other than .png
    if not Path(probe).suffix:
        output += PNG_SUFFIX
    paths: list[Path] = []
    first_user: dict[str, int] = {}
    for index, seed in enumerate(seeds, start=1):
        slug = prompt_slug(prompts[index - 1]) if prompts is not None else ""
        try:
            path = Path(output.format(index=index, seed=seed, prompt=slug)).expanduser()
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as error:
            raise SdcliError(f"output template {output!r}: {error}") from None
        key = os.path.normcase(os.path.abspath(path))
        if key in first_user:
            raise SdcliError(f"output template {output!r} gives images {first_user[key]} and {index} the same "
                             f"file {path}; add {{index}} or {{seed}}")
        first_user[key] = index
        paths.append(path)
    return paths


def plan_output_paths(output: str | Path, count: int, seeds: Sequence[int], prompts: Sequence[str] | None = None,
                      overwrite: bool = False) -> list[Path]:
    """The file for each of ``count`` images (see the module docstring for the forms ``output`` takes).

    ``seeds`` (and ``prompts``, needed when a template uses ``{prompt}``) hold one entry per image. Raises
    OutputExistsError naming the first planned file that exists (unless ``overwrite``) and SdcliError for a
    missing folder, a non-PNG suffix or a template that collides. The only side effect is creating the output
    folder of the ``dir/`` form.
    """
    if count < 1 or len(seeds) != count or (prompts is not None and len(prompts) != count):
        raise ValueError(f"{count} images need {count} seeds (and prompts), "
                         f"got {len(seeds)} ({'no' if prompts is None else len(prompts)} prompts)")
    text = os.fspath(output)
    if not text:
        raise SdcliError("the output path is empty")
    path = Path(text).expanduser()
    if template_fields(text):
        paths = templated_paths(text, seeds, prompts)
    elif text.endswith(("/", os.sep)) or path.is_dir():
        if not path.is_dir():
            if not path.parent.is_dir():
                raise SdcliError(f"cannot create the output folder {path}: its parent {path.parent} does not exist")
            if path.exists():
                raise SdcliError(f"output {text!r} names a folder, but {path} is a file")
            path.mkdir()
        first = next_folder_number(path)
        paths = [path / f"{number:05d}-{seed}{PNG_SUFFIX}" for number, seed in enumerate(seeds, start=first)]
    else:
        path = path.with_name(with_png_suffix(path.name, text))
        if count == 1:
            paths = [path]
        else:
            width = len(str(count))
            paths = [path.with_name(f"{path.stem}-{number:0{width}d}{path.suffix}") for number in range(1, count + 1)]
    check_planned(paths, overwrite)
    return paths


def check_planned(paths: list[Path], overwrite: bool) -> None:
    """Every planned file may be written: its folder exists, it is not a folder, and it is new or ``overwrite``."""
    for path in paths:
        check_output(path, overwrite=True)  # folder errors first: they need a different fix
    if overwrite:
        return
    existing = [path for path in paths if path.exists()]
    if existing:
        others = f" (and {len(existing) - 1} more of the {len(paths)} planned files)" if len(existing) > 1 else ""
        raise OutputExistsError(f"{existing[0]} exists{others}; pass --overwrite to replace "
                                f"{'them' if others else 'it'}")
