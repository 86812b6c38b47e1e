"""Make the golden end-to-end case of tests/test_golden.py: a tiny SD 1.x checkpoint and the PNG diffusers draws
from it (run once, with the test extra installed; the files it writes are committed).

    python tests/make_golden.py            # writes tests/data/golden/

The checkpoint has the real SD 1.x architecture (CLIP text encoder, UNet with cross-attention, KL VAE) at a
tiny width, random weights (seeded), the real SD 1.5 scheduler and tokenizer configs, and fp16 weight files (a
float32 run of either implementation widens them exactly, so both compute on the same values). The tokenizer
tables are left out: sdcli falls back to the CLIP tables it ships, and this script hands diffusers the same.
The expected PNG is what diffusers' StableDiffusionPipeline makes in float32 from the initial noise that
``sdcli generate --seed SEED`` draws (sdcli's own numpy generator, passed as ``latents=``), saved through
diffusers' own image post-processing.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
FOLDER = HERE / "data" / "golden"
MODEL = FOLDER / "tiny-sd1"
CASE_FILE = FOLDER / "case.json"

# What the golden test runs: `sdcli generate` with these settings (the model's own scheduler, PNDM, and size).
CASE = {
    "prompt": "a lighthouse on a cliff at dusk, oil painting",
    "negative_prompt": "blurry",
    "seed": 42,
    "steps": 12,
    "guidance": 7.5,
    "width": 64,
    "height": 64,
    "expected": "expected.png",
}

# The real vocabulary (49408 tokens) makes the token embedding the largest tensor: 4 wide, 395 kB in fp16.
TEXT_CONFIG = dict(vocab_size=49408, hidden_size=4, intermediate_size=16, num_hidden_layers=2,
                   num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                   projection_dim=4, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
UNET_CONFIG = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=4, attention_head_dim=2,
                   norm_num_groups=4)
VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                  block_out_channels=(8, 8, 16, 16), norm_num_groups=4, sample_size=64,
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def build_pipeline(seed: int = 0):
    import diffusers
    import torch
    import transformers

    sys.path.insert(0, str(HERE))
    from data_paths import CONFIGS
    from reference_models import randomise_norms
    from sdcli.nn.tokenizer import shipped_tokenizer_dir

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT_CONFIG)).eval()
    unet = diffusers.UNet2DConditionModel(**UNET_CONFIG).eval()
    vae = diffusers.AutoencoderKL(**VAE_CONFIG).eval()
    for model in (text_encoder, unet, vae):
        randomise_norms(model, generator)
        with torch.no_grad():  # the weights as stored: fp16 values, held in float32
            for parameter in model.parameters():
                parameter.copy_(parameter.half().float())
    tables = shipped_tokenizer_dir()
    tokenizer = transformers.CLIPTokenizer(str(tables / "vocab.json"), str(tables / "merges.txt"),
                                           pad_token="<|endoftext|>", model_max_length=77)
    configs = CONFIGS / "sd15"
    scheduler = diffusers.PNDMScheduler.from_config(
        json.loads((configs / "scheduler" / "scheduler_config.json").read_text()))
    pipeline = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                                 scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False)
    return pipeline, configs


def save_model(pipeline, configs: Path) -> None:
    if MODEL.exists():
        shutil.rmtree(MODEL)
    pipeline.save_pretrained(str(MODEL), safe_serialization=True)
    for component in ("text_encoder", "unet", "vae"):  # fp16 files: exact, since the values are fp16's
        for path in (MODEL / component).glob("*.safetensors"):
            from safetensors.numpy import load_file, save_file

            tensors = load_file(str(path))
            save_file({name: value.astype(np.float16) for name, value in tensors.items()}, str(path),
                      metadata={"format": "pt"})
    shutil.copy(configs / "scheduler" / "scheduler_config.json", MODEL / "scheduler" / "scheduler_config.json")
    for path in (MODEL / "tokenizer").iterdir():  # the tables: sdcli ships the same CLIP vocabulary and merges
        path.unlink()
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(configs / "tokenizer" / name, MODEL / "tokenizer" / name)


def expected_image(pipeline) -> None:
    import torch

    from sdcli.rng import BatchNoise

    noise = BatchNoise([CASE["seed"]], (4, CASE["height"] // 8, CASE["width"] // 8)).draw()
    with torch.no_grad():
        image = pipeline(prompt=CASE["prompt"], negative_prompt=CASE["negative_prompt"],
                         num_inference_steps=CASE["steps"], guidance_scale=CASE["guidance"],
                         latents=torch.from_numpy(noise), height=CASE["height"], width=CASE["width"],
                         output_type="pil").images[0]
    image.save(FOLDER / CASE["expected"])


def main() -> None:
    import diffusers
    import torch
    import transformers

    FOLDER.mkdir(parents=True, exist_ok=True)
    pipeline, configs = build_pipeline()
    save_model(pipeline, configs)
    expected_image(pipeline)
    made_with = {"diffusers": diffusers.__version__, "transformers": transformers.__version__,
                 "torch": torch.__version__}
    CASE_FILE.write_text(json.dumps({**CASE, "made_with": made_with}, indent=2) + "\n")
    size = sum(path.stat().st_size for path in MODEL.rglob("*") if path.is_file())
    print(f"wrote {MODEL} ({size / 1e3:.0f} kB) and {FOLDER / CASE['expected']}")


if __name__ == "__main__":
    main()
