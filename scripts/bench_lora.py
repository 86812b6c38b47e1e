"""The LoRA section of scripts/bench.py (``python scripts/bench.py --only lora``): what a LoRA costs the SD1.5
UNet's load, in time and peak memory.

The UNet is the full SD1.5 config with random float32 weights (what ``bench.py`` writes for its other sections);
the LoRA is a realistic kohya LoCon file in float16, rank 32: every attention projection (``to_q``, ``to_k``,
``to_v``, ``to_out.0``), the feed-forward layers, ``proj_in``/``proj_out`` and the resnet convolutions (``conv1``,
``conv2``, ``conv_shortcut``): 250 layers, 61 MB. Each measurement is one fresh process that loads the UNet (with the
LoRA merged, or without) and runs one forward at a 16x16 latent (the prepared weights made, as a first denoising
step makes them); the two kinds alternate (without, with, without, with, ...). Reported: the medians of the load
time, of the first forward, and of the process's peak resident memory (VmHWM), the difference and the ratio.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from bench import gib, last_json, note, num, print_table, run_child

LORA_RANK = 32
LORA_LAYERS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1",
               "conv2", "conv_shortcut")

# argv: unet folder, lora path, rank. Writes a kohya LoRA (fp16) over LORA_LAYERS of the UNet.
WRITE_LORA = """
import sys
import numpy as np
from sdcli.io.checkpoint import open_checkpoint
from sdcli.io.safetensors import save_file
folder, path, rank = sys.argv[1], sys.argv[2], int(sys.argv[3])
layers = sys.argv[4].split(",")
source = open_checkpoint(folder).source("unet")
rng = np.random.default_rng(0)
tensors = {}
for name in source.keys():
    module = name.removesuffix(".weight")
    if not name.endswith(".weight") or not any(module.endswith("." + layer) for layer in layers):
        continue
    shape = tuple(source.shape(name))
    key = "lora_unet_" + module.replace(".", "_")
    fan_in = int(np.prod(shape[1:]))
    tensors[key + ".lora_down.weight"] = (rng.standard_normal((rank, *shape[1:])) / np.sqrt(fan_in)).astype(np.float16)
    tensors[key + ".lora_up.weight"] = (0.01 * rng.standard_normal((shape[0], rank, *(1,) * (len(shape) - 2)))
                                        ).astype(np.float16)
    tensors[key + ".alpha"] = np.array(rank / 2, np.float16)
save_file(path, tensors)
print(len(tensors) // 3)
"""

# argv: unet folder, lora path or "-", precision. Prints {"load_s", "first_call_s", "peak_bytes", "merged"}.
MEASURE = """
import json, sys, time
import numpy as np
import sdcli
from sdcli.families.sd_networks import load_unet
folder, lora, precision = sys.argv[1:4]
loras = [] if lora == "-" else [(lora, 0.8)]
start = time.perf_counter()
unet = load_unet(folder, precision, "cpu", loras=loras)
load = time.perf_counter() - start
rng = np.random.default_rng(0)
sample = rng.standard_normal((1, 4, 16, 16)).astype(np.float32)  # (B, C, h, w)
context = rng.standard_normal((1, 77, 768)).astype(np.float32)  # (B, S, D)
start = time.perf_counter()
unet(sample, np.array([500.0]), context)
first = time.perf_counter() - start
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"load_s": load, "first_call_s": first, "peak_bytes": peak,
                  "merged": len(unet.lora_switch.touched(loras)) if loras else 0}))
"""


def bench_lora(work: Path, unet_folder: Path, repeats: int, precisions: list[str]) -> dict:
    """The LoRA's file, then per precision ``repeats`` measurements without and with it, alternating."""
    path = work / "locon-rank32.safetensors"
    note(f"writing a rank-{LORA_RANK} kohya LoCon LoRA over the SD1.5 UNet")
    layers = int(run_child(WRITE_LORA, unet_folder, path, LORA_RANK, ",".join(LORA_LAYERS),
                           what="writing the LoRA").strip().splitlines()[-1])
    rows = []
    for precision in precisions:
        runs: dict[str, list[dict]] = {"without": [], "with": []}
        for _ in range(repeats):
            for kind, lora in (("without", "-"), ("with", path)):
                note(f"lora: UNet {precision} {kind} the LoRA")
                runs[kind].append(last_json(run_child(MEASURE, unet_folder, lora, precision,
                                                      what=f"the LoRA measurement ({kind}, {precision})")))
        row = {"precision": precision, "merged": runs["with"][0]["merged"], "runs": runs}
        for kind, measured in runs.items():
            for key in ("load_s", "first_call_s", "peak_bytes"):
                row[f"{kind}_{key}"] = statistics.median(m[key] for m in measured)
        rows.append(row)
    return {"layers": layers, "rank": LORA_RANK, "file_bytes": path.stat().st_size, "rows": rows}


def report_lora(result: dict) -> None:
    print(f"\nLoRA on the SD1.5 UNet: kohya LoCon, rank {result['rank']}, {result['layers']} layers, "
          f"{result['file_bytes'] / 1e6:.0f} MB (fp16); load, then one forward at 16x16")
    rows = []
    for row in result["rows"]:
        for key, label, fmt in (("load_s", "load", ".2f"), ("first_call_s", "first forward", ".2f")):
            without, with_ = row[f"without_{key}"], row[f"with_{key}"]
            rows.append([f"{row['precision']} {label}", num(without, fmt, " s"), num(with_, fmt, " s"),
                         num(with_ - without, "+.2f", " s"), num(with_ / without, ".2f")])
        without, with_ = row["without_peak_bytes"], row["with_peak_bytes"]
        rows.append([f"{row['precision']} peak memory", gib(without), gib(with_),
                     f"{(with_ - without) / 2**30:+.2f} GiB", num(with_ / without, ".2f")])
    print_table(["UNet", "without", "with the LoRA", "difference", "ratio"], rows)
