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

import itertools
import json
import statistics
import sys
from pathlib import Path

import numpy as np

from bench import (alternate, errors, gib, last_json, measure_process, note, num, print_table, run_child,
                   summarise)

WAN_FRAMES, WAN_SIDE = 17, 256  # the clips of the Wan sections: 17 frames at 256x256
WAN_LATENT_FRAMES, WAN_LATENT = 1 + (WAN_FRAMES - 1) // 4, WAN_SIDE // 8
TEXT_TOKENS = 512
# diffusers' WanTransformer3DModel config of Wan-AI/Wan2.1-T2V-1.3B-Diffusers
TRANSFORMER_CONFIG = {"_class_name": "WanTransformer3DModel", "patch_size": [1, 2, 2], "num_attention_heads": 12,
                      "attention_head_dim": 128, "in_channels": 16, "out_channels": 16, "text_dim": 4096,
                      "freq_dim": 256, "ffn_dim": 8960, "num_layers": 30, "cross_attn_norm": True,
                      "qk_norm": "rms_norm_across_heads", "eps": 1e-06, "image_dim": None, "added_kv_proj_dim": None,
                      "rope_max_seq_len": 1024}

# transformers' UMT5EncoderModel config of the same repository (text_encoder/config.json)
TEXT_ENCODER_CONFIG = {"architectures": ["UMT5EncoderModel"], "d_ff": 10240, "d_kv": 64, "d_model": 4096,
                       "decoder_start_token_id": 0, "dense_act_fn": "gelu_new", "dropout_rate": 0.1,
                       "eos_token_id": 1, "feed_forward_proj": "gated-gelu", "is_encoder_decoder": True,
                       "is_gated_act": True, "layer_norm_epsilon": 1e-06, "model_type": "umt5", "num_heads": 64,
                       "num_layers": 24, "pad_token_id": 0, "relative_attention_max_distance": 128,
                       "relative_attention_num_buckets": 32, "scalable_attention": True,
                       "tie_word_embeddings": False, "vocab_size": 256384}
VAE_CONFIG = {"_class_name": "AutoencoderKLWan", "base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4],
              "num_res_blocks": 2, "attn_scales": [], "temperal_downsample": [False, True, True], "dropout": 0.0}
COMPONENTS = ("transformer", "text_encoder", "vae")

# Random weights with the reference libraries' initialisation, saved by them (safetensors) into
# argv[1]/<component> for the components in argv[2]: the transformer and the autoencoder in float32, the text
# encoder in bf16 (11.4 GB; float32 would not fit beside the rest), made in bf16 directly.
REFERENCE_WEIGHTS = """
import json, sys
import diffusers, torch, transformers
folder, components = sys.argv[1], sys.argv[2].split(",")
torch.manual_seed(0)
for name in components:
    config = json.load(open(f"{folder}/{name}/config.json"))
    if name == "transformer":
        model = diffusers.WanTransformer3DModel.from_config(config)
    elif name == "vae":
        model = diffusers.AutoencoderKLWan.from_config(config)
    else:
        torch.set_default_dtype(torch.bfloat16)
        model = transformers.UMT5EncoderModel(transformers.UMT5Config(**config))
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(f"{folder}/{name}")
    del model
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
    elif network == "wan_text_encoder":  # streamed, at its files' precision (bf16 here), as the pipeline runs it
        encoder = wan.load_prompt_encoder(checkpoint, ops).text_encoder
        run = lambda: encoder(inputs["ids"])
    else:
        vae = wan.load_vae(checkpoint, ops, precision)
        run = lambda: vae.decode(vae.denormalize(inputs["latents"]))
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
        elif network == "wan_text_encoder":
            import transformers
            model = transformers.UMT5EncoderModel.from_pretrained(folder, subfolder="text_encoder",
                                                                   dtype=torch.bfloat16).eval()
            ids = torch.from_numpy(inputs["ids"])
            run = lambda: model(input_ids=ids).last_hidden_state
        else:
            model = diffusers.AutoencoderKLWan.from_pretrained(folder, subfolder="vae", torch_dtype=dtype).eval()
            config = model.config
            mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1)
            std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1)
            latents = torch.from_numpy(inputs["latents"]) / std + mean
            run = lambda: model.decode(latents.to(dtype)).sample
        load = time.perf_counter() - start
        _, warmup = timed(run)
        out, elapsed = timed(run)
        out = out.float().numpy()
np.save(output_path, out)
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"load_s": load, "warmup_s": warmup, "run_s": elapsed, "peak_bytes": peak}))
"""


def write_wan_folder(folder: Path, components: list[str], reference: bool) -> Path:
    """A diffusers Wan folder (model_index.json, UniPC scheduler, a UMT5-style tokenizer made by tests/wan_models.py,
    configs) with random weights for ``components``."""
    if not reference:
        raise SystemExit("the Wan sections need torch, diffusers and transformers to write their random weights")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import wan_models

    configs = {"transformer": TRANSFORMER_CONFIG, "text_encoder": TEXT_ENCODER_CONFIG, "vae": VAE_CONFIG}
    for name in components:
        (folder / name).mkdir(parents=True)
        (folder / name / "config.json").write_text(json.dumps(configs[name], indent=2))
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(wan_models.WAN_SCHEDULER, indent=2))
    wan_models.write_tokenizer(folder / "tokenizer")
    index = {"_class_name": "WanPipeline", "scheduler": ["diffusers", "UniPCMultistepScheduler"],
             "tokenizer": ["transformers", "T5TokenizerFast"], "text_encoder": ["transformers", "UMT5EncoderModel"],
             "transformer": ["diffusers", "WanTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    note(f"writing random Wan2.1 weights: {', '.join(components)}")
    run_child(REFERENCE_WEIGHTS, folder, ",".join(components), what="writing the random Wan weights")
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


def bench_wan_transformer(work: Path, folder: Path, sides: list[str], repeats: int,
                          precisions: list[str]) -> list[dict]:
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


def bench_wan_text_encoder(work: Path, folder: Path, sides: list[str], repeats: int) -> dict:
    """UMT5-XXL on one 512-token prompt, bf16 weights (sdcli streams them from the files)."""
    ids = np.random.default_rng(4).integers(5, TEXT_ENCODER_CONFIG["vocab_size"], (1, TEXT_TOKENS))
    ids[0, -1] = 1  # </s>
    np.savez(work / "umt5.npz", ids=ids)
    runs = alternate("UMT5-XXL 512 tokens bf16", sides, repeats, lambda side: measure(
        side, "wan_text_encoder", folder, "bf16", work / "umt5.npz", work / f"umt5-{side}.npy"))
    row = summarise({"network": "wan_text_encoder", "tokens": TEXT_TOKENS, "precision": "bf16"}, runs, "transformers")
    if "reference" in sides:
        row["sdcli_vs_transformers"] = errors(np.load(work / "umt5-sdcli.npy"), np.load(work / "umt5-reference.npy"))
    return row


def bench_wan_vae(work: Path, folder: Path, sides: list[str], repeats: int) -> dict:
    """The Wan VAE decode of 17 frames at 256x256 (5 latent frames of 32x32), fp32."""
    latents = np.random.default_rng(5).standard_normal((1, 16, WAN_LATENT_FRAMES, WAN_LATENT, WAN_LATENT),
                                                       dtype=np.float32)
    np.savez(work / "wan-vae.npz", latents=latents)
    runs = alternate(f"Wan VAE decode {WAN_FRAMES} frames {WAN_SIDE}", sides, repeats, lambda side: measure(
        side, "wan_vae", folder, "fp32", work / "wan-vae.npz", work / f"wan-vae-{side}.npy"))
    row = summarise({"network": "wan_vae", "frames": WAN_FRAMES, "pixels": WAN_SIDE, "precision": "fp32"}, runs,
                    "diffusers")
    if "reference" in sides:
        row["sdcli_vs_diffusers"] = errors(np.load(work / "wan-vae-sdcli.npy"), np.load(work / "wan-vae-reference.npy"))
    return row


# diffusers' Wan text to video as a user runs it: the pipeline in bf16 with the VAE in float32 (diffusers'
# example), generate, export the mp4. argv: folder, prompt, frames, steps, size, output .mp4, timings .json
DIFFUSERS_VIDEO = """
import json, sys, time
start = time.perf_counter()
import numpy as np
import torch
import diffusers
from diffusers.utils import export_to_video
folder, prompt, frames, steps, size, output, timings_path = sys.argv[1:8]
frames, steps, size = int(frames), int(steps), int(size)
loading = time.perf_counter()
vae = diffusers.AutoencoderKLWan.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32)
pipe = diffusers.WanPipeline.from_pretrained(folder, vae=vae, torch_dtype=torch.bfloat16)
pipe.set_progress_bar_config(disable=True)
generating = time.perf_counter()
clip = pipe(prompt, num_frames=frames, num_inference_steps=steps, guidance_scale=5.0, height=size, width=size,
            generator=torch.Generator().manual_seed(0), output_type="np").frames[0]
generated = time.perf_counter()
export_to_video(list(clip), output, fps=16)
with open(timings_path, "w") as handle:
    json.dump({"import_s": loading - start, "load_s": generating - loading, "generate_s": generated - generating,
               "finite": bool(np.isfinite(clip).all())}, handle)
"""


def bench_wan_video(work: Path, folder: Path, sides: list[str], repeats: int, steps: int = 4) -> dict:
    """A whole text-to-video process per side: 17 frames at 256x256, ``steps`` UniPC steps, guidance 5 (with
    Wan's negative prompt), bf16 weights (diffusers' VAE in float32, as its examples load it), an mp4 written."""
    prompt = "a red fox trotting through fresh snow at dawn, cinematic"
    counter = itertools.count()

    def run(side: str) -> dict:
        index = next(counter)
        output = work / f"wan-video-{side}-{index}.mp4"
        if side == "sdcli":
            command = [sys.executable, "-m", "sdcli", "video", "-m", str(folder), "-p", prompt, "--frames",
                       str(WAN_FRAMES), "--steps", str(steps), "--seed", "0", "-W", str(WAN_SIDE), "-H",
                       str(WAN_SIDE), "--precision", "bf16", "-o", str(output), "--quiet", "--json"]
            result = measure_process(work, f"sdcli-wan-video-{index}", command)
            timings = last_json(result.pop("stdout"))["timings"]
            result.update(generate_s=timings["text_encoding_s"] + timings["denoising_s"] + timings["decode_s"],
                          timings=timings)
        else:
            timings_path = work / f"diffusers-wan-video-{index}.json"
            command = [sys.executable, "-c", DIFFUSERS_VIDEO, str(folder), prompt, str(WAN_FRAMES), str(steps),
                       str(WAN_SIDE), str(output), str(timings_path)]
            result = measure_process(work, f"diffusers-wan-video-{index}", command)
            result.pop("stdout")
            result.update(json.loads(timings_path.read_text()))
        output.unlink()
        return result

    runs = alternate(f"Wan video {WAN_FRAMES} frames {WAN_SIDE}, {steps} steps", sides, repeats, run)
    row: dict = {"what": f"text to video, {WAN_FRAMES} frames at {WAN_SIDE}x{WAN_SIDE}, {steps} UniPC steps, "
                         "guidance 5, bf16", "steps": steps}
    for side, measured in runs.items():
        name = "diffusers" if side == "reference" else side
        row[f"{name}_wall_s"] = statistics.median(m["wall_s"] for m in measured)
        row[f"{name}_generate_s"] = statistics.median(m["generate_s"] for m in measured)
        row[f"{name}_peak_bytes"] = max(m["peak_bytes"] for m in measured)
    if "reference" in sides:
        row["ratio"] = row["sdcli_wall_s"] / row["diffusers_wall_s"]
    row["runs"] = {("diffusers" if side == "reference" else side): measured for side, measured in runs.items()}
    return row


def bench_wan(work: Path, only: list[str], sides: list[str], repeats: int, precisions: list[str],
              reference: bool) -> dict:
    """The Wan rows asked for (``wan_transformer``, ``wan_text_encoder``, ``wan_vae``, ``wan_video``), on one
    folder of random weights holding the components they need."""
    needs = {"wan_transformer": ["transformer"], "wan_text_encoder": ["text_encoder"], "wan_vae": ["vae"],
             "wan_video": list(COMPONENTS)}
    components = [name for name in COMPONENTS if any(name in needs[section] for section in only)]
    folder = write_wan_folder(work / "wan", components, reference)
    results: dict = {}
    if "wan_transformer" in only:
        results["transformer"] = bench_wan_transformer(work, folder, sides, repeats, precisions)
    if "wan_text_encoder" in only:
        results["text_encoder"] = bench_wan_text_encoder(work, folder, sides, repeats)
    if "wan_vae" in only:
        results["vae"] = bench_wan_vae(work, folder, sides, repeats)
    if "wan_video" in only:
        results["video"] = bench_wan_video(work, folder, sides, repeats)
    return results


def report_wan(results: dict) -> None:
    if results.get("transformer"):
        report_wan_transformer(results["transformer"])
    body = []
    for key, label in (("text_encoder", f"UMT5-XXL, one {TEXT_TOKENS}-token prompt, bf16"),
                       ("vae", f"VAE decode, {WAN_FRAMES} frames at {WAN_SIDE}x{WAN_SIDE}, fp32")):
        if key in results:
            row = results[key]
            reference_name = "transformers" if key == "text_encoder" else "diffusers"
            error = row.get(f"sdcli_vs_{reference_name}", {}).get("relative")
            body.append([label, num(row["sdcli_s"], ".2f"), num(row.get(f"{reference_name}_s"), ".2f"),
                         num(row["ratio"], ".2f"), num(row["sdcli_load_s"], ".1f"),
                         num(row.get(f"{reference_name}_load_s"), ".1f"), gib(row["sdcli_peak_bytes"]),
                         gib(row.get(f"{reference_name}_peak_bytes")), num(error, ".1e")])
    if body:
        print_table(["Wan2.1, one call (s)", "sdcli", "reference", "ratio", "load", "load", "peak", "peak",
                     "relative diff"], body)
    if "video" in results:
        row = results["video"]
        lines = [[name, num(row[f"{name}_wall_s"], ".1f"), num(row[f"{name}_generate_s"], ".1f"),
                  gib(row[f"{name}_peak_bytes"])] for name in ("sdcli", "diffusers") if f"{name}_wall_s" in row]
        if row.get("ratio") is not None:
            lines.append(["ratio sdcli / diffusers", num(row["ratio"], ".2f"), "", ""])
        print_table([f"Wan2.1 1.3B, {row['what']}", "process (s)", "generation (s)", "peak"], lines)


def report_wan_transformer(rows: list[dict]) -> None:
    body = []
    for row in rows:
        body.append([f"transformer {row['frames']}x{row['pixels']}x{row['pixels']} {row['precision']}",
                     num(row["sdcli_s"], ".2f"), num(row.get("diffusers_s"), ".2f"), num(row["ratio"], ".2f"),
                     num(row["gflop"], ".0f"), num(row["sdcli_gflops"], ".0f"), num(row.get("diffusers_gflops"), ".0f"),
                     gib(row["sdcli_peak_bytes"]), gib(row.get("diffusers_peak_bytes")),
                     num(row.get("sdcli_vs_diffusers", {}).get("relative"), ".1e")])
    print_table(["Wan2.1 1.3B, one call (s)", "sdcli", "diffusers", "ratio", "GFLOP", "GFLOP/s", "GFLOP/s",
                 "peak", "peak", "relative diff"], body)
