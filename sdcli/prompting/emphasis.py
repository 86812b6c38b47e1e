"""Attention weights applied to a chunk's encoding, and conditionings of different lengths made to match, as
AUTOMATIC1111's webui does both.

``apply_weights`` is the webui's default emphasis ("Original", ``modules/sd_emphasis.py``): the encoder's output
for a chunk is multiplied, position by position, by the weights, then scaled back to the mean it had before
(the mean over the whole chunk, every position and channel).

``match_lengths`` is the webui's ``pad_cond_uncond``: when the prompt and the negative prompt encode to different
numbers of chunks, the shorter is extended with the encoding of the empty prompt, a chunk at a time, so that both
can run as one batch through the denoiser. (The webui does so with its "Pad prompt/negative prompt" setting on;
by default it calls the denoiser twice instead, each conditioning at its own length.)
"""

from __future__ import annotations

import numpy as np


def apply_weights(z: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """z (k, 77, D) float32, the encodings of k chunks, with weights (k, 77) applied chunk by chunk; a chunk whose
    weights are all 1 is returned exactly as it was."""
    z = np.array(z, dtype=np.float32)  # a copy: (k, 77, D)
    for index, chunk_weights in enumerate(np.asarray(weights)):
        if np.all(chunk_weights == 1.0):
            continue
        chunk = z[index]  # (77, D)
        original_mean = chunk.mean(dtype=np.float32)
        chunk *= chunk_weights.astype(np.float32)[:, None]  # (77, D) * (77, 1)
        chunk *= original_mean / chunk.mean(dtype=np.float32)
    return z


def match_lengths(context: np.ndarray, uncond_context: np.ndarray,
                  empty: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(context, uncond_context), both (B, S, D), the shorter along S extended with ``empty`` (1, s, D), the
    encoding of the empty prompt, repeated until both have the same length."""
    longest = max(context.shape[1], uncond_context.shape[1])

    def extend(array: np.ndarray) -> np.ndarray:
        missing = longest - array.shape[1]
        if missing == 0:
            return array
        if missing % empty.shape[1]:
            raise ValueError(f"cannot extend a conditioning of {array.shape[1]} tokens to {longest} with chunks of "
                             f"{empty.shape[1]}")
        repeats = missing // empty.shape[1]
        padding = np.broadcast_to(empty, (array.shape[0], empty.shape[1], empty.shape[2]))  # (B, s, D)
        return np.concatenate([array, *[padding] * repeats], axis=1)  # (B, longest, D)

    return extend(context), extend(uncond_context)
