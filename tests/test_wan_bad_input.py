"""Wan2.1 at the command line without weights: frame counts, sizes and options Wan cannot take, a Wan model passed to
`generate` or given a motion adapter, and Wan-only options given to an SD model, each a one-line error before
anything downloads or loads. No torch needed: a Wan folder is recognised by its model_index.json."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import sdcli
from data_paths import TEST_DATA
from sdcli.cli import main
from sdcli.errors import CheckpointError, SdcliError
from sdcli.pipelines.wan import check_wan_params, nearest_frame_count, nearest_side

SD_MODEL = TEST_DATA / "golden" / "tiny-sd1"


def invoke(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def assert_one_line_error(result, *words):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture
def wan_folder(tmp_path):
    """A folder that is recognised as a Wan model (its weights are never reached by these tests)."""
    folder = tmp_path / "wan"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    return folder


@pytest.mark.parametrize("frames, nearest", [(2, 1), (3, 5), (18, 17), (80, 81), (83, 85), (84, 85)])
def test_frame_counts_wan_cannot_make_name_the_nearest(tmp_path, frames, nearest):
    assert nearest_frame_count(frames) == nearest
    result = invoke("video", "--model", "wan21-t2v-1.3b", "-p", "a fox", "--frames", frames, "-o",
                    tmp_path / "fox.mp4", "--offline")
    assert_one_line_error(result, "4k+1", f"--frames {nearest}")


@pytest.mark.parametrize("option, value, nearest", [("-W", 232, 240), ("-H", 488, 496), ("-W", 840, 848)])
def test_sides_wan_cannot_take_name_the_nearest(tmp_path, option, value, nearest):
    result = invoke("video", "--model", "wan21-t2v-1.3b", "-p", "a fox", option, value, "-o", tmp_path / "fox.mp4",
                    "--offline")
    assert_one_line_error(result, "multiple of 16", f"use {nearest}")
    assert nearest_side(value) == nearest


@pytest.mark.parametrize("options, words", [
    (["--context-length", "16"], ["--context-length", "AnimateDiff"]),
    (["--timestep-spacing", "trailing"], ["--timestep-spacing", "AnimateDiff"]),
    (["--clip-skip", "2"], ["--clip-skip"]),
    (["--eta", "0.5"], ["--eta"]),
    (["--decode-chunk", "4"], ["--decode-chunk"]),
    (["--motion-adapter", "animatediff-lightning"], ["--motion-adapter", "Wan2.1"]),
])
def test_animatediff_options_with_wan_are_refused(tmp_path, options, words):
    result = invoke("video", "--model", "wan21-t2v-1.3b", "-p", "a fox", *options, "-o", tmp_path / "fox.mp4",
                    "--offline")
    assert_one_line_error(result, *words)
    assert not (tmp_path / "fox.mp4").exists()


def test_wan_only_options_with_an_sd_model_are_refused(tmp_path):
    result = invoke("video", "--model", SD_MODEL, "--motion-adapter", "animatediff-lightning", "-p", "a fox",
                    "--flow-shift", "5", "-o", tmp_path / "fox.mp4", "--offline")
    assert_one_line_error(result, "--flow-shift", "Wan")


def test_an_sd_model_without_a_motion_adapter_names_both_ways(tmp_path):
    result = invoke("video", "--model", SD_MODEL, "-p", "a fox", "-o", tmp_path / "fox.mp4", "--offline")
    assert_one_line_error(result, "--motion-adapter", "wan21-t2v-1.3b")


def test_a_wan_model_passed_to_generate_is_refused(tmp_path, wan_folder):
    result = invoke("generate", "--model", wan_folder, "-p", "a fox", "-o", tmp_path / "fox.png")
    assert_one_line_error(result, "Wan video model", "sdcli video")
    with pytest.raises(SdcliError, match="makes no images"):
        sdcli.load_pipeline(wan_folder)


def test_a_wan_model_in_the_library_refuses_a_motion_adapter(wan_folder):
    with pytest.raises(SdcliError, match="--motion-adapter applies to SD 1.x"):
        sdcli.load_video_pipeline(wan_folder, "animatediff-lightning")


@pytest.mark.parametrize("index, words", [
    ({"_class_name": "WanImageToVideoPipeline"}, ["WanImageToVideoPipeline", "text to video"]),
    ({"_class_name": "WanPipeline", "transformer_2": ["diffusers", "WanTransformer3DModel"],
      "boundary_ratio": 0.875}, ["Wan2.2"]),
])
def test_other_wan_pipelines_are_named(tmp_path, index, words):
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as error:
        sdcli.open_checkpoint(tmp_path)
    assert all(word in str(error.value) for word in words)


def test_params_check_in_the_library():
    params = sdcli.VideoParams("a fox", frames=17, width=256, height=256)
    assert check_wan_params(params) is params
    with pytest.raises(SdcliError, match="use --frames 17"):
        check_wan_params(params.with_(frames=16))
