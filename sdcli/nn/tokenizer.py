"""CLIP byte-level BPE tokenizer (the one Stable Diffusion 1.x and 2.x use), built on the `tokenizers` library.

It reproduces transformers' ``CLIPTokenizer``: NFC normalisation, runs of whitespace folded to one space, lower
case; a split on CLIP's word pattern; byte-level BPE with the ``</w>`` end-of-word suffix; ``<|startoftext|>``
and ``<|endoftext|>`` recognised as special tokens even inside the text. SD1.5's tables ship with sdcli
(``sdcli/data/clip_tokenizer``, MIT, from OpenAI CLIP), so tokenising needs no download; a model folder's own
``tokenizer/`` tables are used when present.
"""

from __future__ import annotations

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

    ids: np.ndarray  # (77,) int64
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

    def window(self, text: str) -> str:
        """A prefix of ``text`` that tokenizes to the same first tokens as ``text`` and to more than the encoder
        reads, or ``text`` itself when it is short (its whitespace runs folded when it is long).

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
            if len(self._tokenizer.encode(prefix, add_special_tokens=False).ids) > self.max_length:
                return prefix
            length *= 4
        return WHITESPACE_RUN.sub(" ", text)

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
