"""CLIP byte-level BPE tokenizer (the one Stable Diffusion 1.x and 2.x use), built on the `tokenizers` library.

It reproduces transformers' ``CLIPTokenizer``: NFC normalisation, runs of whitespace folded to one space, lower
case; a split on CLIP's word pattern; byte-level BPE with the ``</w>`` end-of-word suffix; ``<|startoftext|>``
and ``<|endoftext|>`` recognised as special tokens even inside the text. SD1.5's tables ship with sdcli
(``sdcli/data/clip_tokenizer``, MIT, from OpenAI CLIP), so tokenising needs no download; a model folder's own
``tokenizer/`` tables are used when present.

The T5 tokenizer (:class:`T5Tokenizer`, UMT5's for Wan2.1) reads a model's own ``tokenizer/tokenizer.json`` (a
SentencePiece Unigram model converted for the `tokenizers` library) and reproduces transformers'
``T5TokenizerFast``: the file's normalizer, pre-tokenizer and model as they are, ``</s>`` appended, truncation that
keeps ``</s>`` last, padding with ``<pad>``. :func:`clean_prompt` is the text cleaning diffusers' Wan pipeline
applies before it.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

from ..errors import CheckpointError

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MAX_LENGTH = 77
# CLIP's word pattern: the special tokens, English contractions, runs of letters, single digits, runs of other symbols.
WORD_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


# Prompts longer than this many characters are cut before tokenizing (ClipTokenizer.window); 77 tokens take
# about 400 characters of English.
WINDOW_CHARACTERS = 2048
CUT_AFTER = frozenset(" \t\n\r\f\v0123456789")
# Two or more of the characters the normaliser folds into one space: Unicode White_Space, which is Python's
# str.isspace() less the separators U+001C..U+001F (CLIP keeps those as symbols). Folding them ahead changes no
# token (NFC composes none of them with a neighbour), and keeps a prompt of mostly whitespace cheap to window.
WHITESPACE_RUN = re.compile("[ \t\n\v\f\r\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]{2,}")


def _cut_point(text: str, length: int) -> int:
    """The end of a prefix of ``text`` of at most ``length`` characters that ends just after an ASCII whitespace
    or digit, searched in its second half; ``length`` where there is none."""
    for index in range(length - 1, length // 2 - 1, -1):
        if text[index] in CUT_AFTER:
            return index + 1
    return length


def shipped_tokenizer_dir() -> Path:
    """The SD1.x CLIP tables that ship inside the package."""
    return Path(str(resources.files("sdcli") / "data" / "clip_tokenizer"))


@dataclass(frozen=True)
class Tokenized:
    """One prompt's token ids: ``ids`` padded/truncated to ``max_length``; ``length`` counts BOS/EOS too."""

    ids: np.ndarray  # (max_length,) int64: 77 for CLIP, 512 for T5
    length: int  # tokens before padding, including BOS and EOS, at most max_length
    truncated: int  # prompt tokens dropped to fit


class ClipTokenizer:
    """Turns prompts into the (B, 77) id arrays a CLIP text encoder reads."""

    def __init__(self, vocab_file: Path, merges_file: Path, pad_token: str = EOS_TOKEN,
                 max_length: int = MAX_LENGTH):
        try:
            vocab = json.loads(Path(vocab_file).read_text(encoding="utf-8"))
            merge_lines = Path(merges_file).read_text(encoding="utf-8").splitlines()
        except (OSError, ValueError) as error:
            raise CheckpointError(f"cannot read the CLIP tokenizer tables: {error}") from None
        merges = [tuple(line.split()) for line in merge_lines[1:] if line.strip()]  # line 0 is '#version: 0.2'
        for token in (BOS_TOKEN, EOS_TOKEN, pad_token):
            if token not in vocab:
                raise CheckpointError(f"{vocab_file}: the token {token!r} is not in the vocabulary")
        model = BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                    fuse_unk=False, unk_token=EOS_TOKEN)
        tokenizer = Tokenizer(model)
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        # transformers registers bos, eos and pad as special tokens: a literal one in the prompt becomes its id.
        # With SD2's pad token '!' that turns every '!' into id 0 (not '!</w>'), which is what SD2 pipelines see.
        tokenizer.add_special_tokens(list(dict.fromkeys([BOS_TOKEN, EOS_TOKEN, pad_token])))
        self._tokenizer = tokenizer
        self.bos_id = vocab[BOS_TOKEN]
        self.eos_id = vocab[EOS_TOKEN]
        self.pad_id = vocab[pad_token]
        self.max_length = max_length

    @classmethod
    def from_folder(cls, folder: Path | None = None, default_pad_token: str = EOS_TOKEN) -> "ClipTokenizer":
        """Load ``vocab.json``/``merges.txt`` from ``folder`` (a model's ``tokenizer/``), or the shipped tables.

        The pad token comes from the folder's ``special_tokens_map.json`` (SD1: ``<|endoftext|>``, SD2: ``!``),
        else ``default_pad_token``.
        """
        if folder is None or not (Path(folder) / "vocab.json").is_file():
            tables = shipped_tokenizer_dir()
        else:
            tables = Path(folder)
        pad_token = _pad_token_of(Path(folder) if folder is not None else tables) or default_pad_token
        return cls(tables / "vocab.json", tables / "merges.txt", pad_token=pad_token)

    def window(self, text: str, tokens: int | None = None) -> str:
        """A prefix of ``text`` that tokenizes to the same first tokens as ``text`` and to more than the encoder
        reads (more than ``tokens``, when given), or ``text`` itself when it is short (its whitespace runs folded
        when it is long).

        Prefixes of ``WINDOW_CHARACTERS``, four times that, ... characters are tried, each cut just after an
        ASCII whitespace or digit: a word never spans either (CLIP's word pattern splits there, and the
        normalisation folds whitespace and lower-cases letter by letter), so every word before the cut keeps its
        tokens. Only a prefix without such a character in its second half is cut inside a word; that word alone
        then has hundreds of tokens, far past the encoder's window. Each prefix has its whitespace runs folded
        before it is tokenized (``WHITESPACE_RUN``), so a prompt that is mostly whitespace, whose prefixes stay
        short of the window until the whole text is taken, is tokenized at the cost of its words alone.
        """
        if len(text) <= WINDOW_CHARACTERS:
            return text
        length = WINDOW_CHARACTERS
        while length < len(text):
            prefix = WHITESPACE_RUN.sub(" ", text[:_cut_point(text, length)])
            if len(self._tokenizer.encode(prefix, add_special_tokens=False).ids) > (tokens or self.max_length):
                return prefix
            length *= 4
        return WHITESPACE_RUN.sub(" ", text)

    @property
    def comma_id(self) -> int | None:
        """The id of a comma ending a word (``,</w>``), where long prompts may break (see sdcli.prompting)."""
        return self._tokenizer.token_to_id(",</w>")

    def fragment_ids(self, text: str, limit: int | None = None) -> list[int]:
        """Token ids of ``text`` without BOS and EOS (a weighted fragment of a prompt): all of them, or, with a
        ``limit``, at least its first ``limit`` (a long text is cut first, see ``window``)."""
        if limit is not None:
            text = self.window(text, limit)
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with BOS and EOS, not padded or truncated."""
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids, self.eos_id]

    def tokenize(self, text: str) -> Tokenized:
        """Ids for the text encoder: truncated to ``max_length`` keeping EOS last, then padded with the pad id.

        A long prompt is cut before it is tokenized (see ``window``), so its length costs nothing: ``truncated``
        then counts the tokens dropped from the part that was tokenized, a lower bound."""
        ids = self.encode(self.window(text))
        truncated = max(0, len(ids) - self.max_length)
        if truncated:
            ids = ids[: self.max_length - 1] + [self.eos_id]
        length = len(ids)
        padded = np.full(self.max_length, self.pad_id, dtype=np.int64)
        padded[:length] = ids
        return Tokenized(ids=padded, length=length, truncated=truncated)

    def __call__(self, prompts: list[str]) -> np.ndarray:
        """(B, 77) int64 ids for a batch of prompts."""
        return np.stack([self.tokenize(p).ids for p in prompts])


def _pad_token_of(folder: Path) -> str | None:
    special = folder / "special_tokens_map.json"
    if not special.is_file():
        return None
    try:
        pad = json.loads(special.read_text(encoding="utf-8")).get("pad_token")
    except ValueError:
        raise CheckpointError(f"{special}: not valid JSON") from None
    if isinstance(pad, dict):
        pad = pad.get("content")
    return pad if isinstance(pad, str) else None


# -- T5 (UMT5) ------------------------------------------------------------------------------------------------------

T5_EOS_TOKEN = "</s>"
T5_PAD_TOKEN = "<pad>"
T5_MAX_LENGTH = 512  # diffusers' WanPipeline max_sequence_length
# Unicode White_Space: what the `regex` module's \s matches in diffusers' whitespace_clean (Python's \s would also
# match U+001C..U+001F, which str.isspace() counts as whitespace and Unicode does not).
UNICODE_WHITESPACE = re.compile("[ \t\n\v\f\r\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")


def clean_prompt(text: str) -> str:
    """diffusers' ``prompt_clean`` for Wan: HTML entities unescaped twice (``&amp;lt;`` -> ``<``), the ends
    stripped, runs of Unicode whitespace folded to one space, the ends stripped again.

    diffusers first runs ``ftfy.fix_text`` (mojibake repair, Unicode normalisation) when the ``ftfy`` package
    happens to be installed; it is not a dependency of diffusers or of sdcli, and sdcli never applies it: a prompt
    that ftfy would change encodes as diffusers encodes it without ftfy.
    """
    text = html.unescape(html.unescape(text)).strip()
    return UNICODE_WHITESPACE.sub(" ", text).strip()


class T5Tokenizer:
    """Turns prompts into the (B, 512) id arrays a T5 / UMT5 encoder reads, from a ``tokenizer.json``.

    The file's normalizer (SentencePiece's precompiled NFKC map), Metaspace pre-tokenizer, Unigram model and
    added tokens (``<pad>``, ``</s>``, ``<unk>``, the ``<extra_id_N>`` sentinels, matched in the text) are used as
    they are, as transformers' ``T5TokenizerFast(tokenizer_file=...)`` uses them. The end token is appended here,
    as the post-processor transformers installs does, whatever post-processor, truncation or padding the file
    names.

    transformers 5's ``AutoTokenizer`` rebuilds a T5 tokenizer from the file's vocabulary instead: it maps a piece
    missing from the vocabulary to id 2 whatever the file's ``unk_id`` (UMT5 has ``<s>`` at 2 and ``<unk>`` at 3),
    keeps only a precompiled normalizer and splits on whitespace before Metaspace (a space next to a literal
    special token then gives no ``▁``). sdcli follows the file, as the tokenizer the model was trained with did;
    prompts of known characters without literal special tokens tokenize the same either way.
    """

    def __init__(self, tokenizer_file: Path, max_length: int = T5_MAX_LENGTH, eos_token: str = T5_EOS_TOKEN,
                 pad_token: str = T5_PAD_TOKEN):
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as error:  # the library raises plain Exceptions for unreadable or malformed files
            raise CheckpointError(f"cannot read the T5 tokenizer {tokenizer_file}: "
                                  f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
        tokenizer.no_truncation()
        tokenizer.no_padding()
        ids = {token: tokenizer.token_to_id(token) for token in (eos_token, pad_token)}
        for token, token_id in ids.items():
            if token_id is None:
                raise CheckpointError(f"{tokenizer_file}: the token {token!r} is not in the vocabulary")
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self._tokenizer = tokenizer
        self.eos_id, self.pad_id = ids[eos_token], ids[pad_token]
        self.max_length = max_length

    @classmethod
    def from_folder(cls, folder: Path, max_length: int = T5_MAX_LENGTH) -> "T5Tokenizer":
        """The ``tokenizer.json`` of ``folder`` (a model's ``tokenizer/``), with the end and pad tokens its
        ``tokenizer_config.json`` names (``</s>`` and ``<pad>`` when it names none)."""
        folder = Path(folder)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise CheckpointError(f"{folder}: no tokenizer.json (the T5 tokenizer sdcli reads; a SentencePiece "
                                  "spiece.model alone is not enough)")
        config = _special_tokens_of(folder / "tokenizer_config.json")
        return cls(tokenizer_file, max_length, eos_token=config.get("eos_token") or T5_EOS_TOKEN,
                   pad_token=config.get("pad_token") or T5_PAD_TOKEN)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with the end token, not padded or truncated."""
        return [*self._tokenizer.encode(text, add_special_tokens=False).ids, self.eos_id]

    def tokenize(self, text: str) -> Tokenized:
        """Ids for the encoder: truncated to ``max_length`` keeping the end token last, then padded with the pad
        id (``length`` is the count before padding: the positions the attention mask keeps)."""
        ids = self.encode(text)
        truncated = max(0, len(ids) - self.max_length)
        if truncated:
            ids = ids[: self.max_length - 1] + [self.eos_id]
        padded = np.full(self.max_length, self.pad_id, dtype=np.int64)
        padded[: len(ids)] = ids
        return Tokenized(ids=padded, length=len(ids), truncated=truncated)

    def __call__(self, prompts: list[str]) -> np.ndarray:
        """(B, max_length) int64 ids for a batch of prompts (not cleaned: see :func:`clean_prompt`)."""
        return np.stack([self.tokenize(p).ids for p in prompts])


def _special_tokens_of(config_file: Path) -> dict[str, str]:
    """The eos and pad tokens a ``tokenizer_config.json`` names (plain strings or AddedToken dicts)."""
    if not config_file.is_file():
        return {}
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise CheckpointError(f"{config_file}: not valid JSON") from None
    found = {}
    for key in ("eos_token", "pad_token"):
        value = data.get(key) if isinstance(data, dict) else None
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            found[key] = value
    return found
