"""Files sdcli writes get the permissions a plain open() gives under the user's umask (0o666 & ~umask), though
each is written under a temporary name and renamed into place: images, arrays (latents, embeddings), safetensors
files and downloads."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from hub_server import FakeHub
from sdcli.hub import HubClient
from sdcli.io.files import atomic_output, save_array
from sdcli.io.media import save_png
from sdcli.io.safetensors import save_file

UMASKS = [0o022, 0o027, 0o077]


@pytest.fixture(params=UMASKS, ids=oct)
def umask(request):
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_arrays_and_images(tmp_path, umask):
    expected = 0o666 & ~umask
    assert mode(save_array(tmp_path / "latents.npy", np.zeros((1, 4, 8, 8), np.float32))) == expected
    assert mode(save_png(tmp_path / "image.png", np.zeros((8, 8, 3), np.uint8), {"parameters": "x"})) == expected
    save_file(tmp_path / "weights.safetensors", {"w": np.ones(3, np.float32)})
    assert mode(tmp_path / "weights.safetensors") == expected
    with atomic_output(tmp_path / "any.bin") as temporary:
        temporary.write_bytes(b"data")
    assert mode(tmp_path / "any.bin") == expected
    assert sorted(path.name for path in tmp_path.iterdir()) == ["any.bin", "image.png", "latents.npy",
                                                                "weights.safetensors"]  # no temporary left


def test_overwrite_takes_the_umask_too(tmp_path, umask):
    path = tmp_path / "latents.npy"
    path.write_bytes(b"old")
    path.chmod(0o600)
    save_array(path, np.zeros(3, np.float32), overwrite=True)
    assert mode(path) == 0o666 & ~umask  # a new file replaced the old one, as a plain write-and-rename does


def test_downloads(tmp_path, umask, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    files = {"model_index.json": b'{"_class_name": "StableDiffusionPipeline"}',
             "unet/diffusion_pytorch_model.safetensors": bytes(range(256)) * 64}
    with FakeHub() as hub:
        hub.add_repo("org/model", files, lfs={"unet/diffusion_pytorch_model.safetensors"})
        target = tmp_path / "weights"
        HubClient(hub.endpoint, retries=0, backoff=0.001, timeout=5.0).download("org/model", list(files), target)
    for name in files:
        assert mode(target / name) == 0o666 & ~umask, name
