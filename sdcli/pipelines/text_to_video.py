"""Which pipeline makes a model's videos: a video model of its own (Wan2.1, :mod:`sdcli.pipelines.wan`; SkyReels-V2's
diffusion forcing, :mod:`sdcli.pipelines.skyreels`), or an SD 1.x image model animated by an AnimateDiff motion
adapter (:mod:`sdcli.pipelines.video`). All take :class:`~sdcli.pipelines.video.VideoParams` and yield step
records; Wan and AnimateDiff then a :class:`~sdcli.pipelines.video.GeneratedVideo`, SkyReels-V2 a
:class:`~sdcli.pipelines.streaming.ChunkFrames` per window as it is finished."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import SdcliError
from ..families.animatediff import OpenedAdapter
from ..io.checkpoint import Checkpoint
from ..io.embeddings import TextualInversion
from ..io.lora import LoraSpec
from ..models import open_checkpoint
from .skyreels import ARCHITECTURE as SKYREELS, SkyReelsTextToVideo, load_skyreels_pipeline
from .video import GeneratedVideo, TextToVideo, VideoParams, load_animatediff_pipeline
from .wan import WanTextToVideo, load_wan_pipeline

VideoPipeline = TextToVideo | WanTextToVideo | SkyReelsTextToVideo


def load_video_pipeline(model: str | Checkpoint, motion_adapter: str | Path | OpenedAdapter | None = None,
                        precision: str = "fp32", backend: str = "cpu",
                        scheduler_options: dict[str, Any] | None = None,
                        loras: Sequence[LoraSpec] | None = None,
                        low_memory: bool = False,
                        embeddings: Sequence[TextualInversion | str | Path] = ()) -> VideoPipeline:
    """Open ``model`` (a path, preset or repo id; never downloading) and load what text to video needs: a Wan2.1
    or SkyReels-V2 model on its own (:func:`~sdcli.pipelines.wan.load_wan_pipeline`,
    :func:`~sdcli.pipelines.skyreels.load_skyreels_pipeline`; a motion adapter, LoRAs or scheduler options are
    refused), or an SD 1.x model with ``motion_adapter``
    (:func:`~sdcli.pipelines.video.load_animatediff_pipeline`, which says what each argument does there)."""
    checkpoint = model if isinstance(model, Checkpoint) else open_checkpoint(model)
    if checkpoint.model_family.name == "wan":
        title = "SkyReels-V2" if checkpoint.family == SKYREELS else "Wan2.1"
        for given, what in ((motion_adapter, "--motion-adapter"), (loras, "a LoRA"),
                            (scheduler_options, "scheduler options"), (embeddings, "a textual-inversion embedding")):
            if given:
                raise SdcliError(f"{checkpoint.path} is a {title} model, a video model of its own: {what} applies "
                                 "to SD 1.x models with AnimateDiff")
        if checkpoint.family == SKYREELS:
            return load_skyreels_pipeline(checkpoint, precision=precision, backend=backend, low_memory=low_memory)
        return load_wan_pipeline(checkpoint, precision=precision, backend=backend, low_memory=low_memory)
    if motion_adapter is None:
        raise SdcliError(f"{checkpoint.path} is an image model: it makes videos with an AnimateDiff motion adapter "
                         "(--motion-adapter animatediff-lightning, for one), or use a video model (--model "
                         "wan21-t2v-1.3b)")
    return load_animatediff_pipeline(checkpoint, motion_adapter, precision=precision, backend=backend,
                                     scheduler_options=scheduler_options, loras=loras, low_memory=low_memory,
                                     embeddings=embeddings)


def generate_video(pipeline: VideoPipeline, params: VideoParams,
                   initial_noise: np.ndarray | None = None) -> GeneratedVideo:
    """Run ``pipeline`` on ``params`` to the end and return the clips (the library call without progress).
    SkyReels-V2's ``initial_noise`` is its first window's; its ``generate`` takes a source of all its noise too."""
    if isinstance(pipeline, SkyReelsTextToVideo):
        return pipeline.generate(params, initial_noise=initial_noise)
    for record in pipeline.run(params, initial_noise=initial_noise):
        if isinstance(record, GeneratedVideo):
            return record
    raise AssertionError("the pipeline ended without a result")


__all__ = ["generate_video", "load_video_pipeline"]
