"""Prompt weighting and long prompts in AUTOMATIC1111's syntax, against expectations computed by hand from the
webui's algorithm (``modules/prompt_parser.py``, ``modules/sd_hijack_clip.py``, ``modules/sd_emphasis.py``), and
the compatibility promise: a plain prompt of at most 75 tokens encodes bit for bit as before. No torch: the text
encoder is the golden test's tiny checkpoint."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from data_paths import TEST_DATA
from sdcli import load_prompt_encoder
from sdcli.families.sd import PromptEncoder
from sdcli.nn.tokenizer import ClipTokenizer, shipped_tokenizer_dir
from sdcli.prompting import CHUNK_TOKENS, ChunkTokens, Fragment, apply_weights, chunk_prompt, match_lengths
from sdcli.prompting import parse_attention

MODEL = TEST_DATA / "golden" / "tiny-sd1"

TOL = {
    # The mean restoration in float32 against the same formula in float64: a handful of float32 roundings of
    # values of order 1 (the multiplications and the two means over 77 x D values).
    "emphasis": 1e-5,
}


def fragments(text: str) -> list[tuple[str, float]]:
    return [(fragment.text, fragment.weight) for fragment in parse_attention(text).fragments]


# -- parsing ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    # The webui's own doctests of parse_prompt_attention.
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.1 * 1.1 * 1.3), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.1 * 1.1 * 1.1 * 1.1), (".", 1.1)]),
    # Nesting multiplies: two rounds then one square; an explicit weight replaces the 1.1 of its own bracket.
    ("((word))", [("word", 1.1 * 1.1)]),
    ("[word]", [("word", 1 / 1.1)]),
    ("[[word]]", [("word", (1 / 1.1) * (1 / 1.1))]),
    ("(word:1.3)", [("word", 1.3)]),
    ("(word : 0.5 )", [("word ", 0.5)]),  # spaces around the number (the one before ":" is text)
    ("((a:1.5) b)", [("a", 1.5 * 1.1), (" b", 1.1)]),
    # Escapes are the character itself; a lone backslash is dropped.
    ("\\(a\\) \\[b\\] c\\\\d", [("(a) [b] c\\d", 1.0)]),
    ("a \\ b", [("a  b", 1.0)]),
    # A closing bracket with nothing open, or a weight with no "(" open, is text.
    ("a) b] c:1.2)", [("a) b] c:1.2)", 1.0)]),
    # A colon that starts no weight is text.
    ("time: 5pm", [("time: 5pm", 1.0)]),
    # Unclosed brackets weight everything after them.
    ("a (b [c", [("a ", 1.0), ("b ", 1.1), ("c", 1.1 / 1.1)]),
    # A weight that is not a number is text, and leaves its "(" open.
    ("(cat:1.2.3)", [("cat:1.2.3)", 1.1)]),
    # BREAK is a marker (the text BREAK with weight -1), with the spaces around it taken away.
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("a BREAKING b", [("a BREAKING b", 1.0)]),
    # The empty prompt.
    ("", [("", 1.0)]),
])
def test_parse_attention_follows_the_webui(text, expected):
    """parse_prompt_attention's rules: "(" and "[" push the current position; ")" multiplies every fragment since
    the matching "(" by 1.1, "]" divides by 1.1, ":w)" multiplies by w; unmatched closers are text; open brackets
    at the end multiply the rest; adjacent fragments of equal weight merge."""
    got = fragments(text)
    assert [text for text, _ in got] == [text for text, _ in expected]
    assert [weight for _, weight in got] == pytest.approx([weight for _, weight in expected], rel=1e-12)


def test_unbalanced_brackets_are_reported():
    assert parse_attention("a (b) [c]").unbalanced == ()
    assert parse_attention("a (b").unbalanced == ("'(' never closed",)
    assert parse_attention("a b)").unbalanced == ("')' with no '(' open",)
    assert parse_attention("x]").unbalanced == ("']' with no '[' open",)


# -- chunking, on a made-up vocabulary: every word is one token ----------------------------------------------------

START, END, PAD, COMMA = 1000, 1001, 0, 5
SD1_TOKENS = ChunkTokens(start=START, end=END, pad=END, comma=COMMA)
SD2_TOKENS = ChunkTokens(start=START, end=END, pad=PAD, comma=COMMA)


def word_ids(text: str) -> list[int]:
    """A tokenizer for the chunking tests: "w17" is id 17, "," is the comma (5)."""
    return [COMMA if word == "," else int(word[1:]) for word in text.replace(",", " , ").split()]


def words(*ids: int) -> str:
    return " ".join("," if i == COMMA else f"w{i}" for i in ids)


def chunks_of(text_or_fragments, tokens=SD1_TOKENS, embeddings=None):
    parsed = (parse_attention(text_or_fragments).fragments if isinstance(text_or_fragments, str)
              else text_or_fragments)
    return chunk_prompt(parsed, word_ids, tokens, embeddings)


def test_a_short_prompt_is_one_chunk_framed_and_padded():
    """[start] + the prompt's tokens + end tokens up to 76 + [end]: 77 ids, weights 1."""
    (chunk,) = chunks_of(words(10, 11, 12))
    assert chunk.ids.tolist() == [START, 10, 11, 12] + [END] * 73
    assert chunk.weights.tolist() == [1.0] * 77 and not chunk.weighted


def test_sd2_pads_after_the_first_end_token():
    """Where the pad id is not the end id, every id after the chunk's first end token is the pad id."""
    (chunk,) = chunks_of(words(10, 11), tokens=SD2_TOKENS)
    assert chunk.ids.tolist() == [START, 10, 11, END] + [PAD] * 73


def test_the_empty_prompt_is_one_chunk():
    (chunk,) = chunks_of("")
    assert chunk.ids.tolist() == [START] + [END] * 76


def test_weights_follow_the_tokens_of_their_fragment():
    (chunk,) = chunks_of(f"{words(10)} ({words(11, 12)}:1.5) [{words(13)}]")
    assert chunk.weights[:6].tolist() == pytest.approx([1.0, 1.0, 1.5, 1.5, 1 / 1.1, 1.0])
    assert chunk.weights[5:].tolist() == [1.0] * 72  # the end tokens and padding


def test_75_tokens_fill_one_chunk_and_the_76th_starts_the_next():
    """A chunk takes 75 prompt tokens; the 76th starts a second chunk (no comma: no backtracking)."""
    ids = list(range(10, 85))  # 75 tokens
    (chunk,) = chunks_of(words(*ids))
    assert chunk.ids.tolist() == [START, *ids, END]
    first, second = chunks_of(words(*ids, 85))
    assert first.ids.tolist() == [START, *ids, END]
    assert second.ids.tolist() == [START, 85] + [END] * 75


def test_a_long_prompt_breaks_after_its_last_comma_within_20_tokens():
    """The chunk is full (75) when the 76th token comes, which is not a comma, and the last comma is at index 60 of
    the chunk (15 from its end, <= 20): the 14 tokens after that comma move to the next chunk, which then goes on
    with the 76th token; the first chunk is padded with end tokens after the comma."""
    before = list(range(10, 70))  # 60 tokens
    after = list(range(100, 114))  # 14 tokens after the comma: 60 + 1 + 14 = 75
    first, second = chunks_of(words(*before, COMMA, *after, 200))
    assert first.ids.tolist() == [START, *before, COMMA] + [END] * 15
    assert second.ids.tolist() == [START, *after, 200] + [END] * 61


def test_a_comma_further_than_20_tokens_back_does_not_move_anything():
    """The last comma at index 50 is 25 tokens from the end of the full chunk: the chunk breaks at 75 exactly."""
    ids = list(range(10, 60)) + [COMMA] + list(range(100, 124))  # 50 + 1 + 24 = 75
    first, second = chunks_of(words(*ids, 200))
    assert first.ids.tolist() == [START, *ids, END]
    assert second.ids.tolist() == [START, 200] + [END] * 75


def test_a_comma_as_the_76th_token_joins_the_next_chunk():
    """A comma arriving at a full chunk is never a reason to move tokens: the chunk ends and the comma starts the
    next one."""
    ids = list(range(10, 85))
    first, second = chunks_of(words(*ids, COMMA, 90))
    assert first.ids.tolist() == [START, *ids, END]
    assert second.ids.tolist() == [START, COMMA, 90] + [END] * 74


def test_moved_tokens_keep_their_weights():
    """Backtracking moves the tokens after the comma with their multipliers."""
    head = [Fragment(words(*range(10, 70), COMMA), 1.0)]  # 61 tokens
    tail = [Fragment(words(*range(100, 114), 200), 1.3)]  # 14 + 1 tokens
    first, second = chunks_of(head + tail)
    assert first.weights.tolist() == [1.0] * 77
    assert second.weights[1:16].tolist() == [1.3] * 15 and second.weights[16:].tolist() == [1.0] * 61


def test_break_ends_the_chunk():
    """BREAK closes the current chunk (padded); two BREAKs in a row make an empty chunk between them; a BREAK at
    the end adds no empty chunk."""
    first, second = chunks_of(f"{words(10)} BREAK {words(11)}")
    assert first.ids.tolist() == [START, 10] + [END] * 75
    assert second.ids.tolist() == [START, 11] + [END] * 75
    assert len(chunks_of(f"{words(10)} BREAK BREAK {words(11)}")) == 3
    assert len(chunks_of(f"{words(10)} BREAK")) == 1


class FakeEmbeddings:
    """Embeddings on the made-up vocabulary: the word w900 calls three vectors (ids 5000..5002), w901 one (6000)."""

    def find(self, ids, position):
        return {900: ([5000, 5001, 5002], 1), 901: ([6000], 1)}.get(ids[position])


def test_an_embedding_takes_its_vectors_places_with_its_fragments_weight():
    (chunk,) = chunks_of(f"{words(10)} ({words(900)}:1.2) {words(901)}", embeddings=FakeEmbeddings())
    assert chunk.ids[:7].tolist() == [START, 10, 5000, 5001, 5002, 6000, END]
    assert chunk.weights[:6].tolist() == pytest.approx([1.0, 1.0, 1.2, 1.2, 1.2, 1.0])


def test_an_embedding_that_does_not_fit_moves_to_the_next_chunk_whole():
    """73 tokens, then a 3-vector embedding: 73 + 3 > 75, so the first chunk ends (padded with 2 end tokens) and the
    embedding starts the second; a 1-vector embedding still fits at 74."""
    ids = list(range(10, 83))  # 73 tokens
    first, second = chunks_of(words(*ids, 900, 11), embeddings=FakeEmbeddings())
    assert first.ids.tolist() == [START, *ids, END, END, END]
    assert second.ids[:6].tolist() == [START, 5000, 5001, 5002, 11, END]
    (single,) = chunks_of(words(*ids, 901, 11), embeddings=FakeEmbeddings())
    assert single.ids.tolist() == [START, *ids, 6000, 11, END]


# -- the weights applied to an encoding ------------------------------------------------------------------------

def test_apply_weights_restores_each_chunks_mean():
    """EmphasisOriginal, by hand in float64: z * w (per position), then * mean(z) / mean(z * w), per chunk; a chunk
    of weights 1 is untouched, bit for bit."""
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2, 77, 8)).astype(np.float32) + np.float32(0.3)
    weights = np.ones((2, 77))
    weights[1, 3:6] = [1.1, 1.5, 0.5]
    got = apply_weights(z, weights)
    np.testing.assert_array_equal(got[0], z[0])
    chunk = z[1].astype(np.float64)
    weighted = chunk * weights[1][:, None]
    expected = weighted * (chunk.mean() / weighted.mean())
    assert np.abs(got[1] - expected).max() <= TOL["emphasis"]
    assert got[1].mean() == pytest.approx(z[1].mean(), rel=1e-5)


def test_match_lengths_pads_the_shorter_with_the_empty_encoding():
    """pad_cond_uncond: the shorter conditioning is extended with the empty prompt's encoding, a chunk at a time."""
    long, short = np.ones((2, 231, 4), np.float32), np.zeros((2, 77, 4), np.float32)
    empty = np.full((1, 77, 4), 7.0, np.float32)
    context, uncond = match_lengths(long, short, empty)
    assert context is long and uncond.shape == (2, 231, 4)
    np.testing.assert_array_equal(uncond[:, :77], short)
    np.testing.assert_array_equal(uncond[:, 77:], np.full((2, 154, 4), 7.0))
    assert match_lengths(short, long, empty)[0].shape == (2, 231, 4)


# -- the prompt encoder on a real tokenizer and a tiny text encoder ----------------------------------------------

@pytest.fixture(scope="module")
def encoder():
    return load_prompt_encoder(str(MODEL))


@pytest.fixture(scope="module")
def sd2_encoder(encoder):
    """The same text encoder behind SD2's tokenizer, which pads with "!" (id 0)."""
    tables = shipped_tokenizer_dir()
    tokenizer = ClipTokenizer(tables / "vocab.json", tables / "merges.txt", pad_token="!")
    assert tokenizer.pad_id == 0 != tokenizer.eos_id
    return PromptEncoder(tokenizer, encoder.text_encoder, encoder.config, encoder.precision)


PLAIN = ["a photograph of an astronaut riding a horse", "", "a cat, sitting on a mat! 東京", "Hello, World: 5pm",
         "a " * 74 + "end"]  # the last is 75 tokens: exactly one chunk


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_plain_prompts_encode_as_before_bit_for_bit(encoder, sd2_encoder, family):
    """Without weights and within 75 tokens, the conditioning is the text encoder's output on diffusers' 77 ids
    (``tokenize``), exactly, for one prompt and for a batch."""
    prompt_encoder = encoder if family == "sd1" else sd2_encoder
    for prompt in PLAIN:
        (chunk,) = prompt_encoder.chunks(prompt)
        assert chunk.ids.tolist() == prompt_encoder.tokenize([prompt])[0].ids.tolist(), prompt
    ids = np.stack([tokenized.ids for tokenized in prompt_encoder.tokenize(PLAIN)])  # (5, 77)
    before = prompt_encoder.text_encoder(ids)  # (5, 77, D)
    np.testing.assert_array_equal(prompt_encoder.encode(PLAIN), before)
    np.testing.assert_array_equal(prompt_encoder.encode([PLAIN[0]]), before[:1])


def test_a_long_prompt_encodes_chunk_by_chunk(encoder):
    """A 120-token prompt is two chunks, each encoded on its own, concatenated along the sequence: (1, 154, D)."""
    prompt = ", ".join(["a red fox in the snow"] * 20)
    chunks = encoder.chunks(prompt)
    assert len(chunks) == 2
    got = encoder.encode([prompt])
    assert got.shape == (1, 154, encoder.config.hidden_size)
    for index, chunk in enumerate(chunks):
        np.testing.assert_array_equal(got[0, 77 * index:77 * (index + 1)], encoder.text_encoder(chunk.ids[None])[0])
    # both chunks break after a comma: the second starts with a word, not in the middle of a phrase
    comma = encoder.tokenizer.comma_id
    first_ids = chunks[0].ids.tolist()
    assert first_ids[first_ids.index(encoder.tokenizer.eos_id) - 1] == comma


def test_a_batch_pads_shorter_prompts_with_empty_chunks(encoder):
    long = "a red fox, " * 30  # 120 tokens: two chunks
    got = encoder.encode([long, "a cat"])
    assert got.shape == (2, 154, encoder.config.hidden_size)
    np.testing.assert_array_equal(got[1, :77], encoder.encode(["a cat"])[0])
    np.testing.assert_array_equal(got[1, 77:], encoder.encode([""])[0])


def test_weights_scale_the_encoding_then_restore_its_mean(encoder):
    """(fox:1.5): the fox token's row of the encoder output times 1.5, then the chunk times mean(z) / mean(z w)."""
    (chunk,) = encoder.chunks("a (fox:1.5) in the snow")
    position = chunk.ids.tolist().index(encoder.tokenizer.fragment_ids("fox")[0])
    assert chunk.weights[position] == 1.5 and chunk.weights.sum() == 76 + 1.5
    z = encoder.text_encoder(chunk.ids[None])[0].astype(np.float64)  # (77, D)
    weighted = z * chunk.weights[:, None]
    expected = weighted * (z.mean() / weighted.mean())
    assert np.abs(encoder.encode(["a (fox:1.5) in the snow"])[0] - expected).max() <= TOL["emphasis"]


def test_unbalanced_brackets_are_read_as_text_with_a_warning(encoder, caplog):
    caplog.set_level(logging.WARNING, logger="sdcli")
    (chunk,) = encoder.chunks("a fox)")
    assert chunk.ids.tolist()[:4] == [encoder.tokenizer.bos_id, *encoder.tokenizer.fragment_ids("a fox)")]
    assert any("')' with no '(' open" in record.getMessage() for record in caplog.records)


def test_chunk_tokens_fill_exactly(encoder):
    assert CHUNK_TOKENS == 75
    assert len(encoder.chunks("a " * 75)) == 1 and len(encoder.chunks("a " * 76)) == 2


def test_generate_with_a_long_prompt_and_a_short_negative(tmp_path):
    """The prompt (two chunks) and the negative prompt (one) run as one guided batch: the negative prompt's
    conditioning is extended with the empty prompt's; --low-memory encodes both, and the empty one, ahead."""
    from click.testing import CliRunner

    from sdcli.cli import main

    long = ", ".join(["a red fox in the snow"] * 20)
    outputs = []
    for extra in ([], ["--low-memory"]):
        output = tmp_path / f"fox{len(extra)}.png"
        result = CliRunner().invoke(main, ["generate", "-m", str(MODEL), "-p", long, "-n", "blurry", "--steps", "2",
                                           "--seed", "1", "-W", "64", "-H", "64", "-o", str(output), *extra])
        assert result.exit_code == 0, result.output
        outputs.append(output.read_bytes())
    assert outputs[0] == outputs[1]


def test_chunking_stops_after_max_chunks():
    """With max_chunks, the chunks stop one past the limit: its presence says the prompt was cut."""
    ids = list(range(10, 310))  # 300 tokens: 4 chunks
    assert len(chunks_of(words(*ids))) == 4
    assert len(chunk_prompt(parse_attention(words(*ids)).fragments, word_ids, SD1_TOKENS, max_chunks=4)) == 4
    assert len(chunk_prompt(parse_attention(words(*ids)).fragments, word_ids, SD1_TOKENS, max_chunks=3)) == 4
    assert len(chunk_prompt(parse_attention(words(*ids)).fragments, word_ids, SD1_TOKENS, max_chunks=2)) == 3


def test_a_ten_megabyte_prompt_costs_what_32_chunks_do(encoder, caplog):
    """2400 tokens are kept (32 chunks) and the rest dropped with a warning; only a window of the text is
    tokenized, so a prompt of megabytes encodes at once; an unclosed "(" still weights what is kept."""
    caplog.set_level(logging.WARNING, logger="sdcli")
    assert len(encoder.chunks("word " * 2400)) == 32 and not caplog.records
    text = "(a red fox in the snow, photograph, " * 300_000  # 10.8 MB
    chunks = encoder.chunks(text)
    assert len(chunks) == 32 and "longer than 2400 tokens" in caplog.records[-1].getMessage()
    assert encoder.encode([text]).shape == (1, 32 * 77, encoder.config.hidden_size)
