"""The ``sdcli`` command line: parses options, calls the public API, prints results and owns output files.

No maths here. Errors a user can cause arrive as ``SdcliError`` and are printed as one line with exit code 2.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import sys
from pathlib import Path

import click
import numpy as np
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

import sdcli
from sdcli.registry import BACKENDS, BETA_SCHEDULES, PRECISIONS, TIMESTEP_SPACINGS

console = Console()
error_console = Console(stderr=True)


def fail(message: str, exit_code: int = 2) -> None:
    """Print one error line on stderr and exit."""
    error_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    sys.exit(exit_code)


def reports_errors(command):
    """Turn the errors a user can cause into one line and an exit code, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except sdcli.SdcliError as error:
            fail(str(error), error.exit_code)
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except MemoryError:
            fail("out of memory; try --precision fp16 or bf16, or a smaller batch", 1)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(sdcli.__version__, prog_name="sdcli")
@click.option("-v", "--verbose", is_flag=True, help="Log what sdcli does (to stderr).")
def main(verbose: bool) -> None:
    """Text to image with Stable Diffusion models, on the CPU, without PyTorch."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=error_console, show_path=False)])


# -- clip-test ---------------------------------------------------------------------------------------------------

def embedding_stats(embeddings: np.ndarray) -> dict[str, float]:
    values = embeddings.astype(np.float64)
    return {"min": float(values.min()), "max": float(values.max()), "mean": float(values.mean()),
            "std": float(values.std())}


@main.command("clip-test")
@click.option("--model", "-m", required=True, help="A diffusers folder or a single-file .safetensors checkpoint.")
@click.option("--prompt", "-p", "prompts", multiple=True, required=True, help="A prompt (repeat for a batch).")
@click.option("--negative-prompt", "-n", help="Also encode this negative prompt.")
@click.option("--clip-skip", type=click.IntRange(min=1), default=1, show_default=True,
              help="1 uses every text-encoder layer, 2 stops at the penultimate one (as AUTOMATIC1111 counts).")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
              help="How weights are held in memory; the arithmetic stays float32 on the CPU.")
@click.option("--backend", type=click.Choice(BACKENDS), default="cpu", show_default=True,
              help="Op implementations: compiled kernels (cpu) or the numpy reference.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (all 77 ids of every prompt).")
@click.option("--save", type=click.Path(dir_okay=False), help="Write the (batch, 77, dim) embedding to FILE.npy.")
@click.option("--overwrite", is_flag=True, help="Replace the --save file if it exists.")
@reports_errors
def clip_test(model, prompts, negative_prompt, clip_skip, precision, backend, as_json, save, overwrite):
    """Tokenize and encode prompts with a model's CLIP text encoder and summarise the result."""
    if save:
        save = sdcli.check_output(save, overwrite)
    checkpoint = sdcli.open_checkpoint(model)
    encoder = sdcli.load_prompt_encoder(checkpoint, precision=precision, backend=backend)
    texts = list(prompts) + ([negative_prompt] if negative_prompt is not None else [])
    tokenized = encoder.tokenize(texts)
    embeddings = encoder.encode(texts, clip_skip=clip_skip)  # (B, 77, D)
    if save:
        sdcli.save_array(save, embeddings, overwrite=overwrite)
    report = {
        "model": sdcli.describe(checkpoint),
        "precision": precision,
        "backend": backend,
        "clip_skip": clip_skip,
        "prompts": [{"text": text, "role": "negative" if negative_prompt is not None and i == len(prompts)
                     else "prompt", "token_count": t.length, "truncated_tokens": t.truncated,
                     "ids": t.ids.tolist()} for i, (text, t) in enumerate(zip(texts, tokenized))],
        "shape": list(embeddings.shape),
        "stats": embedding_stats(embeddings),
        "timings": {"load_s": round(encoder.timings["load_s"], 4), "encode_s": round(encoder.timings["encode_s"], 4)},
        "saved": str(save) if save else None,
    }
    if as_json:
        click.echo(json.dumps(report))
        return
    print_clip_report(report)


def print_clip_report(report: dict) -> None:
    model = report["model"]
    console.print(f"[bold]{model['path']}[/]  {model['layout']}, {model['family']}, {model['prediction_type']}; "
                  f"weights held as {report['precision']}, backend {report['backend']}, "
                  f"clip skip {report['clip_skip']}", highlight=False)
    table = Table(show_header=True, header_style="bold")
    for column in ("#", "role", "prompt", "tokens", "first ids"):
        table.add_column(column, overflow="fold")
    for i, prompt in enumerate(report["prompts"]):
        tokens = str(prompt["token_count"])
        if prompt["truncated_tokens"]:
            tokens += f" ([yellow]{prompt['truncated_tokens']} cut[/])"
        first = " ".join(str(x) for x in prompt["ids"][:min(prompt["token_count"], 8)])
        table.add_row(str(i), prompt["role"], prompt["text"], tokens, first)
    console.print(table)
    stats = report["stats"]
    console.print(f"embedding {tuple(report['shape'])} float32: min {stats['min']:.4f}  max {stats['max']:.4f}  "
                  f"mean {stats['mean']:.4f}  std {stats['std']:.4f}", highlight=False)
    timings = report["timings"]
    console.print(f"load {timings['load_s']:.2f} s, encode {timings['encode_s']:.3f} s", highlight=False)
    if report["saved"]:
        console.print(f"saved {report['saved']}", highlight=False)


# -- noise-test --------------------------------------------------------------------------------------------------

def key_timesteps(train_steps: int) -> list[int]:
    """t = 0, 1, then every tenth of the schedule, and the last."""
    points = {0, min(1, train_steps - 1), train_steps - 1}
    points.update(round(train_steps * k / 10) - 1 for k in range(1, 10))
    return sorted(t for t in points if 0 <= t < train_steps)


@main.command("noise-test")
@click.option("--model", "-m", help="Read the scheduler config of this model (options below override it).")
@click.option("--schedule", type=click.Choice(BETA_SCHEDULES), help="Beta schedule [default: scaled_linear].")
@click.option("--beta-start", type=click.FloatRange(min=0, min_open=True, max=1), help="[default: 0.00085]")
@click.option("--beta-end", type=click.FloatRange(min=0, min_open=True, max=1), help="[default: 0.012]")
@click.option("--train-steps", type=click.IntRange(min=1, max=100_000), help="Training timesteps [default: 1000].")
@click.option("--steps", type=click.IntRange(min=1), help="Show the timesteps of an N-step inference run.")
@click.option("--spacing", type=click.Choice(TIMESTEP_SPACINGS), help="Inference timestep spacing [default: leading].")
@click.option("--steps-offset", type=click.IntRange(min=0), help="Added to 'leading' timesteps [default: 1 for SD].")
@click.option("--json", "as_json", is_flag=True, help="Print every value for all training timesteps as JSON.")
@reports_errors
def noise_test(model, schedule, beta_start, beta_end, train_steps, steps, spacing, steps_offset, as_json):
    """Show a noise schedule: betas, alphas, alpha_bar, sigmas, and inference timesteps."""
    base = sdcli.open_checkpoint(model).scheduler_config() if model else sdcli.SchedulerConfig(steps_offset=1)
    overrides = {"beta_schedule": schedule, "beta_start": beta_start, "beta_end": beta_end,
                 "num_train_timesteps": train_steps, "timestep_spacing": spacing, "steps_offset": steps_offset}
    config = dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
    if config.beta_schedule != "squaredcos_cap_v2" and config.beta_start > config.beta_end:
        raise sdcli.SdcliError(f"--beta-start {config.beta_start} is above --beta-end {config.beta_end}")
    schedule_tables = sdcli.NoiseSchedule.from_config(config)
    timesteps = sdcli.inference_timesteps(config, steps) if steps else None
    if as_json:
        click.echo(json.dumps(noise_report(config, schedule_tables, timesteps)))
        return
    print_noise_table(config, schedule_tables, timesteps)


def noise_report(config, tables, timesteps) -> dict:
    alphas_cumprod = tables.alphas_cumprod
    report = {
        "config": dataclasses.asdict(config),
        "betas": tables.betas.tolist(),
        "alphas": tables.alphas.tolist(),
        "alphas_cumprod": alphas_cumprod.tolist(),
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod).tolist(),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1 - alphas_cumprod).tolist(),
        "sigmas": tables.sigmas.tolist(),
        "final_alpha_cumprod": tables.final_alpha_cumprod,
    }
    if timesteps is not None:
        report["timesteps"] = timesteps.tolist()
        report["timestep_sigmas"] = tables.sigmas[timesteps].tolist()
    return report


def print_noise_table(config, tables, timesteps) -> None:
    console.print(f"[bold]{config.beta_schedule}[/] betas {config.beta_start:g} -> {config.beta_end:g}, "
                  f"{config.num_train_timesteps} training timesteps, prediction {config.prediction_type}",
                  highlight=False)
    rows = timesteps.tolist() if timesteps is not None else key_timesteps(config.num_train_timesteps)
    title = (f"{len(rows)} inference steps, {config.timestep_spacing} spacing"
             + (f", offset {config.steps_offset}" if config.timestep_spacing == "leading" else "")
             if timesteps is not None else "key timesteps")
    table = Table(title=title, header_style="bold", caption="ab = alpha_bar = prod(alpha); "
                  "sigma = sqrt((1 - ab) / ab)")
    for column in ("t", "beta", "alpha", "alpha_bar", "sqrt(ab)", "sqrt(1-ab)", "sigma"):
        table.add_column(column, justify="right")
    for t in rows:
        alpha_bar = float(tables.alphas_cumprod[t])
        table.add_row(str(t), f"{tables.betas[t]:.5g}", f"{tables.alphas[t]:.6f}", f"{alpha_bar:.6f}",
                      f"{alpha_bar ** 0.5:.6f}", f"{(1 - alpha_bar) ** 0.5:.6f}", f"{tables.sigmas[t]:.6g}")
    console.print(table)


# -- commands that arrive later ----------------------------------------------------------------------------------

def not_implemented(name: str) -> None:
    fail(f"'sdcli {name}' is not implemented yet in sdcli {sdcli.__version__}")


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def download():
    """Download a model's weights from the Hugging Face Hub into ./weights (not implemented yet)."""
    not_implemented("download")


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def generate():
    """Generate images from a text prompt and save them as PNG (not implemented yet)."""
    not_implemented("generate")


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def video():
    """Generate a short video from a text prompt and save it as MP4 (not implemented yet)."""
    not_implemented("video")
