"""Textual-inversion embeddings as extra tokens of a text encoder.

Each vector gets a token id after the tokenizer's vocabulary (V, V + 1, ...), as diffusers'
``load_textual_inversion`` appends rows to the token-embedding table (``resize_token_embeddings``); the text
encoder reads those ids from :attr:`EmbeddingVocabulary.vectors`. An embedding is found in a prompt as the
webui finds it (``EmbeddingDatabase.find_embedding_at_position``): its name is tokenized, and wherever the
prompt's tokens continue with exactly those tokens, the name stands for the embedding's vectors. Where two names
start at the same token the longer wins.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np

from ..errors import EmbeddingError
from ..io.embeddings import TextualInversion

log = logging.getLogger("sdcli")


class EmbeddingVocabulary:
    """The embeddings a prompt encoder knows: their vectors as token ids ``first_id`` onwards, and their names as
    token runs (an :class:`~sdcli.prompting.chunks.EmbeddingLookup`)."""

    def __init__(self, embeddings: Sequence[TextualInversion], tokenize: Callable[[str], list[int]], first_id: int,
                 width: int):
        kept: list[TextualInversion] = []
        for embedding in embeddings:
            twin = next((other for other in kept if other.name == embedding.name), None)
            if twin is not None:
                raise EmbeddingError(f"two embeddings are named {embedding.name!r}: {twin.path} and {embedding.path}")
            if embedding.width == width:
                kept.append(embedding)
                continue
            message = (f"{embedding.path or embedding.name}: the embedding is {embedding.width} wide, and this "
                       f"model's text encoder is {width} wide (SD 1.x: 768, SD 2.x: 1024)")
            if not embedding.from_folder:
                raise EmbeddingError(message)
            log.warning("skipped %s", message)
        self.embeddings = kept
        self.first_id = first_id
        self.vectors = (np.concatenate([embedding.vectors for embedding in kept]) if kept
                        else np.zeros((0, width), dtype=np.float32))  # (M, D)
        self._names: dict[int, list[tuple[tuple[int, ...], list[int]]]] = {}  # first name token -> candidates
        next_id = first_id
        for embedding in kept:
            vector_ids = list(range(next_id, next_id + len(embedding.vectors)))
            next_id += len(vector_ids)
            name_ids = tuple(tokenize(embedding.name))
            if not name_ids:
                log.warning("the embedding %r has a name without tokens: it cannot be called", embedding.name)
                continue
            self._names.setdefault(name_ids[0], []).append((name_ids, vector_ids))
        for candidates in self._names.values():
            candidates.sort(key=lambda candidate: len(candidate[0]), reverse=True)

    def __len__(self) -> int:
        return len(self.embeddings)

    def find(self, ids: Sequence[int], position: int) -> tuple[list[int], int] | None:
        """The vector ids of the embedding whose name's tokens start at ``ids[position]`` (the longest name), and
        the name's length in tokens; None where no name starts."""
        for name_ids, vector_ids in self._names.get(ids[position], ()):
            if tuple(ids[position:position + len(name_ids)]) == name_ids:
                return vector_ids, len(name_ids)
        return None
