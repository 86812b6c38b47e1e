"""Prompts as AUTOMATIC1111's stable-diffusion-webui reads them: attention weights, BREAK, prompts longer than the
text encoder's 77 tokens, and textual-inversion embeddings placed in the token stream.

    prompt --syntax.parse_attention--> fragments [(text, weight)] and BREAK markers
           --chunks.chunk_prompt--> chunks of 75 tokens (+ start and end): ids (77,) and weights (77,)
           --text encoder, each chunk--> (1, 77, D) --emphasis.apply_weights--> --concatenate--> (1, 77 k, D)

The three steps follow the webui's ``modules/prompt_parser.py`` (``parse_prompt_attention``),
``modules/sd_hijack_clip.py`` (``tokenize_line``, ``process_tokens``) and ``modules/sd_emphasis.py``
(``EmphasisOriginal``); each module cites the rules it reproduces.
"""

from .chunks import CHUNK_TOKENS, ChunkTokens, PromptChunk, chunk_prompt
from .emphasis import apply_weights, match_lengths
from .syntax import Fragment, ParsedPrompt, parse_attention

__all__ = ["CHUNK_TOKENS", "ChunkTokens", "Fragment", "ParsedPrompt", "PromptChunk", "apply_weights", "chunk_prompt",
           "match_lengths", "parse_attention"]
