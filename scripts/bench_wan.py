"""The Wan2.1 sections of scripts/bench.py (run them from there: ``python scripts/bench.py --only wan``).

- one transformer step at 256x256, 17 frames (5 latent frames, 1,280 tokens), classifier-free guidance batch 2,
  against 512 text tokens, with the weights held in fp32 and in bf16, against diffusers' ``WanTransformer3DModel``
  (random weights of the 1.3B config);
- the UMT5-XXL encoding of one 512-token prompt with bf16 weights, against transformers' ``UMT5EncoderModel``
  (random weights of the real config, stored in bf16);
- the Wan VAE decode of 17 frames at 256x256 (5 latent frames of 32x32), fp32, against diffusers'
  ``AutoencoderKLWan``.

Each measurement runs in a fresh process (load, one warm-up call, the timed call), the two sides alternating;
medians, ratios and each process's peak memory, as the other sections.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bench import alternate, errors, last_json, note, num, gib, print_table, run_child, summarise

WAN_FRAMES, WAN_SIDE = 17, 256  # the clips of the Wan sections: 17 frames at 256x256
WAN_LATENT_FRAMES, WAN_LATENT = 1 + (WAN_FRAMES - 1) // 4, WAN_SIDE // 8
TEXT_TOKENS = 512
# diffusers' WanTransformer3DModel config of Wan-AI/Wan2.1-T2V-1.3B-Diffusers
TRANSFORMER_CONFIG = {"_class_name": "WanTransformer3DModel", "patch_size": [1, 2, 2], "num_attention_heads": 12,
                      "attention_head_dim": 128, "in_channels": 16, "out_channels": 16, "text_dim": 4096,
                      "freq_dim": 256, "ffn_dim": 8960, "num_layers": 30, "cross_attn_norm": True,
                      "qk_norm": "rms_norm_across_heads", "eps": 1e-06, "image_dim": None, "added_kv_proj_dim": None,
                      "rope_max_seq_len": 1024}

# Random weights with the reference library's initialisation, saved by it (safetensors) into argv[1]/transformer.
REFERENCE_WEIGHTS = """
import json, sys
import diffusers, torch
folder = sys.argv[1]
torch.manual_seed(0)
config = json.load(open(folder + "/transformer/config.json"))
model = diffusers.WanTransformer3DModel.from_config(config)
model.save_pretrained(folder + "/transformer")
"""

# One network call in a fresh process: load, warm-up, the timed call; the output saved.
# argv: side (sdcli | reference), network (wan_transformer), folder, precision, inputs .npz, output .npy.
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
    from sdcli.families import wan
    from sdcli.ops import get_ops
    start = time.perf_counter()
    checkpoint = sdcli.open_checkpoint(folder)
    ops = get_ops("cpu")
    if network == "wan_transformer":
        model = wan.load_transformer(checkpoint, ops, precision)
        context = model.text_context(inputs["text"])  # once per prompt batch, as the pipeline does
        run = lambda: model(inputs["sample"], inputs["timesteps"], context)
    load = time.perf_counter() - start
    with sdcli.memory.reuse_large_arrays(network == "wan_transformer"):  # as the sampling loop runs it
        _, warmup = timed(run)
        out, elapsed = timed(run)
    assert "torch" not in sys.modules
else:
    import torch
    import diffusers
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    with torch.inference_mode():
        start = time.perf_counter()
        if network == "wan_transformer":
            model = diffusers.WanTransformer3DModel.from_pretrained(folder, subfolder="transformer",
                                                                    torch_dtype=dtype).eval()
            sample, text = (torch.from_numpy(inputs[key]).to(dtype) for key in ("sample", "text"))
            timesteps = torch.from_numpy(inputs["timesteps"])
            run = lambda: model(sample, timesteps, text, return_dict=False)[0]
        load = time.perf_counter() - start
        _, warmup = timed(run)
        out, elapsed = timed(run)
        out = out.float().numpy()
np.save(output_path, out)
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"load_s": load, "warmup_s": warmup, "run_s": elapsed, "peak_bytes": peak}))
"""


def write_wan_folder(folder: Path, reference: bool) -> Path:
    """A diffusers Wan folder holding the transformer's config and random float32 weights."""
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    (folder / "transformer" / "config.json").write_text(json.dumps(TRANSFORMER_CONFIG, indent=2))
    if not reference:
        raise SystemExit("the Wan sections need torch and diffusers to write their random weights")
    note("writing random Wan2.1 transformer weights (5.7 GB)")
    run_child(REFERENCE_WEIGHTS, folder, what="writing the random Wan weights")
    return folder


def transformer_flops(batch: int = 2) -> int:
    """Multiply-adds times 2 of one transformer forward at the bench size, counted from the shapes: per block the
    q/k/v/out and cross q/out projections and the feed-forward over the video tokens, self- and cross-attention
    scores and mixes (the text keys and values are computed once per prompt, not per step)."""
    width, ffn, layers = 1536, 8960, 30
    tokens = WAN_LATENT_FRAMES * (WAN_LATENT // 2) ** 2
    per_token = 6 * width * width + 2 * width * ffn + 2 * (tokens + TEXT_TOKENS) * width
    return 2 * batch * layers * tokens * per_token


def measure(side: str, network: str, folder: Path, precision: str, inputs: Path, output: Path) -> dict:
    return last_json(run_child(NETWORK_SIDE, side, network, folder, precision, inputs, output,
                               what=f"{side} {network} {precision}"))


def bench_wan_transformer(work: Path, sides: list[str], repeats: int, precisions: list[str],
                          reference: bool) -> list[dict]:
    folder = write_wan_folder(work / "wan", reference)
    rng = np.random.default_rng(3)
    np.savez(work / "wan.npz",
             sample=rng.standard_normal((2, 16, WAN_LATENT_FRAMES, WAN_LATENT, WAN_LATENT), dtype=np.float32),
             timesteps=np.array([999.0, 999.0], dtype=np.float32),
             text=rng.standard_normal((2, TEXT_TOKENS, 4096), dtype=np.float32))
    flops = transformer_flops()
    outputs = {(side, precision): work / f"wan-{side}-{precision}.npy" for side in sides for precision in precisions}
    rows = []
    for precision in precisions:
        runs = alternate(f"Wan transformer {WAN_FRAMES} frames {WAN_SIDE} {precision}", sides, repeats,
                         lambda side: measure(side, "wan_transformer", folder, precision, work / "wan.npz",
                                              outputs[side, precision]))
        row = summarise({"network": "wan_transformer", "frames": WAN_FRAMES, "pixels": WAN_SIDE, "batch": 2,
                         "precision": precision, "gflop": flops / 1e9}, runs, "diffusers", flops)
        if "reference" in sides:
            row["sdcli_vs_diffusers"] = errors(np.load(outputs["sdcli", precision]),
                                               np.load(outputs["reference", precision]))
        rows.append(row)
    return rows


def report_wan(rows: list[dict]) -> None:
    body = []
    for row in rows:
        body.append([f"transformer {row['frames']}x{row['pixels']}x{row['pixels']} {row['precision']}",
                     num(row["sdcli_s"], ".2f"), num(row.get("diffusers_s"), ".2f"), num(row["ratio"], ".2f"),
                     num(row["gflop"], ".0f"), num(row["sdcli_gflops"], ".0f"), num(row.get("diffusers_gflops"), ".0f"),
                     gib(row["sdcli_peak_bytes"]), gib(row.get("diffusers_peak_bytes")),
                     num(row.get("sdcli_vs_diffusers", {}).get("relative"), ".1e")])
    print_table(["Wan2.1 1.3B, one call (s)", "sdcli", "diffusers", "ratio", "GFLOP", "GFLOP/s", "GFLOP/s",
                 "peak", "peak", "relative diff"], body)
