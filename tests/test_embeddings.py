"""Textual-inversion embedding files: the layouts read, the names they are called by, the refusals (one line,
nothing written), and where their vectors go in a prompt. No torch: the model is the golden test's tiny
checkpoint (a 4-wide text encoder); parity with diffusers is in test_textual_inversion.py."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import sdcli
from data_paths import TEST_DATA
from sdcli.cli import main
from sdcli.errors import EmbeddingError, SdcliError
from sdcli.io.embeddings import read_embedding, read_embeddings
from sdcli.io.safetensors import save_file
from sdcli.prompting.embeddings import EmbeddingVocabulary

MODEL = TEST_DATA / "golden" / "tiny-sd1"
WIDTH = 4  # the golden model's text encoder
VECTORS = np.arange(2 * WIDTH, dtype=np.float32).reshape(2, WIDTH) / 8 - 0.4  # (2, 4)


def write(path, tensors):
    save_file(path, tensors)
    return path


def pickle_file(path):
    """A .pt beside ``path``: refused by its suffix, never opened."""
    path = path.with_suffix(".pt")
    path.write_bytes(b"\x80\x02}q\x00.")
    return path


@pytest.mark.parametrize("key", ["emb_params", "string_to_param.*", "*"])
def test_automatic1111_layouts_are_named_by_the_file(tmp_path, key):
    embedding = read_embedding(write(tmp_path / "my-style.safetensors", {key: VECTORS}))
    assert embedding.name == "my-style" and embedding.width == WIDTH
    np.testing.assert_array_equal(embedding.vectors, VECTORS)


def test_a1111_layout_keeps_its_param_beside_string_to_token(tmp_path):
    tensors = {"string_to_param.*": VECTORS, "string_to_token.*": np.array([265], dtype=np.int64)}
    assert read_embedding(write(tmp_path / "style.safetensors", tensors)).name == "style"


def test_diffusers_layout_is_named_by_its_token(tmp_path):
    single = read_embedding(write(tmp_path / "learned_embeds.safetensors", {"<cat-toy>": VECTORS[0]}))
    assert single.name == "<cat-toy>" and single.vectors.shape == (1, WIDTH)
    multi = read_embedding(write(tmp_path / "multi.safetensors", {"<two>": VECTORS.astype(np.float16)}))
    assert multi.name == "<two>" and multi.vectors.dtype == np.float32
    np.testing.assert_array_equal(multi.vectors, VECTORS.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("name, make, words", [
    ("sdxl", lambda p: write(p, {"clip_l": np.zeros((2, 768), np.float32), "clip_g": np.zeros((2, 1280), np.float32)}),
     ["SDXL", "clip_l 768 wide", "clip_g 1280 wide"]),
    ("pickle", pickle_file,
     ["pickle", "sdcli convert", "--key string_to_param"]),
    ("lora", lambda p: write(p, {"lora_unet_a.lora_down.weight": np.zeros((1, 4), np.float32),
                                 "lora_unet_a.lora_up.weight": np.zeros((4, 1), np.float32)}),
     ["not a textual-inversion embedding", "lora_unet_a.lora_down.weight"]),
    ("empty", lambda p: write(p, {}), ["not a textual-inversion embedding", "none"]),
    ("ints", lambda p: write(p, {"emb_params": np.zeros((2, 4), np.int32)}), ["float vectors"]),
    ("too many", lambda p: write(p, {"emb_params": np.zeros((76, 4), np.float32)}), ["76 vectors"]),
    ("not finite", lambda p: write(p, {"emb_params": np.full((1, 4), np.nan, np.float32)}), ["not finite"]),
    ("missing", lambda p: p, ["no such embedding file"]),
])
def test_bad_embedding_files_are_one_line_errors(tmp_path, name, make, words):
    path = make(tmp_path / f"{name.replace(' ', '-')}.safetensors")
    with pytest.raises(SdcliError) as caught:
        read_embedding(path)
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_folders_skip_pickles_and_refuse_duplicate_names(tmp_path):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    write(folder / "b.safetensors", {"emb_params": VECTORS})
    write(folder / "a.safetensors", {"emb_params": VECTORS[:1]})
    (folder / "old.pt").write_bytes(b"not read")
    found = read_embeddings((), [folder])
    assert [embedding.name for embedding in found] == ["a", "b"] and all(e.from_folder for e in found)
    with pytest.raises(EmbeddingError, match="two embeddings are named 'a'"):
        read_embeddings([folder / "a.safetensors"], [folder])
    with pytest.raises(EmbeddingError, match="no such embeddings folder"):
        read_embeddings((), [tmp_path / "nowhere"])


def test_a_damaged_file_in_a_folder_is_skipped_with_a_warning(tmp_path, caplog):
    """One unreadable download in an embeddings folder (the default one is read by every run) is skipped, as the
    webui skips it; the same file named with --embedding is refused."""
    folder = tmp_path / "embeddings"
    folder.mkdir()
    write(folder / "good.safetensors", {"emb_params": VECTORS})
    (folder / "damaged.safetensors").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    write(folder / "other.safetensors", {"a": VECTORS, "b": VECTORS})  # no recognisable layout
    with caplog.at_level(logging.WARNING, logger="sdcli"):
        found = read_embeddings((), [folder])
    assert [embedding.name for embedding in found] == ["good"]
    skipped = [record.getMessage() for record in caplog.records if "skipped an embedding" in record.getMessage()]
    assert len(skipped) == 2 and any("damaged.safetensors" in m for m in skipped)
    with pytest.raises(SdcliError, match="damaged.safetensors"):
        read_embeddings([folder / "damaged.safetensors"])


def test_default_folder_is_under_the_weights_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SDCLI_WEIGHTS", str(tmp_path))
    assert sdcli.embedding_folders() == []
    (tmp_path / "embeddings").mkdir()
    assert sdcli.embedding_folders() == [tmp_path / "embeddings"]
    assert sdcli.embedding_folders(["mine"]) == [Path("mine")]  # given folders replace the default


def test_the_width_must_fit_the_text_encoder(tmp_path):
    """A file given by name is refused, naming both widths; one found in a folder is skipped."""
    wide = read_embedding(write(tmp_path / "wide.safetensors", {"emb_params": np.zeros((1, 1024), np.float32)}))
    with pytest.raises(EmbeddingError, match="1024 wide, and this model's text encoder is 768 wide"):
        EmbeddingVocabulary([wide], lambda text: [1], 49408, 768)
    skipped = read_embeddings((), [tmp_path])
    assert len(EmbeddingVocabulary(skipped, lambda text: [1], 49408, 768)) == 0


def test_names_are_found_by_their_tokens_the_longest_first(tmp_path):
    """Vectors get ids after the vocabulary in order; where two names start alike the longer wins."""
    short = sdcli.TextualInversion("w1", VECTORS[:1])
    long = sdcli.TextualInversion("w1 w2", VECTORS)
    vocabulary = EmbeddingVocabulary([short, long], lambda text: [int(w[1:]) for w in text.split()], 100, WIDTH)
    np.testing.assert_array_equal(vocabulary.vectors, np.concatenate([VECTORS[:1], VECTORS]))
    assert vocabulary.find([1, 2, 3], 0) == ([101, 102], 2)
    assert vocabulary.find([1, 3], 0) == ([100], 1)
    assert vocabulary.find([3, 1], 0) is None


@pytest.fixture(scope="module")
def style_file(tmp_path_factory):
    return write(tmp_path_factory.mktemp("embeddings") / "mystyle.safetensors", {"emb_params": VECTORS})


def test_an_embedding_stands_where_its_name_is(style_file):
    """The name's tokens become the ids of its vectors, which the text encoder reads from the added rows."""
    encoder = sdcli.load_prompt_encoder(str(MODEL), embeddings=[style_file])
    (chunk,) = encoder.chunks("a (mystyle:1.2) cat")
    vocab_size = encoder.config.vocab_size
    ids = chunk.ids.tolist()
    cat = encoder.tokenizer.fragment_ids("cat")
    assert ids[:6] == [encoder.tokenizer.bos_id, *encoder.tokenizer.fragment_ids("a"), vocab_size, vocab_size + 1,
                       *cat, encoder.tokenizer.eos_id]
    assert chunk.weights[2:4].tolist() == [1.2, 1.2]
    rows = encoder.text_encoder.token_vectors(chunk.ids[None], encoder.embeddings.vectors)[0]  # (77, 4)
    np.testing.assert_array_equal(rows[2:4], VECTORS)
    np.testing.assert_array_equal(rows[4], encoder.text_encoder.token_embedding(np.array(cat))[0])
    plain = sdcli.load_prompt_encoder(str(MODEL))
    assert not np.array_equal(encoder.encode(["a mystyle cat"]), plain.encode(["a mystyle cat"]))
    np.testing.assert_array_equal(encoder.encode(["a dog"]), plain.encode(["a dog"]))


def generate(tmp_path, *args):
    output = tmp_path / "out.png"
    result = CliRunner().invoke(main, ["generate", "-m", str(MODEL), "-p", "a mystyle cat", "-n", "mystyle",
                                       "--steps", "2", "-W", "64", "-H", "64", "--seed", "3", "-o", str(output),
                                       *map(str, args)])
    return result, output


def test_generate_with_an_embedding(tmp_path, style_file):
    result, output = generate(tmp_path, "--embedding", style_file)
    assert result.exit_code == 0, result.output
    with_embedding = output.read_bytes()
    output.unlink()
    result, output = generate(tmp_path, "--embedding-dir", style_file.parent)
    assert result.exit_code == 0 and output.read_bytes() == with_embedding
    output.unlink()
    assert generate(tmp_path)[0].exit_code == 0 and output.read_bytes() != with_embedding


@pytest.mark.parametrize("option, make, words", [
    ("--embedding", lambda p: pickle_file(p / "x"), ["pickle", "sdcli convert"]),
    ("--embedding", lambda p: write(p / "wide.safetensors", {"emb_params": np.zeros((1, 768), np.float32)}),
     ["768 wide", "4 wide"]),
    ("--embedding", lambda p: write(p / "lora.safetensors", {"a": VECTORS, "b": VECTORS}),
     ["not a textual-inversion embedding"]),
    ("--embedding-dir", lambda p: p / "nowhere", ["no such embeddings folder"]),
])
def test_bad_embeddings_on_the_command_line(tmp_path, option, make, words):
    result, output = generate(tmp_path, option, make(tmp_path))
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for word in words:
        assert word in lines[0], lines[0]
    assert not output.exists()


def test_a_webui_pickle_converts_with_the_command_the_refusal_gives(tmp_path, torch):
    """The refusal's command, run: AUTOMATIC1111's .pt layout (string_to_param, string_to_token, a name, a step)
    becomes a safetensors file of one tensor, '*', read under the file's name."""
    import shlex

    vectors = torch.randn(2, WIDTH)
    source = tmp_path / "webui-style.pt"
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": {"*": torch.nn.Parameter(vectors)},
                "name": "webui-style", "step": 10, "sd_checkpoint_name": "v1-5"}, source)
    with pytest.raises(EmbeddingError) as caught:
        read_embedding(source)
    command = str(caught.value).split("Convert it once with: ")[1].split(" (")[0]
    arguments = shlex.split(command)
    assert arguments[:2] == ["sdcli", "convert"]
    result = CliRunner().invoke(main, arguments[1:])
    assert result.exit_code == 0, result.output
    embedding = read_embedding(tmp_path / "webui-style.safetensors")
    assert embedding.name == "webui-style"
    np.testing.assert_array_equal(embedding.vectors, vectors.detach().numpy())
