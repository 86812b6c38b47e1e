"""Batch runs past one machine: ``--shard K/N`` slices a run's batches deterministically, ``--skip-existing`` resumes
a killed run, and the JSON records carry each image's index in the run. On the committed tiny checkpoint of the
golden test, without any reference library."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from data_paths import TEST_DATA

import sdcli
from sdcli.cli import main

MODEL = str(TEST_DATA / "golden" / "tiny-sd1")
PROMPTS = "a red fox in the snow --steps 2\na lighthouse at dusk\na bowl of ramen --seed 99\n"
FAST = ["--steps", "3", "-W", "64", "-H", "64", "--seed", "11", "-N", "2", "--quiet"]


def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(PROMPTS)
    return str(path)


def run(*args):
    return CliRunner().invoke(main, ["generate", "-m", MODEL, *map(str, args)], catch_exceptions=False)


def test_the_union_of_three_shards_is_the_whole_run(tmp_path):
    """One run of 3 prompts x 2 images, and the same run in 3 shards in 3 processes at once: the same 6 files,
    byte for byte."""
    prompts = prompts_file(tmp_path)
    whole = tmp_path / "whole"
    whole.mkdir()
    assert run("--prompts-file", prompts, *FAST, "-o", whole / "{index}-{seed}.png").exit_code == 0
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    environment = {**os.environ, "SDCLI_AUTO_DOWNLOAD": "0"}
    processes = [subprocess.Popen([sys.executable, "-m", "sdcli", "generate", "-m", MODEL, "--prompts-file",
                                   prompts, *FAST, "-o", str(sharded / "{index}-{seed}.png"), "--shard", f"{k}/3",
                                   "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=environment) for k in (1, 2, 3)]
    records = []
    for process in processes:
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err
        records += [json.loads(line) for line in out.splitlines()]
    names = sorted(path.name for path in whole.iterdir())
    assert len(names) == 6 and sorted(path.name for path in sharded.iterdir()) == names
    for name in names:
        assert (sharded / name).read_bytes() == (whole / name).read_bytes(), name
    assert sorted(record["index"] for record in records) == [1, 2, 3, 4, 5, 6]
    assert all(os.path.basename(record["path"]).startswith(f"{record['index']}-") for record in records)


def test_shards_take_every_nth_batch():
    plan = sdcli.plan_run(sdcli.GenerateParams(prompt="x", seed=5), num_images=7, batch_size=2)
    shards = [plan.shard(k, 3) for k in (1, 2, 3)]
    assert [[job.first_image for job in shard.jobs] for shard in shards] == [[0, 6], [2], [4]]
    assert sorted(seed for shard in shards for seed in shard.seeds) == plan.seeds == list(range(5, 12))
    with pytest.raises(sdcli.SdcliError, match="1..3"):
        plan.shard(4, 3)


def test_skip_existing_resumes_a_killed_run(tmp_path):
    """Images already there are left as they are (not even rewritten); the missing ones are made as the whole run
    makes them; a run with nothing left to do says so."""
    prompts = prompts_file(tmp_path)
    whole = tmp_path / "whole"
    whole.mkdir()
    assert run("--prompts-file", prompts, *FAST, "-o", whole / "{index}.png").exit_code == 0
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for name in ("1.png", "4.png"):  # what a killed run left
        (resumed / name).write_bytes((whole / name).read_bytes())
    (resumed / "5.png").write_bytes(b"kept as it is")
    result = run("--prompts-file", prompts, *FAST, "-o", resumed / "{index}.png", "--skip-existing", "--json")
    assert result.exit_code == 0, result.output
    assert sorted(json.loads(line)["index"] for line in result.stdout.splitlines()) == [2, 3, 6]
    assert (resumed / "5.png").read_bytes() == b"kept as it is"
    for name in ("1.png", "2.png", "3.png", "4.png", "6.png"):
        assert (resumed / name).read_bytes() == (whole / name).read_bytes(), name
    again = run("--prompts-file", prompts, *FAST[:-1], "-o", resumed / "{index}.png", "--skip-existing")
    assert again.exit_code == 0 and "nothing to do" in again.output


UNSEEDED = ["--steps", "3", "-W", "64", "-H", "64", "-N", "2", "--quiet"]


@pytest.mark.parametrize("args, message", [
    (["--seed", "1", "--shard", "4/3"], "1 <= K <= N"),
    (["--seed", "1", "--shard", "x"], "K/N"),
    (["--shard", "1/2"], "--shard needs --seed"),
    (["--seed", "1", "--skip-existing", "--overwrite"], "give one"),
    (["--seed", "1", "--shard", "1/2", "-o", "FOLDER/"], "named by the run alone"),
])
def test_bad_shard_options_are_one_line_errors(tmp_path, args, message):
    args = [a.replace("FOLDER", str(tmp_path)) for a in args]
    result = run("-p", "a fox", *UNSEEDED, *args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not any(p.suffix == ".png" for p in tmp_path.iterdir())


def test_existing_outputs_of_this_shard_are_refused_without_overwrite(tmp_path):
    (tmp_path / "2.png").write_bytes(b"x")  # shard 1/2 of 2 images makes image 1 only: not refused
    assert run("-p", "a fox", *FAST, "-o", tmp_path / "{index}.png", "--shard", "1/2").exit_code == 0
    assert (tmp_path / "1.png").is_file() and (tmp_path / "2.png").read_bytes() == b"x"
    other = tmp_path / "other"
    other.mkdir()
    (other / "3.png").write_bytes(b"x")  # shard 1/2 of 3 images makes images 1 and 3
    result = run("-p", "a fox", *FAST, "-N", "3", "-o", other / "{index}.png", "--shard", "1/2")
    assert result.exit_code == 2 and "3.png exists" in result.output and not (other / "1.png").exists()
