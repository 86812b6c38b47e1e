"""A weighted prompt -> chunks of 77 token ids for the CLIP text encoder, as AUTOMATIC1111's webui makes them
(``tokenize_line`` and ``process_tokens`` in ``modules/sd_hijack_clip.py``):

- each fragment is tokenized on its own, without start and end tokens; its tokens join the current chunk with the
  fragment's weight;
- a chunk holds 75 prompt tokens. The comma token (``,</w>``) records the position after which the chunk may
  break: when the chunk is full and the next token is not a comma, and the last comma is at most 20 tokens from
  the chunk's end, the tokens after that comma move to the next chunk (the webui's ``comma_padding_backtrack``
  setting, 20 by default);
- a BREAK marker ends the current chunk;
- a textual-inversion embedding whose name's tokens appear in a fragment takes its vectors' places instead, with
  the fragment's weight; a multi-vector embedding that does not fit in what is left of the chunk starts the next
  chunk, whole;
- each chunk is padded to 75 with the end token (weight 1), then framed: [start] + 75 + [end], 77 ids with weight
  1 at both ends. Where the pad token is not the end token (SD2 pads with ``!``, id 0) every id after the chunk's
  first end token becomes the pad id;
- an empty prompt is one chunk (start, then end tokens).

A prompt of at most 75 tokens in one fragment of weight 1 gives exactly the ids diffusers' tokenizer call gives
(``padding="max_length", max_length=77``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .syntax import Fragment

CHUNK_TOKENS = 75  # prompt tokens per chunk: 77 positions less the start and end tokens
COMMA_BACKTRACK = 20  # the webui's comma_padding_backtrack default
# sdcli's limit (the webui has none): 2400 prompt tokens, far past any prompt written by hand, so that a prompt of
# megabytes costs what this many chunks do; the rest is dropped with a warning.
MAX_CHUNKS = 32
# Characters of a prompt read at most, for the same reason: 2400 tokens take about 12000 characters of English.
MAX_PROMPT_CHARACTERS = 100_000


@dataclass(frozen=True)
class ChunkTokens:
    """The ids a chunk is framed and padded with, and the comma's id (None: never break at commas)."""

    start: int
    end: int
    pad: int
    comma: int | None


@dataclass(frozen=True)
class PromptChunk:
    """77 token ids for the text encoder and the weight of each position (1.0 at the start, end and padding)."""

    ids: np.ndarray  # (77,) int64
    weights: np.ndarray  # (77,) float64, the webui's multipliers as written

    @property
    def weighted(self) -> bool:
        return bool(np.any(self.weights != 1.0))


class EmbeddingLookup(Protocol):
    """Where textual-inversion embeddings sit in a run of prompt token ids."""

    def find(self, ids: Sequence[int], position: int) -> tuple[list[int], int] | None:
        """The ids of the vectors of an embedding whose name's tokens start at ``position``, and how many prompt
        tokens the name takes; None when no embedding's name starts there."""


def chunk_prompt(fragments: Sequence[Fragment], tokenize: Callable[[str], list[int]], tokens: ChunkTokens,
                 embeddings: EmbeddingLookup | None = None, max_chunks: int | None = None) -> list[PromptChunk]:
    """The chunks of a parsed prompt (see the module docstring); ``tokenize`` gives a text's ids without start and
    end tokens. With ``max_chunks``, the first ``max_chunks`` chunks and one more when the prompt goes on (the
    caller drops it: its presence says the prompt was cut); ``tokenize`` then needs to give only a fragment's
    first ``max_chunks * CHUNK_TOKENS`` ids."""
    chunks: list[PromptChunk] = []
    ids: list[int] = []  # the current chunk's prompt tokens, at most CHUNK_TOKENS
    weights: list[float] = []
    last_comma = -1  # where the last comma sits in ids; -1: none since the chunk began

    def close_chunk() -> None:
        nonlocal ids, weights, last_comma
        padding = CHUNK_TOKENS - len(ids)
        framed = [tokens.start, *ids, *[tokens.end] * padding, tokens.end]  # (77,)
        framed_weights = [1.0, *weights, *[1.0] * padding, 1.0]
        if tokens.pad != tokens.end:
            first_end = framed.index(tokens.end)
            framed[first_end + 1:] = [tokens.pad] * (len(framed) - first_end - 1)
        chunks.append(PromptChunk(np.array(framed, dtype=np.int64), np.array(framed_weights, dtype=np.float64)))
        ids, weights, last_comma = [], [], -1

    for fragment in fragments:
        if max_chunks is not None and len(chunks) > max_chunks:
            break
        if fragment.is_break:
            close_chunk()
            continue
        fragment_ids = tokenize(fragment.text)
        position = 0
        while position < len(fragment_ids) and (max_chunks is None or len(chunks) <= max_chunks):
            token = fragment_ids[position]
            if token == tokens.comma:
                last_comma = len(ids)
            elif len(ids) == CHUNK_TOKENS and last_comma != -1 and len(ids) - last_comma <= COMMA_BACKTRACK:
                # the chunk is full inside a phrase: end it after its last comma, the phrase moves on whole
                moved, moved_weights = ids[last_comma + 1:], weights[last_comma + 1:]
                ids, weights = ids[:last_comma + 1], weights[:last_comma + 1]
                close_chunk()
                ids, weights = moved, moved_weights
            if len(ids) == CHUNK_TOKENS:
                close_chunk()
            found = embeddings.find(fragment_ids, position) if embeddings is not None else None
            if found is None:
                ids.append(token)
                weights.append(fragment.weight)
                position += 1
                continue
            vector_ids, name_length = found
            if len(ids) + len(vector_ids) > CHUNK_TOKENS:
                close_chunk()
            ids += vector_ids
            weights += [fragment.weight] * len(vector_ids)
            position += name_length
    if (ids or not chunks) and (max_chunks is None or len(chunks) <= max_chunks):
        close_chunk()
    return chunks
