"""Prompts files: one prompt per line with optional command-line style settings, and the errors a user can make.

Text parsing only: every expected value is exact.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sdcli.errors import SdcliError
from sdcli.io.prompts_file import PromptLine, read_prompts_file
from sdcli.params import GenerateParams


def write(tmp_path: Path, text: str | bytes, name: str = "prompts.txt") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_plain_prompts_skip_blank_lines_and_comments(tmp_path):
    path = write(tmp_path, "# landscapes\n\na lighthouse at dusk, oil painting\n   \n  # indented comment\n"
                           "a #hashtag is part of the prompt\n  surrounding spaces  \n")
    assert read_prompts_file(path) == [PromptLine("a lighthouse at dusk, oil painting", {}, 3),
                                       PromptLine("a #hashtag is part of the prompt", {}, 6),
                                       PromptLine("surrounding spaces", {}, 7)]


def test_overrides_every_option(tmp_path):
    path = write(tmp_path, 'a red fox in snow --seed 42 --steps 20 --negative-prompt "blurry, low quality" '
                           "--guidance 6 --width 512 --height 768 --scheduler euler_a --clip-skip 2\n")
    (line,) = read_prompts_file(path)
    assert line.prompt == "a red fox in snow" and line.line == 1
    assert line.overrides == {"seed": 42, "steps": 20, "negative_prompt": "blurry, low quality",
                              "guidance_scale": 6.0, "width": 512, "height": 768, "sampler": "euler_a",
                              "clip_skip": 2}
    assert isinstance(line.overrides["guidance_scale"], float) and isinstance(line.overrides["seed"], int)
    params = GenerateParams(prompt="base").with_(prompt=line.prompt, **line.overrides)
    assert (params.seed, params.sampler, params.negative_prompt) == (42, "euler_a", "blurry, low quality")


def test_option_spellings_and_prompt_dashes(tmp_path):
    path = write(tmp_path, "a well-lit room -- no people --guidance=7.5 --sampler ddim --seed=-0\n"
                           "dawn --negative-prompt ''\n"
                           "\ufeffunicode 富士山 🌸 --negative-prompt 'ぼやけた, 低品質'\n")
    lines = read_prompts_file(path)
    assert lines[0] == PromptLine("a well-lit room -- no people", {"guidance_scale": 7.5, "sampler": "ddim",
                                                                   "seed": 0}, 1)
    assert lines[1].overrides == {"negative_prompt": ""}
    assert lines[2].prompt == "\ufeffunicode 富士山 🌸"  # a BOM is only skipped at the start of the file
    assert lines[2].overrides == {"negative_prompt": "ぼやけた, 低品質"}


def test_encodings_and_line_endings(tmp_path):
    path = write(tmp_path, "\ufefffirst --seed 1\r\n\r\nsecond\rthird\n".encode("utf-8"))
    assert [(line.prompt, line.line) for line in read_prompts_file(path)] == [("first", 1), ("second", 3),
                                                                             ("third", 4)]
    with pytest.raises(SdcliError, match=r"prompts\.txt:2: not UTF-8"):
        read_prompts_file(write(tmp_path, "fine\ncaf\xe9\n".encode("latin-1")))


def test_sampler_names_checked_when_given(tmp_path):
    path = write(tmp_path, "fox --scheduler eulr\n")
    assert read_prompts_file(path)[0].overrides == {"sampler": "eulr"}
    with pytest.raises(SdcliError, match=r":1: unknown scheduler 'eulr' \(choose from ddim, euler\)"):
        read_prompts_file(path, samplers=["euler", "ddim"])


@pytest.mark.parametrize("line, message", [
    ("fox --seed forty", "--seed expects an integer, got 'forty'"),
    ("fox --steps 2.5", "--steps expects an integer, got '2.5'"),
    ("fox --guidance high", "--guidance expects a number, got 'high'"),
    ("fox --guidance nan", "--guidance expects a finite number, got 'nan'"),
    ("fox --cfg 7", "unknown option --cfg (allowed: --seed, --steps"),
    ("fox --seed", "--seed needs a value"),
    ("fox --seed 1 --seed 2", "--seed is given twice"),
    ("fox --scheduler euler --sampler ddim", "--sampler is given twice"),
    ("fox --seed 1 2", "unexpected '2' among the options"),
    ('fox --negative-prompt "blurry', "no closing quotation in the options"),
    ("--seed 4", "no prompt before the options"),
    ("fox --width 510", "width must be a positive multiple of 8, got 510 (try 512)"),
    ("fox --seed -1", "seed must lie in 0 .. 4294967295, got -1"),
    ("fox --steps 0", "steps must be at least 1, got 0"),
    ("fox --clip-skip 0", "clip skip must be at least 1, got 0"),
    ("fox --guidance -1", "guidance scale must not be negative, got -1.0"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    path = write(tmp_path, f"# header\nfirst prompt\n{line}\n")
    with pytest.raises(SdcliError) as caught:
        read_prompts_file(path)
    text = str(caught.value)
    assert text.startswith(f"{path}:3: ") and message in text and "\n" not in text


def test_files_without_prompts_and_missing_files(tmp_path):
    for text in ("", "\n\n", "# only a comment\n   \n"):
        with pytest.raises(SdcliError, match="holds no prompts"):
            read_prompts_file(write(tmp_path, text))
    with pytest.raises(SdcliError, match="no such prompts file"):
        read_prompts_file(tmp_path / "missing.txt")
    with pytest.raises(SdcliError, match="is a folder"):
        read_prompts_file(tmp_path)
