"""sdcli's benchmark: sdcli against the reference implementation (transformers / diffusers on PyTorch), measured
in one run on this machine, on the full SD architectures with random weights.

Sections (``--only``):

- ``text_encoder``: the CLIP text encoder of SD1 and SD2, batch 2 x 77 tokens, fp32, against transformers;
- ``unet``: one SD1.5 UNet forward, batch 2 (one classifier-free-guided step), at latent 32x32 and 64x64
  (256 and 512 pixels), with the weights held in fp32 and in bf16, against diffusers (``torch_dtype`` and
  inputs in the same dtype); load time, forward time, peak memory, GFLOP/s (the forward's FLOPs counted by
  running sdcli's UNet on a counting op backend) next to the machine's GEMM ceiling (numpy float32 and torch
  fp32/bf16 matmul, 2048 cubed, best of 5), and for bf16 each side's error against its own fp32 output;
- ``vae``: one SD1.5 VAE decode of a 512x512 image, fp32, against diffusers;
- ``motion_unet``: one forward of the SD1.5 UNet with AnimateDiff's v1-5-2 motion modules, 16 frames at 256x256
  (latent 32x32), batch 2, with the weights held in fp32 and in bf16, against diffusers' ``UNetMotionModel``;
- ``video``: a whole ``sdcli video`` run as a user runs it, 16 frames at 256x256, 4 Euler steps with trailing
  timesteps and guidance 1 (AnimateDiff-Lightning's settings), fp32 weights, written to an mp4, against diffusers'
  ``AnimateDiffPipeline`` with the same scheduler, exported with ``export_to_video``;
- ``wan_transformer``, ``wan_text_encoder``, ``wan_vae``, ``wan_video``: Wan2.1 (scripts/bench_wan.py): one
  transformer step at 256x256, 17 frames, batch 2, fp32 and bf16, against diffusers' ``WanTransformer3DModel``;
  the UMT5-XXL encoding of one 512-token prompt in bf16 against transformers; the VAE decode of 17 frames at
  256x256; a whole 256x256, 17-frame, 4-step ``sdcli video`` run in bf16 against diffusers' ``WanPipeline``;
- ``stream``: streaming (scripts/bench_stream.py): Self-Forcing's chunks at 256x256 in bf16, the time to the first
  frame, the steady frames per second and the peak after 1, 4 and 16 chunks, next to a non-streaming Wan run and
  diffusers' SkyReels-V2 diffusion forcing of 45 frames (one process each, not alternated);
- ``lora`` (scripts/bench_lora.py): what a rank-32 kohya LoCon LoRA (every attention projection, feed-forward,
  proj_in/out and resnet convolution) costs the SD1.5 UNet's load and first forward, in time and peak memory,
  with and without it alternating (sdcli alone), per precision;
- ``generate``: a whole 512x512, 20-step txt2img run with fp16 weights as a user runs it
  (``sdcli generate ... --precision fp16``) against diffusers' StableDiffusionPipeline with
  ``torch_dtype=torch.float16`` on the CPU, same scheduler (the model's own, PNDM) and guidance 7.5:
  the wall time and peak memory of each whole process (start, load, generate, save).

The two sides alternate (sdcli, reference, sdcli, reference, ...) and the tables quote medians and the ratio
sdcli / reference. Every measurement runs in a fresh process: sdcli's never import torch (two OpenMP runtimes in
one process fight over the cores), and each process's peak resident memory is its own (VmHWM; for the whole
``generate`` processes the rusage of a small spawning process, which a big parent would inflate). Inside a
process: load, one warm-up call, then the timed call.

    python scripts/bench.py [--only text_encoder,unet,vae,motion_unet,video,generate,wan_transformer,
                                   wan_text_encoder,wan_vae,wan_video,stream,lora] [--repeats 3] [--sizes 32,64]
                            [--precisions fp32,bf16] [--json bench-results/bench.json]

The random-weight model folders are written once per run under the system temp dir (about 6.5 GB with every
section) and removed at the end. torch, transformers and diffusers (the test extra) make the random weights and
are the reference side; without them, or with ``--no-reference``, sdcli's side runs alone on weights written
with numpy and sdcli's own safetensors writer.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import itertools
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # measure the sdcli of this checkout, in this process and in every child
CHILD_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
CONFIGS = ROOT / "sdcli" / "data" / "configs"

SECTIONS = ("text_encoder", "unet", "vae", "motion_unet", "video", "generate", "wan_transformer",
            "wan_text_encoder", "wan_vae", "wan_video", "stream", "lora")
WAN_SECTIONS = SECTIONS[6:10]
MOTION_FRAMES, MOTION_LATENT = 16, 32  # the motion sections' clips: 16 frames at 256x256
# diffusers' MotionAdapter config of guoyww/animatediff-motion-adapter-v1-5-2
MOTION_ADAPTER_CONFIG = {"block_out_channels": [320, 640, 1280, 1280], "motion_layers_per_block": 2,
                         "motion_mid_block_layers_per_block": 1, "motion_num_attention_heads": 8,
                         "motion_norm_num_groups": 32, "motion_max_seq_length": 32, "use_motion_mid_block": True}
PRECISIONS = ("fp32", "fp16", "bf16")
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16")
PROMPTS = ["a photograph of an astronaut riding a horse", "a watercolor painting of a fox in the snow"]
GEMM_SIZE = 2048


# -- machine ------------------------------------------------------------------------------------------------------

def machine() -> dict:
    """CPU model (lscpu), core count, the CPU flags the kernels care about, and library versions."""
    model = platform.processor() or "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
                break
    except (OSError, subprocess.CalledProcessError):
        pass
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    versions = {}
    for package in ("sdcli", "numpy", "torch", "diffusers", "transformers"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"cpu": model, "cores": os.cpu_count(), "flags": {flag: flag in flags for flag in CPU_FLAGS},
            "cpu_level": sdcli_cpu_level(), "python": platform.python_version(), "versions": versions}


def sdcli_cpu_level() -> str:
    """The CPU level sdcli's kernels run at (README, "CPU levels"), and the CPU's best where SDCLI_CPU_LEVEL caps
    it; the children inherit the environment, so they run at the same level."""
    try:
        from sdcli.ext import cpu_level
    except ImportError:
        return "not built"
    level, detected = cpu_level()
    return level if level == detected else f"{level} (SDCLI_CPU_LEVEL; the CPU has {detected})"


def reference_installed() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("torch", "diffusers", "transformers"))


# -- child processes ----------------------------------------------------------------------------------------------

def run_child(script: str, *args: object, what: str) -> str:
    """Run ``python -c script args...`` (sdcli of this checkout importable); its stdout, or exit naming ``what``."""
    result = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                            env=CHILD_ENV)
    if result.returncode:
        raise SystemExit(f"{what} failed:\n{result.stderr[-4000:]}")
    return result.stdout


def last_json(stdout: str) -> dict:
    """The JSON object on a child's last stdout line (libraries may print before it)."""
    return json.loads(stdout.strip().splitlines()[-1])


# One network call measured in a fresh process: load, one warm-up call, the timed call; its output is saved.
# argv: side (sdcli | reference), network (text_encoder | unet | vae), model folder, precision, inputs .npz,
# output .npy. Prints {"load_s", "warmup_s", "run_s", "peak_bytes"}.
NETWORK_SIDE = """
import json, resource, sys, time
import numpy as np
side, network, folder, precision, inputs_path, output_path = sys.argv[1:7]
inputs = dict(np.load(inputs_path))

def timed(run):
    start = time.perf_counter()
    out = run()
    return out, time.perf_counter() - start

if side == "sdcli":
    import sdcli, sdcli.memory
    from sdcli.families.sd_networks import load_unet, load_vae_decoder
    start = time.perf_counter()
    if network == "text_encoder":
        encoder = sdcli.load_prompt_encoder(folder, precision=precision)
        run = lambda: encoder.text_encoder(inputs["ids"])
    elif network == "unet":
        unet = load_unet(folder, precision)  # conversions at load on the backend's kernels, as load_pipeline does
        run = lambda: unet(inputs["sample"], inputs["timesteps"], inputs["context"])
    elif network == "motion_unet":
        from sdcli.families.animatediff import load_motion_unet, open_motion_adapter
        from sdcli.ops import get_ops
        unet = load_motion_unet(load_unet(folder, precision), open_motion_adapter(folder + "/motion_adapter"),
                                get_ops("cpu"), precision)
        run = lambda: unet(inputs["sample"], inputs["timesteps"], inputs["context"])
    else:
        decoder = load_vae_decoder(folder, precision=precision)
        run = lambda: decoder(inputs["latents"])
    load = time.perf_counter() - start
    # the denoisers run as a sampling loop runs them, keeping large freed arrays for the next call (the decoder
    # and the text encoder without: the pipelines run them so)
    with sdcli.memory.reuse_large_arrays(network in ("unet", "motion_unet")):
        _, warmup = timed(run)
        out, elapsed = timed(run)
    assert "torch" not in sys.modules
else:
    import torch
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    with torch.inference_mode():
        if network == "text_encoder":
            import transformers
            start = time.perf_counter()
            model = transformers.CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").to(dtype).eval()
            ids = torch.from_numpy(inputs["ids"])
            run = lambda: model(input_ids=ids).last_hidden_state
        elif network == "unet":
            import diffusers
            start = time.perf_counter()
            model = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype).eval()
            sample, context = (torch.from_numpy(inputs[key]).to(dtype) for key in ("sample", "context"))
            timesteps = torch.from_numpy(inputs["timesteps"])
            run = lambda: model(sample, timesteps, encoder_hidden_states=context).sample
        elif network == "motion_unet":
            import diffusers
            start = time.perf_counter()
            unet = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype)
            adapter = diffusers.MotionAdapter.from_pretrained(folder + "/motion_adapter", torch_dtype=dtype)
            model = diffusers.UNetMotionModel.from_unet2d(unet, adapter).to(dtype).eval()
            del unet, adapter
            sample, context = (torch.from_numpy(inputs[key]).to(dtype) for key in ("sample", "context"))
            context = context.repeat_interleave(sample.shape[2], dim=0)  # per frame, as AnimateDiffPipeline passes it
            timesteps = torch.from_numpy(inputs["timesteps"])
            run = lambda: model(sample, timesteps, encoder_hidden_states=context).sample
        else:
            import diffusers
            start = time.perf_counter()
            model = diffusers.AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype).eval()
            latents = (torch.from_numpy(inputs["latents"]) / model.config.scaling_factor).to(dtype)
            run = lambda: model.decode(latents).sample
        load = time.perf_counter() - start
        _, warmup = timed(run)
        out, elapsed = timed(run)
        out = out.float().numpy()
np.save(output_path, out)
try:  # this process's own peak: VmHWM starts afresh at exec, while ru_maxrss keeps the forking parent's
    peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
except (OSError, StopIteration):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
print(json.dumps({"load_s": load, "warmup_s": warmup, "run_s": elapsed, "peak_bytes": peak}))
"""


# A command run as a whole process, from a small process that spawns it (posix_spawn) and reads its rusage: the
# command's peak is its own (a child's ru_maxrss starts from its parent's resident size, which is small here).
# argv: result .json, stdout file, stderr file, command... Writes {"wall_s", "peak_bytes", "returncode"}.
MEASURE_PROCESS = """
import json, os, sys, time
result_path, stdout_path, stderr_path, *command = sys.argv[1:]
flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
actions = [(os.POSIX_SPAWN_OPEN, 1, stdout_path, flags, 0o644), (os.POSIX_SPAWN_OPEN, 2, stderr_path, flags, 0o644)]
start = time.perf_counter()
pid = os.posix_spawn(command[0], command, os.environ, file_actions=actions)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - start
peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
with open(result_path, "w") as handle:
    json.dump({"wall_s": wall, "peak_bytes": peak, "returncode": os.waitstatus_to_exitcode(status)}, handle)
"""

# diffusers' txt2img as a user runs it: load the pipeline in fp16, generate, save the PNG.
# argv: model folder, prompt, steps, size, output .png, timings .json
DIFFUSERS_GENERATE = """
import json, sys, time
start = time.perf_counter()
import numpy as np
import torch
import diffusers
folder, prompt, steps, size, output, timings_path = sys.argv[1:7]
steps, size = int(steps), int(size)
loading = time.perf_counter()
pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float16)
pipe.set_progress_bar_config(disable=True)
generating = time.perf_counter()
images = pipe(prompt, num_inference_steps=steps, guidance_scale=7.5, height=size, width=size,
              generator=torch.Generator().manual_seed(0), output_type="np").images  # (1, H, W, 3) in [0, 1]
generated = time.perf_counter()
pipe.numpy_to_pil(images)[0].save(output)
with open(timings_path, "w") as handle:
    json.dump({"import_s": loading - start, "load_s": generating - loading, "generate_s": generated - generating,
               "scheduler": type(pipe.scheduler).__name__, "finite": bool(np.isfinite(images).all())}, handle)
"""


# diffusers' AnimateDiff text to video as a user runs it: load, generate, export the mp4.
# argv: model folder, adapter folder, prompt, frames, steps, size, output .mp4, timings .json
DIFFUSERS_VIDEO = """
import json, sys, time
start = time.perf_counter()
import numpy as np
import torch
import diffusers
from diffusers.utils import export_to_video
folder, adapter_folder, prompt, frames, steps, size, output, timings_path = sys.argv[1:9]
frames, steps, size = int(frames), int(steps), int(size)
loading = time.perf_counter()
adapter = diffusers.MotionAdapter.from_pretrained(adapter_folder)
pipe = diffusers.AnimateDiffPipeline.from_pretrained(folder, motion_adapter=adapter)
pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing",
                                                              beta_schedule="linear")
pipe.set_progress_bar_config(disable=True)
generating = time.perf_counter()
clip = pipe(prompt, num_frames=frames, num_inference_steps=steps, guidance_scale=1.0, height=size, width=size,
            generator=torch.Generator().manual_seed(0), output_type="np").frames[0]  # (F, H, W, 3) in [0, 1]
generated = time.perf_counter()
export_to_video(list(clip), output, fps=8)
with open(timings_path, "w") as handle:
    json.dump({"import_s": loading - start, "load_s": generating - loading, "generate_s": generated - generating,
               "scheduler": type(pipe.scheduler).__name__, "finite": bool(np.isfinite(clip).all())}, handle)
"""


# -- random-weight model folders ----------------------------------------------------------------------------------

# Random weights with the reference libraries' own initialisation, saved by them (float32 safetensors) into
# argv[1]/<component> for the components in argv[2]; in a child process, so that this one stays small.
REFERENCE_WEIGHTS = """
import sys
import diffusers, torch, transformers
folder, components = sys.argv[1], sys.argv[2].split(",")
torch.manual_seed(0)
for name in components:
    path = folder + "/" + name
    if name == "text_encoder":
        model = transformers.CLIPTextModel(transformers.CLIPTextConfig.from_pretrained(path))
    elif name == "motion_adapter":
        model = diffusers.MotionAdapter.from_config(diffusers.MotionAdapter.load_config(path))
    else:
        cls = diffusers.UNet2DConditionModel if name == "unet" else diffusers.AutoencoderKL
        model = cls.from_config(cls.load_config(path))
    model.save_pretrained(path)
    del model
"""

# The same without torch: shapes from sdcli's networks (shape-only builds), matrices and kernels normal with standard
# deviation 1/sqrt(fan_in), norm scales 1, biases 0; written with sdcli's safetensors writer.
NUMPY_WEIGHTS = """
import sys
import numpy as np
from sdcli.config import ClipConfig, MotionAdapterConfig, UNetConfig, VAEConfig, read_json
from sdcli.io.safetensors import save_file
from sdcli.io.weights import tensor_shapes
from sdcli.nn.clip import ClipTextEncoder
from sdcli.nn.motion import MotionAdapter
from sdcli.nn.unet import UNet2DConditionModel
from sdcli.nn.vae import Autoencoder
folder, components = sys.argv[1], sys.argv[2].split(",")
rng = np.random.default_rng(0)
for name in components:
    config = read_json(f"{folder}/{name}/config.json")
    if name == "text_encoder":
        clip = ClipConfig.from_diffusers(config)
        shapes, filename = tensor_shapes(lambda params: ClipTextEncoder(params, clip)), "model.safetensors"
    elif name == "unet":
        unet = UNetConfig.from_diffusers(config)
        shapes = tensor_shapes(lambda params: UNet2DConditionModel(params, unet))
        filename = "diffusion_pytorch_model.safetensors"
    elif name == "motion_adapter":
        unet = UNetConfig.from_diffusers(read_json(f"{folder}/unet/config.json"))
        adapter = MotionAdapterConfig.from_diffusers(config).for_unet(unet)
        shapes = tensor_shapes(lambda params: MotionAdapter(params, adapter))
        filename = "diffusion_pytorch_model.safetensors"
    else:
        vae = VAEConfig.from_diffusers(config)
        shapes, filename = tensor_shapes(lambda params: Autoencoder(params, vae)), "diffusion_pytorch_model.safetensors"
    tensors = {}
    for key in sorted(shapes):
        shape = tuple(shapes[key])
        if len(shape) >= 2:  # (out, in, ...): fan_in = prod(shape[1:])
            tensors[key] = rng.standard_normal(shape, dtype=np.float32) * np.float32(np.prod(shape[1:]) ** -0.5)
        else:
            tensors[key] = np.full(shape, 1.0 if key.endswith("weight") else 0.0, dtype=np.float32)
    save_file(f"{folder}/{name}/{filename}", tensors)
    del tensors
"""

# A copy of the folder argv[1] at argv[2] with every safetensors file converted to float16 (as the fp16 downloads
# are), read and written with sdcli's safetensors reader and writer.
HALVE_WEIGHTS = """
import shutil, sys
from pathlib import Path
import numpy as np
from sdcli.io.safetensors import SafetensorsFile, save_file
source, target = Path(sys.argv[1]), Path(sys.argv[2])
for path in sorted(source.rglob("*")):
    if path.is_dir():
        continue
    destination = target / path.relative_to(source)
    destination.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        with SafetensorsFile(path) as file:
            tensors = {name: file.float32(name).astype(np.float16) for name in file.keys()}
        save_file(destination, tensors)
        del tensors
    else:
        shutil.copy(path, destination)
"""


def write_model_folder(folder: Path, family: str, components: list[str], reference: bool) -> Path:
    """A diffusers folder of ``family`` ("sd15", "sd21") that sdcli, diffusers and transformers all open: the
    shipped configs, the tokenizer tables, a model_index.json without safety checker, and random float32 weights
    for ``components``. (tests/reference_models.py writes such folders too, but needs torch in this process.)"""
    from sdcli.nn.tokenizer import shipped_tokenizer_dir

    shutil.copytree(CONFIGS / family, folder)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(shipped_tokenizer_dir() / name, folder / "tokenizer" / name)
    index = json.loads((folder / "model_index.json").read_text())
    index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    if "motion_adapter" in components:
        (folder / "motion_adapter").mkdir()
        (folder / "motion_adapter" / "config.json").write_text(json.dumps(MOTION_ADAPTER_CONFIG, indent=2))
    note(f"writing random {family} weights: {', '.join(components)}")
    run_child(REFERENCE_WEIGHTS if reference else NUMPY_WEIGHTS, folder, ",".join(components),
              what=f"writing the random {family} weights")
    return folder


def half_copy(folder: Path, target: Path) -> Path:
    note("writing the fp16 copy of the weights")
    run_child(HALVE_WEIGHTS, folder, target, what="writing the fp16 copy of the weights")
    return target


# -- FLOP count and GEMM ceiling ----------------------------------------------------------------------------------

class FlopCounter:
    """An op backend that computes nothing: every op returns zeros of its output's shape, and the matrix products
    (linear, conv2d, attention) add their 2*M*N*K to ``flops``. An op it does not know runs as numpy's reference
    on the zeros, uncounted, and is named in ``uncounted``, so a new op cannot drop out of the count unnoticed."""

    name = "flop-counter"

    def __init__(self) -> None:
        self.flops = {"linear": 0, "conv2d": 0, "attention": 0}
        self.uncounted: set[str] = set()

    def linear(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None, **_) -> np.ndarray:
        out_features, in_features = weight.shape
        self.flops["linear"] += 2 * (x.size // in_features) * in_features * out_features
        return np.zeros((*x.shape[:-1], out_features), np.float32)  # (..., out)

    def conv2d(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None, *, stride: int = 1,
               padding: int = 0, **_) -> np.ndarray:
        batch, _, height, width = x.shape
        out_channels, in_channels, kh, kw = weight.shape
        out_h, out_w = (height + 2 * padding - kh) // stride + 1, (width + 2 * padding - kw) // stride + 1
        self.flops["conv2d"] += 2 * batch * out_h * out_w * out_channels * in_channels * kh * kw
        return np.zeros((batch, out_channels, out_h, out_w), np.float32)  # (B, Cout, Ho, Wo)

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, *, causal: bool = False,
                  scale: float | None = None, **_) -> np.ndarray:
        heads = int(np.prod(q.shape[:-2]))  # B * H
        tq, d = q.shape[-2:]
        tk, dv = v.shape[-2:]
        self.flops["attention"] += 2 * heads * tq * tk * (d + dv)  # q k^T and p v
        return np.zeros((*q.shape[:-1], dv), np.float32)  # (B, H, Tq, dv)

    def _same_shape(self, x: np.ndarray, *args, **kwargs) -> np.ndarray:
        return np.zeros(x.shape, np.float32)

    layer_norm = gelu = quick_gelu = softmax = silu = relu = group_norm = _same_shape

    def geglu(self, x: np.ndarray) -> np.ndarray:
        return np.zeros((*x.shape[:-1], x.shape[-1] // 2), np.float32)  # (..., 2 C) -> (..., C)

    def upsample_nearest(self, x: np.ndarray, factor: int = 2) -> np.ndarray:
        return np.zeros((*x.shape[:-2], x.shape[-2] * factor, x.shape[-1] * factor), np.float32)

    def split_heads(self, x: np.ndarray, heads: int, **_) -> np.ndarray:
        from sdcli.ops import numpy_ops

        return numpy_ops.split_heads(x, heads)  # a view: no arithmetic to count

    def channels_last(self, x: np.ndarray) -> np.ndarray:
        return np.zeros((x.shape[0], int(np.prod(x.shape[2:])), x.shape[1]), np.float32)  # a copy: no arithmetic

    def channels_first(self, x: np.ndarray, height: int, width: int) -> np.ndarray:
        return np.zeros((x.shape[0], x.shape[2], height, width), np.float32)

    def __getattr__(self, name: str):
        from sdcli.ops import numpy_ops

        function = getattr(numpy_ops, name)
        self.uncounted.add(name)
        return function


class ZeroSource:
    """Every expected tensor as float32 zeros (pages never touched, so no memory): weights for counting."""

    description = "zero weights"

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self.shapes = shapes

    def keys(self) -> list[str]:
        return list(self.shapes)

    def dtype(self, name: str) -> str:
        return "F32"

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.shapes[name])

    def read(self, name: str) -> np.ndarray:
        return np.zeros(self.shapes[name], np.float32)

    def unexpected(self) -> list[str]:
        return []

    def release(self, name: str | None = None) -> None:
        pass  # nothing is mapped


def unet_flops(latent: int, batch: int = 2) -> dict:
    """FLOPs of one SD1.5 UNet forward at ``latent`` x ``latent``, by running sdcli's UNet on the counter."""
    from sdcli.config import UNetConfig, read_json
    from sdcli.io.weights import load_network, tensor_shapes
    from sdcli.nn.unet import UNet2DConditionModel

    config = UNetConfig.from_diffusers(read_json(CONFIGS / "sd15" / "unet" / "config.json"))
    counter = FlopCounter()
    build = lambda params: UNet2DConditionModel(params, config)  # noqa: E731
    unet = load_network(build, ZeroSource(tensor_shapes(build)), counter)
    unet(np.zeros((batch, config.in_channels, latent, latent), np.float32), np.full(batch, 500.0),
         np.zeros((batch, 77, config.cross_attention_dim), np.float32))
    return {**counter.flops, "total": sum(counter.flops.values()), "uncounted_ops": sorted(counter.uncounted)}


def motion_unet_flops(frames: int, latent: int, batch: int = 2) -> dict:
    """FLOPs of one forward of the SD1.5 UNet with the v1-5-2 motion modules over ``frames`` frames."""
    from sdcli.config import MotionAdapterConfig, UNetConfig, read_json
    from sdcli.io.weights import load_network, tensor_shapes
    from sdcli.nn.motion import MotionAdapter, UNetMotionModel
    from sdcli.nn.unet import UNet2DConditionModel

    config = UNetConfig.from_diffusers(read_json(CONFIGS / "sd15" / "unet" / "config.json"))
    adapter_config = MotionAdapterConfig.from_diffusers(MOTION_ADAPTER_CONFIG).for_unet(config)
    counter = FlopCounter()
    build_unet = lambda params: UNet2DConditionModel(params, config)  # noqa: E731
    build_adapter = lambda params: MotionAdapter(params, adapter_config)  # noqa: E731
    model = UNetMotionModel(load_network(build_unet, ZeroSource(tensor_shapes(build_unet)), counter),
                            load_network(build_adapter, ZeroSource(tensor_shapes(build_adapter)), counter))
    model(np.zeros((batch, config.in_channels, frames, latent, latent), np.float32), np.full(batch, 500.0),
          np.zeros((batch, 77, config.cross_attention_dim), np.float32))
    return {**counter.flops, "total": sum(counter.flops.values()), "uncounted_ops": sorted(counter.uncounted)}


def vae_decode_flops(latent: int = 64) -> dict:
    """FLOPs of one SD1.5 VAE decode of a ``latent`` x ``latent`` latent (8x the pixels)."""
    from sdcli.config import VAEConfig, read_json
    from sdcli.io.weights import load_network, tensor_shapes
    from sdcli.nn.vae import VaeDecoder

    config = VAEConfig.from_diffusers(read_json(CONFIGS / "sd15" / "vae" / "config.json"))
    counter = FlopCounter()
    build = lambda params: VaeDecoder(params, config)  # noqa: E731
    load_network(build, ZeroSource(tensor_shapes(build)), counter)(
        np.zeros((1, config.latent_channels, latent, latent), np.float32))
    return {**counter.flops, "total": sum(counter.flops.values()), "uncounted_ops": sorted(counter.uncounted)}


# The machine's matrix-multiply ceiling: one n x n x n product, best of 5 after a warm-up, default thread count.
# argv: kind (numpy_fp32 | torch_fp32 | torch_bf16), n. Prints {"gflops", "best_s", "threads"}.
GEMM_CEILING = """
import json, os, sys, time
import numpy as np
kind, n = sys.argv[1], int(sys.argv[2])
if kind == "numpy_fp32":
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    multiply = lambda: a @ b
    threads = int(os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS") or os.cpu_count())
else:
    import torch
    dtype = torch.float32 if kind == "torch_fp32" else torch.bfloat16
    a, b = (torch.randn(n, n).to(dtype) for _ in range(2))
    multiply = lambda: torch.mm(a, b)
    threads = torch.get_num_threads()
multiply()
times = []
for _ in range(5):
    start = time.perf_counter()
    multiply()
    times.append(time.perf_counter() - start)
best = min(times)
print(json.dumps({"gflops": 2 * n ** 3 / best / 1e9, "best_s": best, "threads": threads}))
"""


def gemm_ceilings(reference: bool) -> dict:
    note("GEMM ceiling")
    kinds = ["numpy_fp32"] + (["torch_fp32", "torch_bf16"] if reference else [])
    return {kind: {**last_json(run_child(GEMM_CEILING, kind, GEMM_SIZE, what=f"the {kind} GEMM")),
                   "size": GEMM_SIZE} for kind in kinds}


# -- measurements -------------------------------------------------------------------------------------------------

def measure_network(side: str, network: str, folder: Path, precision: str, inputs: Path, output: Path) -> dict:
    stdout = run_child(NETWORK_SIDE, side, network, folder, precision, inputs, output,
                       what=f"{side} {network} {precision}")
    return last_json(stdout)


def errors(values: np.ndarray, reference: np.ndarray) -> dict:
    """max |values - reference| and that relative to max |reference|."""
    max_abs = float(np.abs(values.astype(np.float64) - reference).max())
    return {"max_abs": max_abs, "relative": max_abs / float(np.abs(reference).max())}


def summarise(row: dict, runs: dict[str, list[dict]], reference_name: str, flops: int | None = None) -> dict:
    """Medians per side (the same reference library named in the keys), ratio, GFLOP/s and the raw runs."""
    for side, measured in runs.items():
        name = "sdcli" if side == "sdcli" else reference_name
        row[f"{name}_s"] = statistics.median(m["run_s"] for m in measured)
        row[f"{name}_load_s"] = statistics.median(m["load_s"] for m in measured)
        row[f"{name}_peak_bytes"] = max(m["peak_bytes"] for m in measured)
        if flops:
            row[f"{name}_gflops"] = flops / row[f"{name}_s"] / 1e9
    row["ratio"] = row["sdcli_s"] / row[f"{reference_name}_s"] if f"{reference_name}_s" in row else None
    row["runs"] = {("sdcli" if side == "sdcli" else reference_name): measured for side, measured in runs.items()}
    return row


def note(text: str) -> None:
    """Progress on stderr (the tables go to stdout at the end)."""
    print(text, file=sys.stderr, flush=True)


def alternate(label: str, sides: list[str], repeats: int, measure) -> dict[str, list[dict]]:
    """``measure(side)`` ``repeats`` times per side, alternating sdcli and the reference."""
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for index in range(repeats):
        for side in sides:
            note(f"{label}: {side} {index + 1}/{repeats}")
            runs[side].append(measure(side))
    return runs


def bench_text_encoder(work: Path, folders: dict[str, Path], sides: list[str], repeats: int) -> list[dict]:
    """The CLIP text encoder of SD1 and SD2, batch 2 x 77 tokens, fp32."""
    from sdcli.nn.tokenizer import ClipTokenizer

    rows = []
    for family, folder in folders.items():
        ids = ClipTokenizer.from_folder(folder / "tokenizer")(PROMPTS)  # (2, 77)
        np.savez(work / "ids.npz", ids=ids)
        runs = alternate(f"text encoder {family}", sides, repeats, lambda side: measure_network(
            side, "text_encoder", folder, "fp32", work / "ids.npz", work / f"text-{side}.npy"))
        row = summarise({"family": family, "what": "text encoder, batch 2 x 77 tokens"}, runs, "transformers")
        if "reference" in sides:
            ours, theirs = np.load(work / "text-sdcli.npy"), np.load(work / "text-reference.npy")
            row["max_abs_diff"] = errors(ours, theirs)["max_abs"]
        rows.append(row)
    return rows


def bench_unet(work: Path, folder: Path, sides: list[str], repeats: int, sizes: list[int],
               precisions: list[str]) -> list[dict]:
    """SD1.5 UNet forward, batch 2, at each latent size and weight precision. Rows at fp16/bf16 carry each side's
    error against its own fp32 output (measured once, untimed, when fp32 is not among ``precisions``)."""
    rng = np.random.default_rng(0)
    rows = []
    for size in sizes:
        np.savez(work / "unet.npz", sample=rng.standard_normal((2, 4, size, size), dtype=np.float32),
                 timesteps=np.array([500.0, 500.0], dtype=np.float32),
                 context=rng.standard_normal((2, 77, 768), dtype=np.float32))
        flops = unet_flops(size)
        outputs = {(side, precision): work / f"unet-{side}-{precision}.npy"
                   for side in sides for precision in PRECISIONS}
        if "fp32" not in precisions:
            for side in sides:
                note(f"UNet {size}x{size} fp32 output for the errors: {side}")
                measure_network(side, "unet", folder, "fp32", work / "unet.npz", outputs[side, "fp32"])
        for precision in sorted(precisions, key=PRECISIONS.index):  # fp32 first: the others compare with it
            runs = alternate(f"UNet {size}x{size} {precision}", sides, repeats, lambda side: measure_network(
                side, "unet", folder, precision, work / "unet.npz", outputs[side, precision]))
            row = summarise({"network": "unet", "latent": size, "pixels": 8 * size, "batch": 2,
                             "precision": precision, "gflop": flops["total"] / 1e9,
                             "gflop_by_op": {op: flops[op] / 1e9 for op in ("linear", "conv2d", "attention")},
                             "uncounted_ops": flops["uncounted_ops"]}, runs, "diffusers", flops["total"])
            if precision == "fp32" and "reference" in sides:
                row["sdcli_vs_diffusers"] = errors(np.load(outputs["sdcli", "fp32"]),
                                                   np.load(outputs["reference", "fp32"]))
            if precision != "fp32":
                for side in sides:
                    name = "sdcli" if side == "sdcli" else "diffusers"
                    row[f"{name}_error_vs_fp32"] = errors(np.load(outputs[side, precision]),
                                                          np.load(outputs[side, "fp32"]))
            rows.append(row)
    return rows


def bench_vae(work: Path, folder: Path, sides: list[str], repeats: int, latent: int = 64) -> list[dict]:
    """SD1.5 VAE decode of one image (latent 64x64: 512x512 pixels), fp32."""
    latents = np.random.default_rng(1).standard_normal((1, 4, latent, latent), dtype=np.float32)
    np.savez(work / "vae.npz", latents=latents)
    flops = vae_decode_flops(latent)
    runs = alternate(f"VAE decode {8 * latent}", sides, repeats, lambda side: measure_network(
        side, "vae", folder, "fp32", work / "vae.npz", work / f"vae-{side}.npy"))
    row = summarise({"network": "vae", "pixels": 8 * latent, "precision": "fp32", "gflop": flops["total"] / 1e9},
                    runs, "diffusers", flops["total"])
    if "reference" in sides:
        row["sdcli_vs_diffusers"] = errors(np.load(work / "vae-sdcli.npy"), np.load(work / "vae-reference.npy"))
    return [row]


def bench_motion_unet(work: Path, folder: Path, sides: list[str], repeats: int, precisions: list[str]) -> list[dict]:
    """The SD1.5 UNet with the v1-5-2 motion modules, 16 frames at latent 32x32, batch 2, per weight precision;
    as bench_unet, rows at bf16 carry each side's error against its own fp32 output."""
    rng = np.random.default_rng(2)
    np.savez(work / "motion.npz",
             sample=rng.standard_normal((2, 4, MOTION_FRAMES, MOTION_LATENT, MOTION_LATENT), dtype=np.float32),
             timesteps=np.array([500.0, 500.0], dtype=np.float32),
             context=rng.standard_normal((2, 77, 768), dtype=np.float32))
    flops = motion_unet_flops(MOTION_FRAMES, MOTION_LATENT)
    outputs = {(side, precision): work / f"motion-{side}-{precision}.npy" for side in sides for precision in PRECISIONS}
    if "fp32" not in precisions:
        for side in sides:
            note(f"motion UNet fp32 output for the errors: {side}")
            measure_network(side, "motion_unet", folder, "fp32", work / "motion.npz", outputs[side, "fp32"])
    rows = []
    for precision in sorted(precisions, key=PRECISIONS.index):
        runs = alternate(f"motion UNet {MOTION_FRAMES} frames {8 * MOTION_LATENT} {precision}", sides, repeats,
                         lambda side: measure_network(side, "motion_unet", folder, precision, work / "motion.npz",
                                                      outputs[side, precision]))
        row = summarise({"network": "motion_unet", "latent": MOTION_LATENT, "pixels": 8 * MOTION_LATENT,
                         "frames": MOTION_FRAMES, "batch": 2, "precision": precision, "gflop": flops["total"] / 1e9,
                         "uncounted_ops": flops["uncounted_ops"]}, runs, "diffusers", flops["total"])
        if precision == "fp32" and "reference" in sides:
            row["sdcli_vs_diffusers"] = errors(np.load(outputs["sdcli", "fp32"]), np.load(outputs["reference", "fp32"]))
        if precision != "fp32":
            for side in sides:
                name = "sdcli" if side == "sdcli" else "diffusers"
                row[f"{name}_error_vs_fp32"] = errors(np.load(outputs[side, precision]), np.load(outputs[side, "fp32"]))
        rows.append(row)
    return rows


def measure_process(work: Path, name: str, command: list[str]) -> dict:
    """Wall time and peak memory of ``command`` as a whole process; exits with its stderr if it fails."""
    files = {key: work / f"{name}.{key}" for key in ("result", "stdout", "stderr")}
    run_child(MEASURE_PROCESS, files["result"], files["stdout"], files["stderr"], *command, what=name)
    result = json.loads(files["result"].read_text())
    if result["returncode"]:
        raise SystemExit(f"{name} failed (exit {result['returncode']}):\n{files['stderr'].read_text()[-4000:]}")
    result["stdout"] = files["stdout"].read_text()
    return result


def bench_generate(work: Path, folder: Path, sides: list[str], repeats: int, steps: int, size: int) -> dict:
    """A whole txt2img process per side: fp16 weights, ``steps`` steps of the model's scheduler, guidance 7.5."""
    prompt = PROMPTS[0]
    counter = itertools.count()

    def measure(side: str) -> dict:
        index = next(counter)
        output = work / f"generate-{side}-{index}.png"
        if side in ("sdcli", "sdcli_low_memory"):
            command = [sys.executable, "-m", "sdcli", "generate", "-m", str(folder), "-p", prompt, "--steps",
                       str(steps), "--guidance", "7.5", "--seed", "0", "--precision", "fp16", "-W", str(size),
                       "-H", str(size), "-o", str(output), "--quiet", "--json"]
            if side == "sdcli_low_memory":
                command.append("--low-memory")
            result = measure_process(work, f"{side}-generate-{index}", command)
            record = last_json(result.pop("stdout"))
            timings = record["timings"]
            result.update(generate_s=timings["text_encoding_s"] + timings["denoising_s"] + timings["decode_s"],
                          scheduler=record["parameters"]["sampler"], timings=timings)
        else:
            timings_path = work / f"diffusers-generate-{index}.json"
            command = [sys.executable, "-c", DIFFUSERS_GENERATE, str(folder), prompt, str(steps), str(size),
                       str(output), str(timings_path)]
            result = measure_process(work, f"diffusers-generate-{index}", command)
            result.pop("stdout")
            result.update(json.loads(timings_path.read_text()))
        output.unlink()
        return result

    sides = [sides[0], "sdcli_low_memory", *sides[1:]]  # sdcli as it runs by default and with --low-memory
    runs = alternate(f"txt2img {size}x{size}, {steps} steps", sides, repeats, measure)
    row: dict = {"what": f"txt2img {size}x{size}, {steps} steps, guidance 7.5, fp16 weights", "steps": steps,
                 "pixels": size}
    for side, measured in runs.items():
        name = "diffusers" if side == "reference" else side
        row[f"{name}_wall_s"] = statistics.median(m["wall_s"] for m in measured)
        row[f"{name}_generate_s"] = statistics.median(m["generate_s"] for m in measured)
        row[f"{name}_peak_bytes"] = max(m["peak_bytes"] for m in measured)
        row[f"{name}_scheduler"] = measured[-1]["scheduler"]
    if "reference" in sides:
        row["ratio"] = row["sdcli_wall_s"] / row["diffusers_wall_s"]
        row["low_memory_ratio"] = row["sdcli_low_memory_wall_s"] / row["diffusers_wall_s"]
        row["diffusers_output_finite"] = all(m["finite"] for m in runs["reference"])
    row["runs"] = {("diffusers" if side == "reference" else side): measured for side, measured in runs.items()}
    return row


def bench_video(work: Path, folder: Path, sides: list[str], repeats: int, steps: int = 4) -> dict:
    """A whole text-to-video process per side: 16 frames at 256x256, ``steps`` Euler steps (trailing timesteps,
    linear betas), guidance 1, fp32 weights, an mp4 written."""
    prompt, size = "a corgi running on a beach", 8 * MOTION_LATENT
    adapter = folder / "motion_adapter"
    counter = itertools.count()

    def measure(side: str) -> dict:
        index = next(counter)
        output = work / f"video-{side}-{index}.mp4"
        if side == "sdcli":
            command = [sys.executable, "-m", "sdcli", "video", "-m", str(folder), "--motion-adapter", str(adapter),
                       "-p", prompt, "--frames", str(MOTION_FRAMES), "--steps", str(steps), "--scheduler", "euler",
                       "--timestep-spacing", "trailing", "--guidance", "1", "--seed", "0", "-W", str(size), "-H",
                       str(size), "-o", str(output), "--quiet", "--json"]
            result = measure_process(work, f"sdcli-video-{index}", command)
            record = last_json(result.pop("stdout"))
            timings = record["timings"]
            result.update(generate_s=timings["text_encoding_s"] + timings["denoising_s"] + timings["decode_s"],
                          scheduler=record["parameters"]["sampler"], timings=timings)
        else:
            timings_path = work / f"diffusers-video-{index}.json"
            command = [sys.executable, "-c", DIFFUSERS_VIDEO, str(folder), str(adapter), prompt, str(MOTION_FRAMES),
                       str(steps), str(size), str(output), str(timings_path)]
            result = measure_process(work, f"diffusers-video-{index}", command)
            result.pop("stdout")
            result.update(json.loads(timings_path.read_text()))
        output.unlink()
        return result

    runs = alternate(f"video {MOTION_FRAMES} frames {size}x{size}, {steps} steps", sides, repeats, measure)
    row: dict = {"what": f"text to video, {MOTION_FRAMES} frames at {size}x{size}, {steps} Euler steps, guidance 1, "
                         "fp32 weights", "steps": steps, "pixels": size, "frames": MOTION_FRAMES}
    for side, measured in runs.items():
        name = "diffusers" if side == "reference" else side
        row[f"{name}_wall_s"] = statistics.median(m["wall_s"] for m in measured)
        row[f"{name}_generate_s"] = statistics.median(m["generate_s"] for m in measured)
        row[f"{name}_peak_bytes"] = max(m["peak_bytes"] for m in measured)
        row[f"{name}_scheduler"] = measured[-1]["scheduler"]
    if "reference" in sides:
        row["ratio"] = row["sdcli_wall_s"] / row["diffusers_wall_s"]
        row["diffusers_output_finite"] = all(m["finite"] for m in runs["reference"])
    row["runs"] = {("diffusers" if side == "reference" else side): measured for side, measured in runs.items()}
    return row


# -- report -------------------------------------------------------------------------------------------------------

def gib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f} G"


def num(value: float | None, spec: str, unit: str = "") -> str:
    return "-" if value is None else format(value, spec) + unit


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(header), *(len(row[i]) for row in rows)) for i, header in enumerate(headers)]
    for row in [headers, *rows]:
        print("  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row))
              .rstrip())
    print()


def network_label(row: dict) -> str:
    if row["network"] == "motion_unet":
        return f"UNet+motion {row['frames']}x{row['latent']}x{row['latent']}"
    return f"UNet {row['latent']}x{row['latent']}" if row["network"] == "unet" else f"VAE decode {row['pixels']}"


def report_networks(unet: list[dict], vae: list[dict], motion: list[dict]) -> None:
    """One line per UNet/VAE row: medians, ratio, load, GFLOP/s, peaks; then the FLOP counts and the accuracy."""
    body = [["", "", "", "", "sdcli", "diffusers", "", "sdcli", "diffusers", "sdcli", "diffusers"]]
    for row in unet + vae + motion:
        body.append([f"{network_label(row)} {row['precision']}", num(row["sdcli_s"], ".2f"),
                     num(row.get("diffusers_s"), ".2f"), num(row["ratio"], ".2f"), num(row["sdcli_load_s"], ".2f"),
                     num(row.get("diffusers_load_s"), ".2f"), num(row["gflop"], ".0f"), num(row["sdcli_gflops"], ".0f"),
                     num(row.get("diffusers_gflops"), ".0f"), gib(row["sdcli_peak_bytes"]),
                     gib(row.get("diffusers_peak_bytes"))])
    print_table(["SD1.5, one call, batch 2 (s)", "sdcli", "diffusers", "ratio", "load", "load", "GFLOP", "GFLOP/s",
                 "GFLOP/s", "peak", "peak"], body)
    if unet:
        counted = {row["latent"]: row for row in unet}.values()
        uncounted = sorted({op for row in unet for op in row["uncounted_ops"]})
        print("UNet GFLOP per forward (sdcli's UNet on a counting backend): "
              + ", ".join(f"{row['latent']}x{row['latent']} {row['gflop']:.0f} "
                          f"(attention {row['gflop_by_op']['attention']:.0f})" for row in counted)
              + (f"; not counted: {', '.join(uncounted)}" if uncounted else "") + "\n")
    accuracy = []
    for row in unet + vae + motion:
        if "sdcli_vs_diffusers" in row:
            error = row["sdcli_vs_diffusers"]
            accuracy.append([f"{network_label(row)} fp32", "sdcli vs diffusers", num(error["max_abs"], ".1e"),
                             num(error["relative"], ".1e")])
        for name in ("sdcli", "diffusers"):
            if f"{name}_error_vs_fp32" in row:
                error, precision = row[f"{name}_error_vs_fp32"], row["precision"]
                accuracy.append([f"{network_label(row)} {precision}", f"{name} {precision} vs {name} fp32",
                                 num(error["max_abs"], ".1e"), num(error["relative"], ".1e")])
    if accuracy:
        print_table(["accuracy", "compared", "max |diff|", "relative"], accuracy)


def report_video(row: dict) -> None:
    body = []
    for name in ("sdcli", "diffusers"):
        if f"{name}_wall_s" in row:
            wall, generate = row[f"{name}_wall_s"], row[f"{name}_generate_s"]
            body.append([name, num(wall, ".1f"), num(generate, ".1f"), num(wall - generate, ".1f"),
                         gib(row[f"{name}_peak_bytes"]), row[f"{name}_scheduler"]])
    if row.get("ratio") is not None:
        body.append(["ratio sdcli / diffusers", num(row["ratio"], ".2f"), "", "", "", ""])
    print_table([f"SD1.5 + motion adapter, {row['what']}", "process (s)", "generation (s)", "start+load+save (s)",
                 "peak", "scheduler"], body)


def report_generate(row: dict) -> None:
    body = []
    labels = {"sdcli": "sdcli", "sdcli_low_memory": "sdcli --low-memory", "diffusers": "diffusers"}
    for name, label in labels.items():
        if f"{name}_wall_s" in row:
            wall, generate = row[f"{name}_wall_s"], row[f"{name}_generate_s"]
            body.append([label, num(wall, ".1f"), num(generate, ".1f"), num(wall - generate, ".1f"),
                         gib(row[f"{name}_peak_bytes"]), row[f"{name}_scheduler"]])
    if row.get("ratio") is not None:
        body.append(["ratio sdcli / diffusers", num(row["ratio"], ".2f"), "", "", "", ""])
        body.append(["ratio --low-memory / diffusers", num(row["low_memory_ratio"], ".2f"), "", "", "", ""])
    print_table([f"SD1.5 {row['what']}", "process (s)", "generation (s)", "start+load+save (s)", "peak",
                 "scheduler"], body)
    if row.get("diffusers_output_finite") is False:
        print("warning: diffusers' fp16 image has non-finite values (random weights overflowing fp16)\n")


def report(results: dict) -> None:
    m = results["machine"]
    flags = ", ".join(f"{flag} {'yes' if present else 'no'}" for flag, present in m["flags"].items())
    print(f"{m['cpu']}, {m['cores']} cores; {flags}; sdcli CPU level {m.get('cpu_level', '?')}; {results['date']}")
    print("python " + m["python"] + ", " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()))
    settings = results["settings"]
    runs = f"medians of {settings['repeats']} runs" if settings["repeats"] > 1 else "one run"
    sides = "alternating sdcli and the reference" if settings["reference"] else "sdcli only (no reference run)"
    print(f"{runs} per side, {sides}, each measurement in its own process\n")
    if "gemm_ceiling" in results:
        parts = [f"{kind.replace('_', ' ')} {c['gflops']:.0f} GFLOP/s ({c['threads']} threads)"
                 for kind, c in results["gemm_ceiling"].items()]
        print(f"GEMM ceiling, {GEMM_SIZE}x{GEMM_SIZE}x{GEMM_SIZE}, best of 5: " + "; ".join(parts) + "\n")
    if "text_encoder" in results:
        print_table(["text encoder, batch 2 x 77, fp32", "sdcli", "transformers", "ratio", "max |diff|"],
                    [[row["family"], num(row["sdcli_s"], ".3f", " s"), num(row.get("transformers_s"), ".3f", " s"),
                      num(row["ratio"], ".2f"), num(row.get("max_abs_diff"), ".1e")]
                     for row in results["text_encoder"]])
    if "unet" in results or "vae" in results or "motion_unet" in results:
        report_networks(results.get("unet", []), results.get("vae", []), results.get("motion_unet", []))
    if "video" in results:
        report_video(results["video"])
    if "generate" in results:
        report_generate(results["generate"])
    if "wan" in results:
        from bench_wan import report_wan

        report_wan(results["wan"])
    if "stream" in results:
        from bench_stream import report_stream

        report_stream(results["stream"])
    if "lora" in results:
        from bench_lora import report_lora

        report_lora(results["lora"])


# -- main ---------------------------------------------------------------------------------------------------------

def comma_list(text: str, allowed, convert=str) -> list:
    """``a,b,c`` as a list of ``convert``-ed values, each one of ``allowed`` (None: any positive number)."""
    try:
        values = [convert(part) for part in text.split(",") if part]
    except ValueError:
        values = []
    valid = values and all(value in allowed if allowed is not None else value > 0 for value in values)
    if not valid:
        expected = ", ".join(map(str, allowed)) if allowed is not None else "positive integers"
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {expected}, got {text!r}")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", type=lambda text: comma_list(text, SECTIONS), default=list(SECTIONS),
                        help="Comma-separated sections: text_encoder, unet, vae, motion_unet, video, generate, "
                             "wan_transformer, wan_text_encoder, wan_vae, wan_video, stream, lora "
                             "(default: all).")
    parser.add_argument("--repeats", type=int, default=3, help="Measurements per side (default 3).")
    parser.add_argument("--sizes", type=lambda text: comma_list(text, None, int), default=[32, 64],
                        help="UNet latent sizes (default 32,64: 256 and 512 pixels).")
    parser.add_argument("--precisions", type=lambda text: comma_list(text, PRECISIONS), default=["fp32", "bf16"],
                        help="UNet (and motion UNet) weight precisions: fp32, fp16, bf16 (default fp32,bf16).")
    parser.add_argument("--json", type=Path, help="Also write the results (with every single run) to this file.")
    parser.add_argument("--no-reference", action="store_true",
                        help="sdcli's side only, on weights written by sdcli, even if torch is installed.")
    debug = parser.add_argument_group("quick checks (the benchmark's numbers use the defaults)")
    debug.add_argument("--generate-steps", type=int, default=20, help="Steps of the generate section (default 20).")
    debug.add_argument("--generate-size", type=int, default=512, help="Image side of the generate section.")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the temporary weights are removed

    reference = reference_installed() and not args.no_reference
    if not reference and not args.no_reference:
        print("torch, diffusers and transformers are not installed: measuring sdcli alone\n", file=sys.stderr)
    sides = ["sdcli", "reference"] if reference else ["sdcli"]
    only = args.only
    results: dict = {"date": time.strftime("%Y-%m-%d"), "machine": machine(),
                     "settings": {"only": only, "repeats": args.repeats, "sizes": args.sizes,
                                  "precisions": args.precisions, "generate_steps": args.generate_steps,
                                  "generate_size": args.generate_size, "reference": reference}}
    if {"unet", "vae", "motion_unet", "wan_transformer"} & set(only):
        results["gemm_ceiling"] = gemm_ceilings(reference)
    components = [name for name, wanted in (("text_encoder", {"text_encoder", "video", "generate"}),
                                            ("unet", {"unet", "motion_unet", "video", "generate", "lora"}),
                                            ("vae", {"vae", "video", "generate"}),
                                            ("motion_adapter", {"motion_unet", "video"}))
                  if wanted & set(only)]
    with tempfile.TemporaryDirectory(prefix="sdcli-bench-") as work:
        work = Path(work)
        sd15 = write_model_folder(work / "sd15", "sd15", components, reference) if components else work / "sd15"
        if "text_encoder" in only:
            sd21 = write_model_folder(work / "sd21", "sd21", ["text_encoder"], reference)
            results["text_encoder"] = bench_text_encoder(work, {"sd15": sd15, "sd21": sd21}, sides, args.repeats)
            shutil.rmtree(sd21)
        if "unet" in only:
            results["unet"] = bench_unet(work, sd15, sides, args.repeats, args.sizes, args.precisions)
        if "vae" in only:
            results["vae"] = bench_vae(work, sd15, sides, args.repeats)
        if "lora" in only:
            from bench_lora import bench_lora

            results["lora"] = bench_lora(work, sd15, args.repeats, args.precisions)
        if "motion_unet" in only:
            results["motion_unet"] = bench_motion_unet(work, sd15, sides, args.repeats, args.precisions)
        if "video" in only:
            results["video"] = bench_video(work, sd15, sides, args.repeats)
        if "generate" in only:
            sd15_fp16 = half_copy(sd15, work / "sd15-fp16")
            for component in components:  # the fp32 files are not needed any more
                for path in (sd15 / component).glob("*.safetensors"):
                    path.unlink()
            results["generate"] = bench_generate(work, sd15_fp16, sides, args.repeats, args.generate_steps,
                                                 args.generate_size)
        if set(WAN_SECTIONS) & set(only):
            from bench_wan import bench_wan

            shutil.rmtree(sd15, ignore_errors=True)  # the SD weights are not needed any more
            results["wan"] = bench_wan(work, [name for name in only if name in WAN_SECTIONS], sides, args.repeats,
                                       args.precisions, reference)
        if "stream" in only:
            from bench_stream import bench_stream

            shutil.rmtree(sd15, ignore_errors=True)
            results["stream"] = bench_stream(work, sides, reference)
    report(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
