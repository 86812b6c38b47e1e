"""The T5 / UMT5 encoder against transformers' T5EncoderModel and UMT5EncoderModel on random weights (small
configs over 200 tokens with padding, and UMT5-XXL's full widths with two layers), the T5 tokenizer against
transformers' T5TokenizerFast on a synthetic SentencePiece-style tokenizer.json, and Wan's prompt encoding
against diffusers' ``WanPipeline._get_t5_prompt_embeds``."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch/transformers are the T5 reference")
transformers = pytest.importorskip("transformers")

import reference_models as ref  # noqa: E402
import wan_models  # noqa: E402
from opaque_backend import opaque_ops  # noqa: E402

from sdcli.errors import CheckpointError, SdcliError  # noqa: E402
from sdcli.io.checkpoint import FolderSource  # noqa: E402
from sdcli.io.safetensors import SafetensorsFile  # noqa: E402
from sdcli.io.weights import ArraySource, load_network  # noqa: E402
from sdcli.nn import t5 as t5_module  # noqa: E402
from sdcli.nn.t5 import (T5Config, T5Encoder, T5PromptEncoder, encode_prompts,  # noqa: E402
                         relative_position_buckets, tied_embedding)
from sdcli.nn.tokenizer import T5Tokenizer, clean_prompt  # noqa: E402
from sdcli.ops import get_ops  # noqa: E402

TOL = {
    # max |ours - transformers|, float32 on both sides (the bound). Measured 1e-6 to 3e-6 on outputs of
    # magnitude ~4: a bias taken from the wrong bucket, a missing epsilon or a scaled score shows far above it.
    "fp32": 1e-4,
    # bf16 products (activations rounded to bf16, float32 sums) against the reference run in float32 on the same
    # rounded weights, as max |diff| / max |reference|: a few bf16 ulps (2^-8), as for the other networks.
    "bf16": 4 * 2**-8,
}
SMALL = dict(vocab_size=420, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4, relative_attention_num_buckets=32,
             relative_attention_max_distance=128, dropout_rate=0.0)
# google/umt5-xxl's encoder widths (Wan2.1's text_encoder/config.json), two layers and a small vocabulary
XXL = dict(vocab_size=300, d_model=4096, d_kv=64, d_ff=10240, num_layers=2, num_heads=64,
           relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
           dropout_rate=0.0)
WAN_TEXT_ENCODER_CONFIG = {
    "architectures": ["UMT5EncoderModel"], "classifier_dropout": 0.0, "d_ff": 10240, "d_kv": 64, "d_model": 4096,
    "decoder_start_token_id": 0, "dense_act_fn": "gelu_new", "dropout_rate": 0.1, "eos_token_id": 1,
    "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0, "is_encoder_decoder": True, "is_gated_act": True,
    "layer_norm_epsilon": 1e-06, "model_type": "umt5", "num_decoder_layers": 24, "num_heads": 64, "num_layers": 24,
    "output_past": True, "pad_token_id": 0, "relative_attention_max_distance": 128,
    "relative_attention_num_buckets": 32, "scalable_attention": True, "tie_word_embeddings": False,
    "torch_dtype": "float32", "use_cache": True, "vocab_size": 256384}


def max_abs(ours: np.ndarray, expected: np.ndarray) -> float:
    assert ours.shape == expected.shape and ours.dtype == np.float32
    return float(np.max(np.abs(ours.astype(np.float64) - expected)))


def random_model(kind: str, config: dict, seed: int = 0):
    """transformers' encoder with its own random initialisation, the layer-norm scales randomised too."""
    cls, config_cls = {"umt5": (transformers.UMT5EncoderModel, transformers.UMT5Config),
                       "t5": (transformers.T5EncoderModel, transformers.T5Config)}[kind]
    torch.manual_seed(seed)
    model = cls(config_cls(**config)).eval()
    ref.randomise_norms(model, torch.Generator().manual_seed(seed + 1), is_norm=lambda name: "layer_norm" in name)
    return model


def state_of(model, keep: tuple[str, ...] = ("shared.weight",)) -> dict[str, np.ndarray]:
    """The model's tensors (float32 views), the tied embedding under the names in ``keep``."""
    state = {name: tensor.detach().numpy() for name, tensor in model.state_dict().items()}
    for name in ("shared.weight", "encoder.embed_tokens.weight"):
        if name not in keep:
            del state[name]
    return state


def reference_output(model, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids),
                     attention_mask=None if mask is None else torch.from_numpy(mask)).last_hidden_state.numpy()


def sdcli_config(kind: str, config: dict) -> T5Config:
    return T5Config.from_dict({"model_type": kind, **config})


def load(source, config: T5Config, ops, precision: str = "fp32", stream: bool = False) -> T5Encoder:
    """The encoder over a tensor source, strictly, the token embedding read under the name the source has."""
    embedding, _ = tied_embedding(source.keys())
    return load_network(lambda params: T5Encoder(params, config, embedding), source, ops, precision, stream=stream)


def build(kind: str, config: dict, state, backend: str = "cpu", precision: str = "fp32", stream: bool = False):
    ops = opaque_ops if backend == "opaque" else get_ops(backend)
    return load(ArraySource(state), sdcli_config(kind, config), ops, precision, stream=stream)


def run(encoder, ids, mask=None) -> np.ndarray:
    return encoder.ops.to_host(encoder(ids, mask))


def padded_batch(vocab: int, length: int, real: tuple[int, ...], seed: int = 0):
    """(B, length) random ids and the attention mask keeping the first ``real[b]`` tokens of row b."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (len(real), length))
    mask = (np.arange(length)[None, :] < np.array(real)[:, None]).astype(np.int64)
    ids[mask == 0] = 0
    return ids, mask


# -- the relative position buckets and the config -----------------------------------------------------------------

@pytest.mark.parametrize("buckets, distance", [(32, 128), (32, 20), (64, 256), (8, 16), (16, 5)])
def test_buckets_match_transformers(buckets, distance):
    """Every relative position of a 600-token sequence, in float32 as transformers takes the logarithm."""
    config = transformers.UMT5Config(relative_attention_num_buckets=buckets, relative_attention_max_distance=distance,
                                     d_model=8, d_kv=8, num_heads=1)
    attention = transformers.models.umt5.modeling_umt5.UMT5Attention(config, has_relative_attention_bias=True)
    length = 600
    relative = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    expected = attention._relative_position_bucket(relative).numpy()
    np.testing.assert_array_equal(relative_position_buckets(length, buckets, distance), expected)


def test_config_of_wan():
    config = T5Config.from_dict(WAN_TEXT_ENCODER_CONFIG)
    assert (config.model_type, config.d_model, config.num_layers, config.num_heads, config.d_kv, config.d_ff,
            config.vocab_size, config.gated) == ("umt5", 4096, 24, 64, 64, 10240, 256384, True)
    assert all(config.has_relative_bias(layer) for layer in range(24))


@pytest.mark.parametrize("kind, reference", [("t5", "T5Config"), ("umt5", "UMT5Config")])
def test_config_defaults_are_transformers(kind, reference):
    expected = getattr(transformers, reference)()
    config = T5Config.from_dict({"model_type": kind})
    for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets",
                 "relative_attention_max_distance", "layer_norm_epsilon", "feed_forward_proj"):
        assert getattr(config, name) == getattr(expected, name), name
    assert config.has_relative_bias(1) == (kind == "umt5")


@pytest.mark.parametrize("change, words", [
    ({"model_type": "mt5"}, "model_type 'mt5'"),
    ({"feed_forward_proj": "gated-silu"}, "feed_forward_proj 'gated-silu'"),
    ({"num_heads": 0}, "num_heads"),
    ({"d_model": 4.5}, "d_model"),
    ({"relative_attention_num_buckets": 2}, "relative_attention_num_buckets"),
])
def test_config_refusals_are_one_line(change, words):
    with pytest.raises(CheckpointError) as error:
        T5Config.from_dict({**WAN_TEXT_ENCODER_CONFIG, **change}, "text_encoder/config.json")
    message = str(error.value)
    assert words in message and "\n" not in message and message.startswith("text_encoder/config.json")


# -- the encoder against transformers -----------------------------------------------------------------------------

@pytest.fixture(scope="module", params=[("umt5", "gated-gelu"), ("t5", "gated-gelu"), ("t5", "relu"),
                                        ("umt5", "relu")], ids=lambda p: "-".join(p))
def small(request):
    kind, feed_forward = request.param
    config = {**SMALL, "feed_forward_proj": feed_forward}
    model = random_model(kind, config, seed=len(kind) + len(feed_forward))
    ids, mask = padded_batch(SMALL["vocab_size"], 200, (200, 143))  # distances past max_distance, padding
    return SimpleNamespace(kind=kind, config=config, model=model, state=state_of(model), ids=ids, mask=mask,
                           expected=reference_output(model, ids, mask))


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_small_parity(small, backend):
    """200 tokens (buckets up to the farthest), batch 2, the second row padded: every position, the padded ones
    too (their queries see the real keys, as in transformers)."""
    ours = run(build(small.kind, small.config, small.state, backend), small.ids, small.mask)
    assert max_abs(ours, small.expected) <= TOL["fp32"]


def test_small_parity_unpadded(small):
    ids = small.ids[:1, :77]
    expected = reference_output(small.model, ids)
    assert max_abs(run(build(small.kind, small.config, small.state), ids), expected) <= TOL["fp32"]


def test_opaque_backend_gives_the_numpy_results(small):
    """The encoder keeps its activations in the backend (see tests/opaque_backend.py)."""
    numpy_result = run(build(small.kind, small.config, small.state, "numpy"), small.ids[:, :60], small.mask[:, :60])
    opaque = build(small.kind, small.config, small.state, "opaque")
    assert np.array_equal(numpy_result, run(opaque, small.ids[:, :60], small.mask[:, :60]))


def test_bf16_weights(small):
    """bf16 products against the reference run in float32 on the same bf16-rounded weights."""
    model, state = small.model, small.state
    original = {name: value.clone() for name, value in model.state_dict().items()}
    ref.load_rounded(model, {name: value.numpy() for name, value in original.items()}, "BF16")
    try:
        expected = reference_output(model, small.ids, small.mask)
    finally:
        with torch.no_grad():
            model.load_state_dict(original)
    bits = {name: ref.bf16_bits(value) for name, value in state.items()}
    ours = run(build(small.kind, small.config, bits, "cpu", "bf16"), small.ids, small.mask)
    assert max_abs(ours, expected) <= TOL["bf16"] * float(np.abs(expected).max())


def test_bad_inputs_are_one_line(small):
    encoder = build(small.kind, small.config, small.state, "numpy")
    for ids, mask in [(np.array([1, 2, 3]), None), (np.array([[1, SMALL["vocab_size"]]]), None),
                      (np.array([[1, 2]]), np.array([[0, 0]])), (np.array([[1, 2]]), np.array([[1, 1, 1]]))]:
        with pytest.raises(SdcliError) as error:
            encoder(ids, mask)
        assert "\n" not in str(error.value)


def test_umt5_xxl_widths_two_layers():
    """The real widths (4096, 64 heads of 64, feed-forward 10240) with two layers, each with its own bias table,
    streamed from the arrays, on the cpu backend: fp32, then bf16."""
    model = random_model("umt5", XXL, seed=5)
    state = state_of(model)
    ids, mask = padded_batch(XXL["vocab_size"], 40, (40, 23), seed=5)
    expected = reference_output(model, ids, mask)
    assert max_abs(run(build("umt5", XXL, state, stream=True), ids, mask), expected) <= TOL["fp32"]
    bits = {name: ref.bf16_bits(value) for name, value in state.items()}
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.copy_(parameter.to(torch.bfloat16).float())
    expected = reference_output(model, ids, mask)
    ours = run(build("umt5", XXL, bits, precision="bf16", stream=True), ids, mask)
    assert max_abs(ours, expected) <= TOL["bf16"] * float(np.abs(expected).max())


def test_streamed_embedding_reads_rows_and_drops_pages():
    """A streamed table gives the rows a kept one gives, and lets its file pages go while it reads them (a row
    read maps a 2 MB page: 512 ids spread over UMT5's 2 GB table would hold 1 GB at once)."""
    from sdcli.ops import numpy_ops
    from sdcli.ops.parameter import Parameter, Weight

    table = np.random.default_rng(3).standard_normal((1000, 6)).astype(np.float32)
    ids = np.random.default_rng(4).integers(0, 1000, (3, 150))
    releases = []
    streamed = Parameter(Weight(table, "fp32", release=lambda: releases.append(1), stream=True))
    np.testing.assert_array_equal(numpy_ops.embedding(streamed, ids), table[ids])
    assert len(releases) == -(-ids.size // numpy_ops.STREAMED_ROWS)
    np.testing.assert_array_equal(numpy_ops.embedding(streamed, np.array(7)), table[7])


# -- loading from files -------------------------------------------------------------------------------------------

def folder_source(path) -> FolderSource:
    """A file as a model folder's component is opened, the tied copy of the embedding left unread."""
    file = SafetensorsFile(path)
    return FolderSource([file], str(path), ignored=tied_embedding(file.keys())[1])


@pytest.mark.parametrize("keep", [("shared.weight",), ("encoder.embed_tokens.weight",),
                                  ("shared.weight", "encoder.embed_tokens.weight")],
                         ids=["shared", "embed_tokens", "both"])
def test_loads_either_name_of_the_tied_embedding(small, tmp_path, keep):
    path = tmp_path / "model.safetensors"
    ref.save_tensors(path, state_of(small.model, keep), "F32")
    assert tied_embedding(SafetensorsFile(path).keys()) == (keep[0], list(keep[1:]))
    encoder = load(folder_source(path), sdcli_config(small.kind, small.config), get_ops("cpu"), stream=True)
    assert max_abs(run(encoder, small.ids, small.mask), small.expected) <= TOL["fp32"]


def test_loading_is_strict(small, tmp_path):
    config, ops = sdcli_config(small.kind, small.config), get_ops("numpy")
    state = dict(small.state)
    del state["encoder.final_layer_norm.weight"]
    state["encoder.block.0.layer.0.SelfAttention.q.bias"] = np.zeros(32, np.float32)
    with pytest.raises(CheckpointError) as error:
        load(ArraySource(state), config, ops)
    message = str(error.value)
    assert "missing: encoder.final_layer_norm.weight" in message and "SelfAttention.q.bias" in message
    assert "\n" not in message
    both = {**small.state, "encoder.embed_tokens.weight": small.state["shared.weight"]}
    with pytest.raises(CheckpointError, match="unexpected: encoder.embed_tokens.weight"):
        load(ArraySource(both), config, ops)  # unless the source leaves the tied copy out, as folder_source does
    without = {name: value for name, value in small.state.items() if name != "shared.weight"}
    with pytest.raises(CheckpointError, match="missing: shared.weight"):
        load(ArraySource(without), config, ops)


def test_truncated_shard_is_a_one_line_error(small, tmp_path):
    path = tmp_path / "model-00001-of-00002.safetensors"
    ref.save_tensors(path, small.state, "F32")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(SdcliError) as error:
        load(folder_source(path), sdcli_config(small.kind, small.config), get_ops("cpu"))
    message = str(error.value)
    assert path.name in message and "\n" not in message


# -- the tokenizer ------------------------------------------------------------------------------------------------

CORPUS = ["a photograph of an astronaut riding a horse on the moon", "the quick brown fox jumps over the lazy dog",
          "café au lait, crème brûlée and a naïve façade", "東京 の 夜景 と 富士山", "Hello, World! 123 456 7890",
          "a cat and a dog playing in the garden at sunset, highly detailed, 4k", "Москва зимой, снег"]
PROMPTS = [
    "a photograph of an astronaut riding a horse", "", " ", "   leading and trailing   ", "a  b   c\td\ne",
    "café 🐱 東京!", "Ｈｅｌｌｏ ﬁne ½", "e\u0301 combining", "unknown ∑ ∫ √ ∞ ≠ characters",
    "a&amp;b &lt;tag&gt; &amp;lt;double&amp;gt; &quot;x&quot;", "literal </s> and <extra_id_5> and <pad>",
    "<unk>", "x" * 40, "the lazy dog " * 120, "astronaut riding a horse, " * 200,
    "\u00a0non-breaking\u00a0space\u3000ideographic", "control\x1cchars\x1f",
]


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    """A SentencePiece-style tokenizer.json laid out as UMT5's (tests/wan_models.py), trained on CORPUS."""
    folder = wan_models.write_tokenizer(tmp_path_factory.mktemp("tokenizer"), corpus=CORPUS)
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size() <= SMALL["vocab_size"]
    return folder


@pytest.fixture(scope="module")
def reference_tokenizer(tokenizer_folder):
    return transformers.T5TokenizerFast(tokenizer_file=str(tokenizer_folder / "tokenizer.json"))


def test_tokenizer_matches_t5_tokenizer_fast(tokenizer_folder, reference_tokenizer):
    """Padded and truncated to 512 as diffusers asks for it: the ids, and the mask as the length."""
    ours = T5Tokenizer.from_folder(tokenizer_folder)
    expected = reference_tokenizer(PROMPTS, padding="max_length", max_length=512, truncation=True,
                                   add_special_tokens=True, return_attention_mask=True)
    for prompt, ids, mask in zip(PROMPTS, expected.input_ids, expected.attention_mask):
        tokenized = ours.tokenize(prompt)
        assert tokenized.ids.tolist() == ids, prompt
        assert tokenized.length == sum(mask), prompt
    long = ours.tokenize(PROMPTS[-3])
    assert long.length == 512 and long.ids[-1] == ours.eos_id and long.truncated > 0
    assert ours.tokenize("").ids[:2].tolist() == [1, 0]
    assert 3 in ours.tokenize("unknown ∑ characters").ids  # the file's unk id (UMT5's <unk>), not 2


def test_tokenizer_matches_auto_tokenizer_on_known_text(tokenizer_folder):
    """transformers 5's AutoTokenizer rebuilds the tokenizer (see T5Tokenizer): on cleaned prompts of known
    characters without literal special tokens it agrees."""
    auto = transformers.AutoTokenizer.from_pretrained(str(tokenizer_folder))
    ours = T5Tokenizer.from_folder(tokenizer_folder)
    known = [PROMPTS[index] for index in (0, 1, 2, 3, 4, 12, 13, 14)] + ["café au lait,  東京\u3000の 夜景"]
    for prompt in known:
        prompt = clean_prompt(prompt)
        expected = auto(prompt, padding="max_length", max_length=512, truncation=True).input_ids
        assert ours.tokenize(prompt).ids.tolist() == expected, prompt


def test_load_prompt_encoder_from_files(tokenizer_folder, tmp_path):
    """bf16 weights streamed from a file holding both names of the embedding, and the folder's tokenizer."""
    config = {**SMALL, "feed_forward_proj": "gated-gelu"}
    path = tmp_path / "model.safetensors"
    model = random_model("umt5", config, seed=11)
    ref.save_tensors(path, state_of(model, ("shared.weight", "encoder.embed_tokens.weight")), "BF16")
    source, t5_config = folder_source(path), sdcli_config("umt5", config)
    encoder = T5PromptEncoder(T5Tokenizer.from_folder(tokenizer_folder),
                              load(source, t5_config, get_ops("cpu"), "bf16", stream=True), t5_config, "bf16", source)
    assert encoder.text_encoder.block[1].attention.q.weight.streamed
    embeddings = encoder.encode(["a cat", "a photograph of an astronaut riding a horse"])
    length = encoder.tokenizer.tokenize("a cat").length
    assert embeddings.shape == (2, 512, SMALL["d_model"]) and not embeddings[0, length:].any()
    assert np.abs(embeddings[0, :length]).max(axis=-1).min() > 0
    encoder.release()


def test_tokenizer_refusals(tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        T5Tokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError) as error:
        T5Tokenizer.from_folder(tmp_path)
    assert "\n" not in str(error.value)


def test_clean_prompt_is_diffusers(diffusers):
    from diffusers.pipelines.wan import pipeline_wan

    if pipeline_wan.is_ftfy_available():
        pytest.skip("diffusers applies ftfy when it is installed; sdcli never does")
    for prompt in PROMPTS + ["&amp;amp;", " \u2028x\u0085y\u001cz\u001f ", "\t&nbsp;a&#x20;&#32;b\u00a0"]:
        assert clean_prompt(prompt) == pipeline_wan.prompt_clean(prompt), repr(prompt)


# -- Wan's prompt encoding against diffusers ----------------------------------------------------------------------

def test_encode_prompts_is_diffusers(tokenizer_folder, reference_tokenizer, diffusers, monkeypatch):
    """diffusers' ``_get_t5_prompt_embeds`` (512 tokens, the padding masked, zeros past each prompt) on a random
    UMT5, against the encoder run on each prompt's own tokens; in one pass and in several."""
    from diffusers import WanPipeline

    model = random_model("umt5", {**SMALL, "feed_forward_proj": "gated-gelu"}, seed=9)
    stub = SimpleNamespace(tokenizer=reference_tokenizer, text_encoder=model, _execution_device=torch.device("cpu"))
    prompts = ["a photograph of an astronaut riding a horse", "", "a&amp;b &lt;tag&gt;  café 🐱",
               "astronaut riding a horse, " * 200, "the lazy dog " * 30]
    with torch.no_grad():
        expected = WanPipeline._get_t5_prompt_embeds(stub, prompts, max_sequence_length=512,
                                                     device=torch.device("cpu"), dtype=torch.float32).numpy()
    encoder = build("umt5", {**SMALL, "feed_forward_proj": "gated-gelu"}, state_of(model))
    tokenizer = T5Tokenizer.from_folder(tokenizer_folder)
    ours = encode_prompts(encoder, tokenizer, prompts)
    assert max_abs(ours, expected) <= TOL["fp32"]
    lengths = [tokenizer.tokenize(clean_prompt(p)).length for p in prompts]
    for row, length in enumerate(lengths):
        assert not ours[row, length:].any() and np.abs(ours[row, :length]).max(axis=-1).min() > 0
    monkeypatch.setattr(t5_module, "TOKENS_PER_PASS", 100)  # one prompt per pass
    prompt_encoder = T5PromptEncoder(tokenizer, encoder, encoder.config, "fp32")
    assert max_abs(prompt_encoder.encode(prompts), expected) <= TOL["fp32"]
    assert encode_prompts(encoder, tokenizer, []).shape == (0, 512, SMALL["d_model"])
    opaque = build("umt5", {**SMALL, "feed_forward_proj": "gated-gelu"}, state_of(model), "opaque")
    numpy = build("umt5", {**SMALL, "feed_forward_proj": "gated-gelu"}, state_of(model), "numpy")
    assert np.array_equal(encode_prompts(opaque, tokenizer, prompts[:3]), encode_prompts(numpy, tokenizer, prompts[:3]))
