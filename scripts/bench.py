"""sdcli's benchmark: sdcli against the reference implementation, measured in one run on this machine.

It times, on the full architectures with random weights, in float32:

- the CLIP text encoder (batch 2 x 77 tokens) of SD1 and SD2, against transformers;
- one SD1.5 UNet forward (latent 64x64, batch 2: one classifier-free-guided step at 512x512), against diffusers;
- one SD1.5 VAE decode of a 512x512 image, against diffusers;

alternating the two sides (A B A B ...) and quoting medians, their ratio and, for the UNet and VAE, the peak
resident memory of each side. Every sdcli measurement runs in a fresh process without torch loaded (two OpenMP
runtimes in one process fight over the cores), and so does every UNet/VAE reference measurement, so that each
process's peak memory is its own.

    python scripts/bench.py [--only text_encoder,unet,vae] [--repeats 5] [--json bench-results/bench.json]

torch, transformers and diffusers are needed for the reference side and for making the random weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def machine() -> dict:
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version()}


# One sdcli measurement in a fresh process: load, one warm-up encode, then the timed encode.
SDCLI_SIDE = """
import sys, time
import numpy as np
import sdcli
encoder = sdcli.load_prompt_encoder(sys.argv[1])
ids = np.load(sys.argv[2])
encoder.text_encoder(ids)
start = time.perf_counter()
out = encoder.text_encoder(ids)
elapsed = time.perf_counter() - start
np.save(sys.argv[3], out)
assert "torch" not in sys.modules
print(elapsed)
"""


def bench_text_encoder(family: str, repeats: int) -> dict:
    import torch

    import reference_models as ref
    from sdcli.nn.tokenizer import ClipTokenizer

    configs = ROOT / "sdcli" / "data" / "configs" / family
    text_config = json.loads((configs / "text_encoder" / "config.json").read_text())
    model = ref.random_clip_text_model(text_config, seed=0)
    ids = ClipTokenizer.from_folder(configs / "tokenizer")(["a photograph of an astronaut riding a horse",
                                                            "a watercolor painting of a fox in the snow"])  # (2, 77)
    with tempfile.TemporaryDirectory() as folder:
        path = ref.write_diffusers_folder(Path(folder) / family, configs, text_config, ref.canonical_state(model))
        np.save(Path(folder) / "ids.npy", ids)
        torch_ids = torch.from_numpy(ids)
        ours_times, reference_times = [], []
        with torch.inference_mode():
            theirs = model(input_ids=torch_ids).last_hidden_state.numpy()  # warm up
            for _ in range(repeats):
                result = subprocess.run([sys.executable, "-c", SDCLI_SIDE, str(path), str(Path(folder) / "ids.npy"),
                                         str(Path(folder) / "ours.npy")], capture_output=True, text=True, check=True)
                ours_times.append(float(result.stdout))
                start = time.perf_counter()
                model(input_ids=torch_ids)
                reference_times.append(time.perf_counter() - start)
        ours = np.load(Path(folder) / "ours.npy")
    ours_median, reference_median = statistics.median(ours_times), statistics.median(reference_times)
    return {"family": family, "batch": "2 x 77 tokens", "sdcli_s": ours_median, "transformers_s": reference_median,
            "ratio": ours_median / reference_median, "max_abs_diff": float(np.abs(ours - theirs).max()),
            "torch_threads": torch.get_num_threads()}


# One UNet forward or VAE decode in a fresh process: load, time one call, report seconds and peak RSS.
# argv: side (sdcli | diffusers), network (unet | vae), model folder, inputs .npz, output .npy
NETWORK_SIDE = """
import resource, sys, time
import numpy as np
side, network, folder, inputs_path, output_path = sys.argv[1:6]
inputs = dict(np.load(inputs_path))
if side == "sdcli":
    import sdcli
    from sdcli.nn.unet import UNet2DConditionModel, unet_shapes
    from sdcli.nn.vae import load_vae_decoder
    from sdcli.ops import get_ops
    from sdcli.pipeline import load_weights
    checkpoint = sdcli.open_checkpoint(folder)
    if network == "unet":
        config = checkpoint.unet_config()
        unet = UNet2DConditionModel(get_ops("cpu"), config, load_weights(checkpoint.source("unet"),
                                                                         unet_shapes(config), "fp32"))
        run = lambda: unet(inputs["sample"], inputs["timesteps"], inputs["context"])
    else:
        decoder = load_vae_decoder(checkpoint)
        run = lambda: decoder(inputs["latents"])
    start = time.perf_counter()
    out = run()
    elapsed = time.perf_counter() - start
    assert "torch" not in sys.modules
else:
    import diffusers, torch
    with torch.inference_mode():
        if network == "unet":
            model = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
            args = [torch.from_numpy(inputs[k]) for k in ("sample", "timesteps", "context")]
            run = lambda: model(args[0], args[1], encoder_hidden_states=args[2]).sample
        else:
            model = diffusers.AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
            latents = torch.from_numpy(inputs["latents"]) / model.config.scaling_factor
            run = lambda: model.decode(latents).sample
        start = time.perf_counter()
        out = run().numpy()
        elapsed = time.perf_counter() - start
np.save(output_path, out)
try:  # this process's own peak: VmHWM starts afresh at exec, while ru_maxrss keeps the forking parent's
    peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
except OSError:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS
print(elapsed, peak)
"""


# The SD1.5 UNet and VAE with random weights (diffusers' initialisation), saved into argv[1]/{unet,vae}; run in a
# child process so that this one stays small.
WRITE_RANDOM_WEIGHTS = """
import sys
import diffusers, torch
folder = sys.argv[1]
torch.manual_seed(0)
for name, cls in (("unet", diffusers.UNet2DConditionModel), ("vae", diffusers.AutoencoderKL)):
    model = cls.from_config(cls.load_config(folder + "/" + name))
    model.save_pretrained(folder + "/" + name, safe_serialization=True)
    del model
"""


def write_sd15_unet_vae(folder: Path) -> Path:
    """The SD1.5 configs with a random-weight UNet and VAE, in a folder both sdcli and diffusers open."""
    import shutil

    shutil.copytree(ROOT / "sdcli" / "data" / "configs" / "sd15", folder)
    subprocess.run([sys.executable, "-c", WRITE_RANDOM_WEIGHTS, str(folder)], check=True)
    return folder


def bench_networks(networks: list[str], repeats: int) -> list[dict]:
    """The SD1.5 UNet forward (latent 64x64, batch 2) and the 512x512 VAE decode, each side in its own process."""
    rng = np.random.default_rng(0)
    inputs = {"unet": {"sample": rng.standard_normal((2, 4, 64, 64), dtype=np.float32),
                       "timesteps": np.array([500.0, 500.0], dtype=np.float32),
                       "context": rng.standard_normal((2, 77, 768), dtype=np.float32)},
              "vae": {"latents": rng.standard_normal((1, 4, 64, 64), dtype=np.float32)}}
    labels = {"unet": "UNet forward, latent 64x64, batch 2", "vae": "VAE decode, 512x512"}
    rows = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        folder = write_sd15_unet_vae(work / "sd15")
        for network in networks:
            np.savez(work / f"{network}.npz", **inputs[network])
            runs: dict[str, list[tuple[float, int]]] = {"sdcli": [], "diffusers": []}
            for _ in range(repeats):
                for side in ("sdcli", "diffusers"):
                    result = subprocess.run([sys.executable, "-c", NETWORK_SIDE, side, network, str(folder),
                                             str(work / f"{network}.npz"), str(work / f"{side}.npy")],
                                            capture_output=True, text=True)
                    if result.returncode:
                        raise SystemExit(f"{side} {network} failed:\n{result.stderr}")
                    seconds, peak = result.stdout.split()
                    runs[side].append((float(seconds), int(peak)))
            ours, theirs = np.load(work / "sdcli.npy"), np.load(work / "diffusers.npy")
            row = {"network": network, "what": labels[network]}
            for side, measured in runs.items():
                row[f"{side}_s"] = statistics.median(t for t, _ in measured)
                row[f"{side}_peak_bytes"] = max(p for _, p in measured)
            row["ratio"] = row["sdcli_s"] / row["diffusers_s"]
            row["relative_error"] = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="text_encoder,unet,vae", help="Comma-separated: text_encoder, unet, vae.")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="Also write the results to this JSON file.")
    args = parser.parse_args()
    only = args.only.split(",")
    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d")}
    print(f"{results['machine']['cpu']}, {results['machine']['cores']} cores, {results['date']}")
    if "text_encoder" in only:
        results["text_encoder"] = [bench_text_encoder(family, args.repeats) for family in ("sd15", "sd21")]
        print(f"{'text encoder':<14}{'sdcli (s)':>11}{'transformers (s)':>18}{'ratio':>8}{'max |diff|':>12}")
        for row in results["text_encoder"]:
            print(f"{row['family']:<14}{row['sdcli_s']:>11.3f}{row['transformers_s']:>18.3f}{row['ratio']:>8.2f}"
                  f"{row['max_abs_diff']:>12.2e}")
    networks = [name for name in ("unet", "vae") if name in only]
    if networks:
        results["networks"] = bench_networks(networks, args.repeats)
        print(f"{'SD1.5, fp32':<38}{'sdcli (s)':>10}{'diffusers (s)':>15}{'ratio':>7}{'sdcli peak':>12}"
              f"{'diffusers peak':>16}{'rel. error':>12}")
        for row in results["networks"]:
            print(f"{row['what']:<38}{row['sdcli_s']:>10.2f}{row['diffusers_s']:>15.2f}{row['ratio']:>7.2f}"
                  f"{row['sdcli_peak_bytes'] / 2**30:>10.2f} G{row['diffusers_peak_bytes'] / 2**30:>14.2f} G"
                  f"{row['relative_error']:>12.1e}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
