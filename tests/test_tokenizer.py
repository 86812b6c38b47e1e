"""The CLIP tokenizer against transformers' CLIPTokenizer and the stored reference tokenizations."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings, strategies as st

from sdcli.nn.tokenizer import ClipTokenizer, shipped_tokenizer_dir
from data_paths import CONFIGS, TEST_DATA

SUBJECTS = ["a cat", "An astronaut riding a horse", "the Eiffel tower at night", "portrait of a woman, 85mm",
            "a bowl of ramen", "cyberpunk city street", "a red fox in snow", "Mount Fuji", "an old library",
            "a robot painting", "Kyoto temple in autumn", "a steampunk airship", "two dogs playing poker",
            "macro photo of a dew drop", "isometric pixel-art castle"]
STYLES = ["", ", oil painting", " by Greg Rutkowski and Alphonse Mucha", ", highly detailed, 8k, trending on "
          "artstation", " -- photorealistic!!!", ", (masterpiece:1.2), [blurry]", " in the style of Van Gogh's "
          "'Starry Night'", ", 35mm f/1.8, ISO 400", " #sunset @beach", " (((best quality)))"]
SPECIAL_CASES = [
    "", " ", "   leading and trailing   ", "tabs\tand\nnewlines\r\nmixed", "MiXeD CaSe WoRdS", "ALL CAPS PROMPT",
    "café crème brûlée", "naïve façade", "Ångström über straße", "e\u0301 combining accent (NFD)", "ß ẞ ǅ ﬁ",
    "東京の夜景", "一只可爱的猫", "서울의 거리", "Москва зимой", "مرحبا بالعالم", "नमस्ते दुनिया", "ελληνικά γράμματα",
    "🐱🚀 emoji cat rocket 👩‍🚀", "flags 🇯🇵🇫🇷 and skin tones 👍🏽", "❤️ hearts ♥ ☺", "zero\u200bwidth\u200djoiner",
    "numbers 1234567890 3.14159 1,000,000 2nd 3rd 100%", "1girl, 2boys, 1990s", "year 2024 vs 1999",
    "punctuation !!! ??? ... --- ___ ***", "quotes \"double\" 'single' `back`", "brackets (a) [b] {c} <d>",
    "a&amp;b &lt;tag&gt; &quot;x&quot;", "path/to/file.png C:\\windows\\system32", "https://example.com/a?b=c&d=e",
    "email@example.com", "don't can't won't I'm you're we've they'll he'd", "it's 'quoted' and o'neill",
    "<|startoftext|>literal special<|endoftext|>", "<|endoftext|><|endoftext|>", "hello<|endoftext|>world",
    "supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "a" * 300,
    "word " * 80, "a, " * 100, "(cat:1.3) (dog:0.7) [bird] {fish}", "score_9, score_8_up, rating_safe",
    "\u00a0non-breaking\u00a0space", "\u3000ideographic space", "control\x07chars\x1b", "½ ¼ ² ³ ™ © ®",
    "math ∑ ∫ √ ∞ ≠ ≤", "currency $5 €10 £20 ¥30", "ǆ ǈ ǋ titlecase digraphs", "İstanbul ı",
]


def corpus() -> list[str]:
    combined = [subject + style for subject, style in itertools.product(SUBJECTS, STYLES)]
    return SPECIAL_CASES + combined + [prompt.upper() for prompt in combined[::7]]


@pytest.fixture(scope="module")
def reference(transformers):
    return transformers.CLIPTokenizer.from_pretrained(str(shipped_tokenizer_dir()))


@pytest.fixture(scope="module")
def reference_sd2(tmp_path_factory, transformers):
    folder = tmp_path_factory.mktemp("sd2_tokenizer")
    for name in ("vocab.json", "merges.txt"):
        (folder / name).write_bytes((shipped_tokenizer_dir() / name).read_bytes())
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).write_bytes((CONFIGS / "sd21" / "tokenizer" / name).read_bytes())
    return folder, transformers.CLIPTokenizer.from_pretrained(str(folder))


def test_corpus_is_large_and_varied():
    assert len(set(corpus())) >= 200


def test_ids_equal_transformers_on_corpus(reference):
    tokenizer = ClipTokenizer.from_folder()
    for text in corpus():
        assert tokenizer.encode(text) == reference(text)["input_ids"], text


def test_padded_ids_equal_transformers_sd1(reference):
    tokenizer = ClipTokenizer.from_folder()
    for text in corpus():
        expected = reference(text, padding="max_length", max_length=77, truncation=True)["input_ids"]
        assert tokenizer.tokenize(text).ids.tolist() == expected, text


def test_padded_ids_equal_transformers_sd2(reference_sd2):
    folder, reference = reference_sd2
    tokenizer = ClipTokenizer.from_folder(folder)
    assert tokenizer.pad_id == 0
    for text in corpus():
        expected = reference(text, padding="max_length", max_length=77, truncation=True)["input_ids"]
        assert tokenizer.tokenize(text).ids.tolist() == expected, text


def test_reference_tokenizations():
    data = json.loads((TEST_DATA / "clip_tokenizer" / "reference_tokenizations.json").read_text())
    sd1 = ClipTokenizer.from_folder()
    sd2 = ClipTokenizer.from_folder(CONFIGS / "sd21" / "tokenizer")
    assert (sd1.bos_id, sd1.eos_id) == (data["bos_id"], data["eos_id"])
    for case in data["cases"]:
        assert sd1.encode(case["text"]) == case["ids"], case["text"]
        assert sd1.tokenize(case["text"]).ids.tolist() == case["ids_77"], case["text"]
        assert sd2.tokenize(case["text"]).ids.tolist() == case.get("ids_77_sd21", case["ids_77"]), case["text"]


def test_truncation_keeps_eos_last_and_counts():
    tokenizer = ClipTokenizer.from_folder()
    long = tokenizer.tokenize("word " * 100)
    assert long.length == 77 and long.truncated == 102 - 77
    assert long.ids[0] == tokenizer.bos_id and long.ids[-1] == tokenizer.eos_id
    short = tokenizer.tokenize("a cat")
    assert short.length == 4 and short.truncated == 0


def test_random_text_equals_transformers(reference):
    tokenizer = ClipTokenizer.from_folder()

    @settings(max_examples=300, deadline=None)
    @given(st.text(max_size=120))
    def check(text):
        assert tokenizer.encode(text) == reference(text)["input_ids"]

    check()
