"""Tiny random Wan2.1 models for the tests: a SentencePiece-style UMT5 tokenizer built with the tokenizers library,
and a whole diffusers ``WanPipeline`` (UMT5 encoder, transformer, autoencoder, UniPC over flow sigmas) of the tiny
configs diffusers' own Wan tests use, saved as a diffusers folder that sdcli opens; the same for SkyReels-V2's
``SkyReelsV2DiffusionForcingPipeline``. torch, transformers and diffusers are imported by the functions that use
them."""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = ["a photograph of an astronaut riding a horse on the moon", "the quick brown fox jumps over the lazy dog",
          "a red fox trotting through fresh snow at dawn, cinematic", "waves breaking on a rocky shore at dusk",
          "Bright tones, overexposed, static, blurred details, subtitles, worst quality, low quality"]
# The scheduler of Wan-AI/Wan2.1-T2V-1.3B-Diffusers (scheduler/scheduler_config.json)
WAN_SCHEDULER = {"_class_name": "UniPCMultistepScheduler", "beta_end": 0.02, "beta_schedule": "linear",
                 "beta_start": 0.0001, "disable_corrector": [], "dynamic_thresholding_ratio": 0.995,
                 "final_sigmas_type": "zero", "flow_shift": 3.0, "lower_order_final": True,
                 "num_train_timesteps": 1000, "predict_x0": True, "prediction_type": "flow_prediction",
                 "rescale_betas_zero_snr": False, "sample_max_value": 1.0, "solver_order": 2, "solver_p": None,
                 "solver_type": "bh2", "steps_offset": 0, "thresholding": False, "timestep_spacing": "linspace",
                 "trained_betas": None, "use_beta_sigmas": False, "use_exponential_sigmas": False,
                 "use_flow_sigmas": True, "use_karras_sigmas": False}
# diffusers' tests/pipelines/wan/test_wan.py: the transformer (16 channels, text 32), the autoencoder
TINY_TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                        out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                        qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
TINY_VAE = dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
TINY_UMT5 = dict(d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, relative_attention_num_buckets=32,
                 relative_attention_max_distance=128, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new",
                 is_gated_act=True, layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def write_tokenizer(folder: Path, corpus: list[str] = CORPUS, vocab_size: int = 300) -> Path:
    """A tokenizer.json laid out as UMT5's (<pad> 0, </s> 1, <s> 2, <unk> 3; a Unigram model; NFKC standing in for
    SentencePiece's precompiled normaliser; Metaspace; the ``$A </s>`` post-processor; the <extra_id_N> sentinels)
    and its tokenizer_config.json, in ``folder``, trained on ``corpus``."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from tokenizers.trainers import UnigramTrainer

    tokenizer = Tokenizer(Unigram())
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<s>", "<unk>"],
                             unk_token="<unk>")
    tokenizer.train_from_iterator(corpus * 20, trainer)
    tokenizer.add_special_tokens([f"<extra_id_{i}>" for i in range(99, -1, -1)])
    tokenizer.post_processor = processors.TemplateProcessing(single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"],
                                                             special_tokens=[("</s>", 1)])
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "T5Tokenizer", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
        "extra_ids": 100, "additional_special_tokens": [f"<extra_id_{i}>" for i in range(100)]}))
    return folder


def tiny_wan_networks(folder: Path, seed: int, transformer_class, transformer_config: dict) -> dict:
    """The tokenizer, UMT5 encoder, transformer (``transformer_class(**transformer_config)``) and autoencoder of a
    tiny random Wan pipeline. Norm scales and biases are random too, so that one read from the wrong tensor shows."""
    import torch
    import transformers
    from diffusers import AutoencoderKLWan

    import reference_models as ref

    tokenizer_folder = write_tokenizer(folder.with_name(folder.name + "-tokenizer-source"))
    tokenizer = transformers.T5TokenizerFast(tokenizer_file=str(tokenizer_folder / "tokenizer.json"))
    generator = torch.Generator().manual_seed(seed + 100)
    torch.manual_seed(seed)
    text_encoder = transformers.UMT5EncoderModel(transformers.UMT5Config(
        vocab_size=len(tokenizer), **TINY_UMT5)).eval()
    transformer = transformer_class(**transformer_config).eval()
    vae = AutoencoderKLWan(**TINY_VAE).eval()
    ref.randomise_norms(text_encoder, generator, is_norm=lambda name: "layer_norm" in name, bias_scale=None)
    ref.randomise_norms(transformer, generator, bias_scale=0.05)
    ref.randomise_norms(vae, generator, is_norm=lambda name: "gamma" in name, bias_scale=0.05)
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae)


def make_tiny_wan(folder: Path, seed: int = 0):
    """A tiny random ``WanPipeline`` saved as a diffusers folder at ``folder``; returns the reference pipeline."""
    from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    networks = tiny_wan_networks(folder, seed, WanTransformer3DModel, TINY_TRANSFORMER)
    pipeline = WanPipeline(**networks, scheduler=UniPCMultistepScheduler.from_config(WAN_SCHEDULER))
    pipeline.set_progress_bar_config(disable=True)
    pipeline.save_pretrained(folder)
    return pipeline


# SkyReels-V2 DF: the tiny Wan transformer with the frame-rate embedding, UniPC at the examples' flow shift
TINY_SKYREELS_TRANSFORMER = dict(TINY_TRANSFORMER, inject_sample_info=True)
SKYREELS_SCHEDULER = dict(WAN_SCHEDULER, flow_shift=8.0)


def make_tiny_skyreels(folder: Path, seed: int = 0):
    """A tiny random ``SkyReelsV2DiffusionForcingPipeline`` (the networks of :func:`make_tiny_wan`, the transformer a
    ``SkyReelsV2Transformer3DModel`` with the frame-rate embedding) saved as a diffusers folder at ``folder``;
    returns the reference pipeline."""
    from diffusers import SkyReelsV2DiffusionForcingPipeline, SkyReelsV2Transformer3DModel, UniPCMultistepScheduler

    networks = tiny_wan_networks(folder, seed, SkyReelsV2Transformer3DModel, TINY_SKYREELS_TRANSFORMER)
    pipeline = SkyReelsV2DiffusionForcingPipeline(**networks,
                                                  scheduler=UniPCMultistepScheduler.from_config(SKYREELS_SCHEDULER))
    pipeline.set_progress_bar_config(disable=True)
    pipeline.save_pretrained(folder)
    return pipeline


def random_state(build, seed: int = 0, scale: float = 0.2) -> dict:
    """Random float32 weights for every tensor ``build(params)`` takes (``sdcli.io.weights.tensor_shapes``),
    without any reference library: normal with a standard deviation of ``scale / sqrt(fan-in)`` for matrices and
    kernels, around 1 for norm scales, small for the rest."""
    import numpy as np

    from sdcli.io.weights import tensor_shapes

    rng = np.random.default_rng(seed)
    state = {}
    for name, shape in sorted(tensor_shapes(build).items()):
        values = rng.standard_normal(shape)
        if len(shape) >= 2:
            values *= scale / np.sqrt(np.prod(shape[1:]))
        elif "norm" in name or name.endswith("gamma"):
            values = 1.0 + 0.1 * values
        else:
            values *= 0.05
        state[name] = values.astype(np.float32)
    return state


def make_tiny_streaming(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """A tiny Wan2.1 diffusers folder (UMT5 encoder, tokenizer, transformer, VAE: the configs above) and a causal
    generator file in the original Wan layout under Self-Forcing's ``model.`` prefix, all random, written with
    sdcli alone (no reference library). Returns (base folder, generator file)."""
    from sdcli.config import WanTransformerConfig
    from sdcli.families.wan_names import WRAPPER_PREFIX, wan_transformer_names
    from sdcli.io.safetensors import save_file
    from sdcli.nn.dit_wan import WanTransformer3DModel
    from sdcli.nn.t5 import T5Config, T5Encoder
    from sdcli.nn.vae_wan import WanAutoencoder, WanVAEConfig

    tokenizer_source = write_tokenizer(folder.with_name(folder.name + "-tokenizer-source"))
    (folder / "tokenizer").mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_source / name).is_file():
            (folder / "tokenizer" / name).write_bytes((tokenizer_source / name).read_bytes())
    vocab = len(json.loads((tokenizer_source / "tokenizer.json").read_text())["model"]["vocab"])
    text_config = {"model_type": "umt5", "vocab_size": vocab, **TINY_UMT5}
    transformer_config = {"_class_name": "WanTransformer3DModel", **TINY_TRANSFORMER}
    vae_config = {"_class_name": "AutoencoderKLWan", **TINY_VAE}
    configs = {"text_encoder": text_config, "transformer": transformer_config, "vae": vae_config,
               "scheduler": WAN_SCHEDULER}
    index = {"_class_name": "WanPipeline", "scheduler": ["diffusers", "UniPCMultistepScheduler"],
             "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
             "transformer": ["diffusers", "WanTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    for component, config in configs.items():
        (folder / component).mkdir(parents=True, exist_ok=True)
        name = "scheduler_config.json" if component == "scheduler" else "config.json"
        (folder / component / name).write_text(json.dumps(config))
    transformer = WanTransformerConfig.from_diffusers(TINY_TRANSFORMER)
    builders = {
        "text_encoder/model.safetensors": lambda params: T5Encoder(params, T5Config.from_dict(text_config)),
        "transformer/diffusion_pytorch_model.safetensors":
            lambda params: WanTransformer3DModel(params, transformer),
        "vae/diffusion_pytorch_model.safetensors":
            lambda params: WanAutoencoder(params, WanVAEConfig.from_dict(TINY_VAE)),
    }
    for number, (path, build) in enumerate(builders.items()):
        save_file(folder / path, random_state(build, seed + number))
    names = wan_transformer_names(transformer, WRAPPER_PREFIX)
    state = random_state(lambda params: WanTransformer3DModel(params, transformer), seed + 10)
    generator = folder.with_name(folder.name + "-generator.safetensors")
    save_file(generator, {names[name].name: value for name, value in state.items()})
    return folder, generator
