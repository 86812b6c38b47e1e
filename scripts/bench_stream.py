"""The streaming section of scripts/bench.py (``python scripts/bench.py --only stream``).

At 256x256 with Wan2.1-1.3B-shaped random weights (the Self-Forcing generator has the same shapes), bf16:

- sdcli streaming, Self-Forcing's settings (chunks of 3 latent frames: 9 frames, then 12; 4 steps; a window of 21
  latent frames): the time to the first frame, the steady frames per second (after the first chunk), and the
  process's peak memory after 1, 4 and 16 chunks, all from one run of 16 chunks (189 frames);
- a non-streaming Wan2.1 run of 4 chunks' length (45 frames, 4 UniPC steps, no guidance, as few-step models run):
  its first frame comes with its last;
- diffusers' SkyReels-V2 diffusion forcing (``SkyReelsV2DiffusionForcingPipeline``, the same random transformer
  with blocks of 3 latent frames, synchronous, 4 steps, no guidance) for the same 45 frames: it returns the
  whole clip at the end.

The text is a random (1, 512, 4096) embedding on every side (the UMT5 encoder is measured in the wan_text_encoder
section); the VAE runs in float32 on every side. Each measurement is one fresh process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench import gib, last_json, note, num, print_table, run_child
from bench_wan import write_wan_folder

STREAM_SIDE, STREAM_CHUNKS, SHORT_CHUNKS = 256, 16, 4
SHORT_FRAMES = 9 + 12 * (SHORT_CHUNKS - 1)  # 45

# argv: kind (stream | wan | skyreels), folder, chunks or frames, precision. Prints one JSON line.
CHILD = """
import json, sys, time
import numpy as np
kind, folder, count, precision = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
side = int(sys.argv[5]) if len(sys.argv) > 5 else 256
text_dim = json.load(open(f"{folder}/transformer/config.json"))["text_dim"]

def peak():
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))

text = np.random.default_rng(0).standard_normal((1, 512, text_dim)).astype(np.float32) * 0.1
start = time.perf_counter()
if kind == "skyreels":
    import torch, diffusers
    with torch.inference_mode():
        transformer = diffusers.SkyReelsV2Transformer3DModel.from_pretrained(
            folder, subfolder="skyreels_transformer", torch_dtype=torch.bfloat16)
        vae = diffusers.AutoencoderKLWan.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32)
        scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                      flow_shift=5.0)
        pipe = diffusers.SkyReelsV2DiffusionForcingPipeline(tokenizer=None, text_encoder=None, transformer=transformer,
                                                            vae=vae, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        load = time.perf_counter() - start
        begin = time.perf_counter()
        clip = pipe(prompt=None, prompt_embeds=torch.from_numpy(text).to(torch.bfloat16), num_frames=count, height=side,
                    width=side, num_inference_steps=4, guidance_scale=1.0, base_num_frames=count, ar_step=0,
                    causal_block_size=3, generator=torch.Generator().manual_seed(0), output_type="np").frames[0]
        elapsed = time.perf_counter() - begin
    print(json.dumps({"load_s": load, "first_frame_s": elapsed, "total_s": elapsed, "frames": int(clip.shape[0]),
                      "peak_bytes": peak(), "finite": bool(np.isfinite(clip).all())}))
    sys.exit(0)

import sdcli
from sdcli.families import wan
from sdcli.ops import get_ops
checkpoint = sdcli.open_checkpoint(folder)
ops = get_ops("cpu")
transformer = wan.load_transformer(checkpoint, ops, precision)
vae = wan.load_vae(checkpoint, ops, "fp32")
load = time.perf_counter() - start
if kind == "stream":
    from sdcli.pipelines.streaming import StreamingVideo
    from sdcli.sampling.few_step import few_step_schedule
    video = StreamingVideo(transformer, vae, few_step_schedule(), frames_per_chunk=3, max_attention_frames=21)
    chunks, begin, frames = [], time.perf_counter(), 0
    for record in video.stream(text, height=side, width=side, seeds=[0], chunks=count):
        if isinstance(record, sdcli.ChunkFrames):
            frames += record.frames.shape[1]
            chunks.append({"frames": frames, "elapsed_s": time.perf_counter() - begin, "peak_bytes": peak(),
                           "finite": bool(np.isfinite(record.frames).all())})
    print(json.dumps({"load_s": load, "chunks": chunks}))
else:
    class Embeddings:  # the prompt encoder's interface, giving the random embedding
        def encode(self, texts):
            return np.repeat(text, len(texts), axis=0)
    pipeline = sdcli.WanTextToVideo(checkpoint, Embeddings(), transformer, vae, wan.scheduler_config(checkpoint),
                                    "cpu", precision)
    params = sdcli.VideoParams("random", "", frames=count, steps=4, guidance_scale=1.0, width=side, height=side,
                               seed=0)
    begin = time.perf_counter()
    result = [record for record in pipeline.run(params) if isinstance(record, sdcli.GeneratedVideo)][0]
    elapsed = time.perf_counter() - begin
    print(json.dumps({"load_s": load, "first_frame_s": elapsed, "total_s": elapsed,
                      "frames": int(result.frames.shape[1]), "peak_bytes": peak(),
                      "finite": bool(np.isfinite(result.frames).all())}))
"""


def write_skyreels_transformer(folder: Path) -> None:
    """The Wan transformer's weights as a SkyReels-V2 transformer with causal blocks of 3 latent frames (the same
    tensor names): its config beside links to the weight files."""
    target = folder / "skyreels_transformer"
    target.mkdir(exist_ok=True)
    config = json.loads((folder / "transformer" / "config.json").read_text())
    config = {key: value for key, value in config.items() if not key.startswith("_")}
    config.update(_class_name="SkyReelsV2Transformer3DModel", num_frame_per_block=3)
    (target / "config.json").write_text(json.dumps(config, indent=2))
    for weights in (folder / "transformer").glob("*.safetensors*"):
        link = target / weights.name
        if not link.exists():
            link.symlink_to(weights.resolve())


def measure(kind: str, folder: Path, count: int, precision: str = "bf16") -> dict:
    note(f"stream: {kind} {count}")
    return last_json(run_child(CHILD, kind, folder, count, precision, what=f"stream {kind}"))


def bench_stream(work: Path, sides: list[str], reference: bool) -> dict:
    """The streaming rows (see the module's docstring)."""
    folder = write_wan_folder(work / "wan-stream", ["transformer", "vae"], reference)
    results: dict = {"stream": measure("stream", folder, STREAM_CHUNKS),
                     "wan": measure("wan", folder, SHORT_FRAMES)}
    if "reference" in sides:
        write_skyreels_transformer(folder)
        results["skyreels"] = measure("skyreels", folder, SHORT_FRAMES)
    return results


def report_stream(results: dict) -> None:
    chunks = results["stream"]["chunks"]
    first = chunks[0]

    def rate(last: dict) -> float:  # frames per second after the first chunk
        return (last["frames"] - first["frames"]) / (last["elapsed_s"] - first["elapsed_s"])

    short = chunks[SHORT_CHUNKS - 1]
    rows = [[f"sdcli streaming, {len(chunks)} chunks ({chunks[-1]['frames']} frames)",
             num(first["elapsed_s"], ".1f"), num(rate(chunks[-1]), ".3f"), num(chunks[-1]["elapsed_s"], ".1f"),
             gib(chunks[-1]["peak_bytes"])],
            [f"sdcli streaming, its first {SHORT_CHUNKS} chunks ({short['frames']} frames)",
             num(first["elapsed_s"], ".1f"), num(rate(short), ".3f"), num(short["elapsed_s"], ".1f"),
             gib(short["peak_bytes"])]]
    for key, label in (("wan", f"sdcli Wan2.1, not streamed, {SHORT_FRAMES} frames, 4 UniPC steps"),
                       ("skyreels", f"diffusers SkyReels-V2 DF, {SHORT_FRAMES} frames, 4 steps")):
        if key in results:
            row = results[key]
            rows.append([label, num(row["first_frame_s"], ".1f"), num(row["frames"] / row["total_s"], ".3f"),
                         num(row["total_s"], ".1f"), gib(row["peak_bytes"])])
    print_table([f"streaming at {STREAM_SIDE}x{STREAM_SIDE}, bf16", "first frame (s)", "frames/s", "total (s)",
                 "peak"], rows)
    marks = [count for count in (1, 4, 7, 10, 16) if count <= len(chunks)]
    print_table(["sdcli streaming: peak after chunk", *map(str, marks)],
                [["process peak", *(gib(chunks[count - 1]["peak_bytes"]) for count in marks)],
                 ["frames so far", *(str(chunks[count - 1]["frames"]) for count in marks)]])


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    work = Path(sys.argv[1])
    work.mkdir(parents=True, exist_ok=True)
    outcome = bench_stream(work, ["sdcli", "reference"], True)
    print(json.dumps(outcome))
    report_stream(outcome)
