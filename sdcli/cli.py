"""The ``sdcli`` command line: parses options, calls the public API, prints results and owns output files.

No maths and no planning here: it uses nothing of sdcli but the public API (``import sdcli``). Errors a user can
cause arrive as ``SdcliError`` and are printed as one line with the error's exit code (2; 3 for a Hub token that is
missing or refused).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import sys
import time
from pathlib import Path

import click
import numpy as np
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

import sdcli

console = Console(soft_wrap=True)  # lines a script reads are never broken at the terminal width
error_console = Console(stderr=True, soft_wrap=True)


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


class FiniteFloat(click.FloatRange):
    """A float option that must be a finite number (click's FloatRange lets nan and inf through)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


class OneLineErrors(click.Group):
    """Usage errors (a bad option value, a missing argument) as one ``error:`` line with exit code 2, like every
    other error a user can cause, instead of click's usage block."""

    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False
        try:
            return super().main(*args, **kwargs)
        except click.exceptions.Abort:
            fail("interrupted", 130)
        except click.ClickException as error:
            command = f"sdcli {error.ctx.info_name}" if getattr(error, "ctx", None) and error.ctx.parent else "sdcli"
            hint = f"; see '{command} --help'" if isinstance(error, click.UsageError) else ""
            message = error.format_message().replace("\n", " ")
            fail((message.rstrip(".") if hint else message) + hint, error.exit_code)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(sdcli.__version__, prog_name="sdcli")
@click.option("-v", "--verbose", is_flag=True, help="Log what sdcli does (to stderr).")
def main(verbose: bool) -> None:
    """Text to image with Stable Diffusion models, on the CPU, without PyTorch."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=error_console, show_path=False)])


def model_options(command):
    """--clip-skip, --precision and --backend: how a model is loaded and its text encoded, for every command."""
    options = [
        click.option("--clip-skip", type=click.IntRange(min=1), default=1, show_default=True,
                     help="1 uses every text-encoder layer, 2 stops at the penultimate one (as AUTOMATIC1111 "
                          "counts)."),
        click.option("--precision", type=click.Choice(sdcli.PRECISIONS), default="fp32", show_default=True,
                     help="Weights held as fp32, fp16 (computed in float32) or bf16 (bf16 products with float32 "
                          "sums where the CPU has bf16 instructions)."),
        click.option("--backend", type=click.Choice(sdcli.BACKENDS), default="cpu", show_default=True,
                     help="Op implementations: compiled kernels (cpu) or the numpy reference."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


MODEL_HELP = (f"A diffusers folder, a single-file .safetensors checkpoint, a preset ({', '.join(sdcli.MODEL_PRESETS)}) "
              "or a Hub repo id (org/name), looked up in ./weights (or $SDCLI_WEIGHTS) and the Hugging Face cache.")


def download_options(command):
    """--yes and --offline: what a command may do when its model is a preset or repo id not yet downloaded."""
    options = [
        click.option("--yes", "-y", is_flag=True,
                     help="Download a missing preset or repo id without asking (also $SDCLI_AUTO_DOWNLOAD=1)."),
        click.option("--offline", is_flag=True,
                     help="Never touch the network (also $HF_HUB_OFFLINE=1): a missing model is an error."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def embedding_options(command):
    """--embedding and --embedding-dir: textual-inversion embeddings that prompts call by name."""
    options = [
        click.option("--embedding", "embedding_files", multiple=True, type=click.Path(dir_okay=False),
                     metavar="FILE", help="A textual-inversion embedding (.safetensors), called in prompts by its "
                                          "name: the file's stem, or the token a diffusers file carries (repeat for "
                                          "more)."),
        click.option("--embedding-dir", "embedding_dirs", multiple=True, type=click.Path(file_okay=False),
                     metavar="DIR", help="Load every .safetensors embedding in DIR (repeatable)  [default: "
                                         "<weights>/embeddings where it exists]"),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def is_interactive() -> bool:
    """A person at a terminal can answer a question: stdin and stderr are both terminals."""
    return sys.stdin.isatty() and sys.stderr.isatty()


def model_path(model: str, *, yes: bool = False, offline: bool = False, quiet: bool = False,
               resolve=sdcli.resolve_model) -> str:
    """The path a --model argument names (a --motion-adapter one with ``resolve=sdcli.resolve_motion_adapter``); a
    preset or repo id not on this machine is downloaded with --yes (or $SDCLI_AUTO_DOWNLOAD=1) or when the person at
    the terminal agrees, and is an error naming the download command otherwise."""
    confirm = (lambda question: click.confirm(question, default=False, err=True)) if is_interactive() else None
    progress = None if quiet else DownloadReport(error_console)
    try:
        return str(resolve(model, allow_download=yes or sdcli.auto_download(), offline=True if offline else None,
                           confirm=confirm, progress=progress))
    finally:
        if progress is not None:
            progress.close()


# -- clip-test ---------------------------------------------------------------------------------------------------

def embedding_stats(embeddings: np.ndarray) -> dict[str, float]:
    values = embeddings.astype(np.float64)
    return {"min": float(values.min()), "max": float(values.max()), "mean": float(values.mean()),
            "std": float(values.std())}


@main.command("clip-test")
@click.option("--model", "-m", required=True, help=MODEL_HELP)
@click.option("--prompt", "-p", "prompts", multiple=True, required=True, help="A prompt (repeat for a batch).")
@click.option("--negative-prompt", "-n", help="Also encode this negative prompt.")
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (all 77 ids of every prompt).")
@click.option("--save", type=click.Path(dir_okay=False), help="Write the (batch, 77, dim) embedding to FILE.npy.")
@click.option("--overwrite", is_flag=True, help="Replace the --save file if it exists.")
@download_options
@reports_errors
def clip_test(model, prompts, negative_prompt, clip_skip, precision, backend, as_json, save, overwrite, yes, offline):
    """Tokenize and encode prompts with a model's CLIP text encoder and summarise the result."""
    if save:
        save = sdcli.check_output(save, overwrite)
    checkpoint = sdcli.open_checkpoint(model_path(model, yes=yes, offline=offline))
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
@click.option("--schedule", type=click.Choice(sdcli.BETA_SCHEDULES), help="Beta schedule [default: scaled_linear].")
@click.option("--beta-start", type=FiniteFloat(min=0, min_open=True, max=1), help="[default: 0.00085]")
@click.option("--beta-end", type=FiniteFloat(min=0, min_open=True, max=1), help="[default: 0.012]")
@click.option("--train-steps", type=click.IntRange(min=1, max=100_000), help="Training timesteps [default: 1000].")
@click.option("--steps", type=click.IntRange(min=1), help="Show the timesteps of an N-step inference run.")
@click.option("--spacing", type=click.Choice(sdcli.TIMESTEP_SPACINGS),
              help="Inference timestep spacing [default: leading].")
@click.option("--steps-offset", type=click.IntRange(min=0), help="Added to 'leading' timesteps [default: 1 for SD].")
@click.option("--json", "as_json", is_flag=True, help="Print every value for all training timesteps as JSON.")
@reports_errors
def noise_test(model, schedule, beta_start, beta_end, train_steps, steps, spacing, steps_offset, as_json):
    """Show a noise schedule: betas, alphas, alpha_bar, sigmas, and inference timesteps."""
    base = sdcli.open_checkpoint(model).config("scheduler") if model else sdcli.SchedulerConfig(steps_offset=1)
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


# -- download ----------------------------------------------------------------------------------------------------

@main.command()
@click.argument("model", required=False)
@click.option("--revision", help="A branch, tag or commit of the repository  [default: the preset's, or main]")
@click.option("--variant", type=click.Choice(sdcli.VARIANTS),
              help="fp16 / bf16: the half-size weight files where the repository has them; fp32: the plain ones  "
                   "[default: the preset's; fp16 for a repo id]")
@click.option("--include", multiple=True, metavar="GLOB",
              help="Fetch the repository files matching GLOB instead of the ones sdcli reads (repeatable).")
@click.option("--dir", "directory", type=click.Path(file_okay=False),
              help="The weights folder  [default: $SDCLI_WEIGHTS, else ./weights]")
@click.option("--token", help="Hugging Face access token for gated repositories  [default: $HF_TOKEN, else the "
                              "token file the Hugging Face tools store]")
@click.option("--endpoint", help="The Hub, or a mirror of it  [default: $HF_ENDPOINT, else https://huggingface.co]")
@click.option("--quiet", "-q", is_flag=True, help="No progress and no summary; errors only.")
@click.option("--list", "list_presets", is_flag=True, help="List the presets and exit.")
@reports_errors
def download(model, revision, variant, include, directory, token, endpoint, quiet, list_presets):
    """Download a preset (sdcli download --list) or a Hub repo id (org/name) into ./weights/NAME: only the files
    sdcli reads, resumed when interrupted, verified against the Hub's checksums."""
    if list_presets:
        print_presets()
        return
    if not model:
        raise click.UsageError("give a preset or a Hub repo id (org/name), or --list")
    reporter = None if quiet else DownloadReport(error_console)
    try:
        outcome = sdcli.download_model(model, weights_dir=directory, revision=revision, variant=variant,
                                       include=include, token=token, endpoint=endpoint, progress=reporter)
    finally:
        if reporter is not None:
            reporter.close()
    if not quiet:
        console.print(outcome.summary(), highlight=False, soft_wrap=True)


def print_presets() -> None:
    """The presets, models then motion adapters, as aligned columns, never wrapped or cut (scripts read them too)."""
    rows = [("name", "for", "repository", "layout", "variant", "size", "license")]
    for option, presets in (("--model", sdcli.PRESETS), ("--motion-adapter", sdcli.MOTION_ADAPTER_PRESETS)):
        rows += [(p.name, option, p.repo_id, p.layout, p.variant or ("-" if p.layout == "single-file" else "fp32"),
                  sdcli.format_size(p.size_bytes), p.license)
                 for p in presets.values()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    click.echo("Sizes are approximate, with the default variant. 'sdcli download NAME' fetches one into "
               "./weights/NAME; WEIGHTS.md describes each.")


class DownloadReport:
    """Download progress on stderr: per-file and overall bars (bytes, rate, time left) on a terminal, one line per
    file otherwise. Implements the hub's progress calls, plus ``begin`` for the overall total."""

    def __init__(self, out: Console):
        self.out = out
        self.bar = None
        self.sizes: dict[str, int | None] = {}
        self.done: dict[str, int] = {}  # bytes of each file on disk so far (resumed ones included)
        self.tasks: dict[str, int] = {}

    def begin(self, files) -> None:
        self.sizes = {f.path: f.size for f in files}
        if self.out.is_terminal:
            from rich.progress import (BarColumn, DownloadColumn, Progress as Bar, TextColumn, TimeRemainingColumn,
                                       TransferSpeedColumn)

            self.bar = Bar(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                           TimeRemainingColumn(), console=self.out)
            self.bar.start()
            sizes = list(self.sizes.values())
            self.overall = self.bar.add_task(f"{len(files)} files",
                                             total=sum(sizes) if None not in sizes else None)

    def start_file(self, path: str, total: int | None, already: int) -> None:
        if total is not None:
            self.sizes[path] = total
        self.done[path] = already  # called again with 0 when a server ignores a Range and the file starts over
        if self.bar is not None:
            if path not in self.tasks:
                self.tasks[path] = self.bar.add_task(path, total=total)
            self.bar.update(self.tasks[path], completed=already)
            self.bar.update(self.overall, completed=sum(self.done.values()))

    def advance(self, path: str, nbytes: int) -> None:
        self.done[path] = self.done.get(path, 0) + nbytes
        if self.bar is not None:
            if path in self.tasks:
                self.bar.update(self.tasks[path], completed=self.done[path])
            self.bar.update(self.overall, completed=sum(self.done.values()))

    def finish_file(self, path: str, skipped: bool) -> None:
        size = self.sizes.get(path)
        if self.bar is not None:
            task = self.tasks.pop(path, None)
            if task is not None:
                self.bar.remove_task(task)
            return
        what = "skipped" if skipped else "fetched"
        why = " (already present)" if skipped else f" ({sdcli.format_size(size)})" if size is not None else ""
        self.out.print(f"{what} {path}{why}", highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


# -- convert -----------------------------------------------------------------------------------------------------

@main.command()
@click.argument("source", metavar="IN")
@click.argument("target", metavar="OUT.safetensors")
@click.option("--key", "-k", help="The dict of tensors to convert, a dotted path for a nested one (generator_ema, "
                                  "state_dict, a.b)  [default: the top level, or the one key holding tensors]")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--quiet", "-q", is_flag=True, help="No progress and no summary; errors only.")
@reports_errors
def convert(source, target, key, overwrite, quiet):
    """Convert a PyTorch checkpoint (.pt .pth .ckpt .bin, the zip torch.save writes) to safetensors, without torch
    and without running code from the file: only tensors and plain containers are read, anything else is refused.
    Nested dicts are flattened with dots; values that are not tensors are skipped."""
    reporter = None if quiet else ConvertReport(error_console)
    try:
        result = sdcli.convert_checkpoint(source, target, key=key, overwrite=overwrite, progress=reporter)
    finally:
        if reporter is not None:
            reporter.close()
    if quiet:
        return
    dtypes = ", ".join(f"{code} {count}" for code, count in sorted(result.dtypes.items()))
    picked = f" (key {result.key})" if result.key is not None else ""
    console.print(f"wrote {result.target}: {result.tensors} tensors, {sdcli.format_size(result.nbytes)} ({dtypes}) "
                  f"from {result.source.name}{picked}", highlight=False, soft_wrap=True)
    if result.skipped:
        names = ", ".join(result.skipped[:5]) + (f" and {len(result.skipped) - 5} more" if len(result.skipped) > 5
                                                 else "")
        console.print(f"skipped {len(result.skipped)} value(s) that are not tensors: {names}", highlight=False,
                      soft_wrap=True)


class ConvertReport:
    """Conversion progress on stderr: a bytes bar on a terminal for files worth watching, nothing otherwise."""

    MIN_BYTES = 256 * 2**20

    def __init__(self, out: Console):
        self.out = out
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            if not self.out.is_terminal or total < self.MIN_BYTES:
                return
            from rich.progress import (BarColumn, DownloadColumn, Progress as Bar, TextColumn, TimeRemainingColumn,
                                       TransferSpeedColumn)

            self.bar = Bar(TextColumn("converting"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                           TimeRemainingColumn(), console=self.out, transient=True)
            self.bar.start()
            self.task = self.bar.add_task("converting", total=total)
        self.bar.update(self.task, completed=done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


# -- video -------------------------------------------------------------------------------------------------------

FORCING_ONLY = ("--base-num-frames, --overlap-history, --ar-step, --causal-block-size and --addnoise-condition "
                "apply to SkyReels-V2 diffusion forcing models (skyreels-v2-df-1.3b-540p)")
LOW_MEMORY_UNET_FRAMES = 4  # video --low-memory: frames through the UNet's spatial layers at a time


@main.command()
@click.option("--model", "-m", default="sd15", show_default=True,
              help=MODEL_HELP + " A video model (wan21-t2v-1.3b), or an SD 1.x model animated by --motion-adapter.")
@click.option("--motion-adapter",
              help="For an SD 1.x model, an AnimateDiff motion adapter: a preset (" +
                   ", ".join(sdcli.MOTION_ADAPTER_PRESETS) + "), a diffusers MotionAdapter folder, a .safetensors "
                   "motion module in diffusers' or the original names, or a Hub repo id, looked up as --model is. A "
                   "preset brings its sampler, steps and guidance.")
@click.option("--prompt", "-p", help="What to animate.")
@click.option("--negative-prompt", "-n",
              help="What to steer away from  [default: none; Wan: Wan's own negative prompt]")
@click.option("--prompts-file", type=click.Path(dir_okay=False),
              help="One clip per line: a prompt, optionally followed by --seed/--steps/--frames/--fps/... overrides.")
@click.option("--frames", type=click.IntRange(min=1),
              help="Frames of the clip  [default: 16; Wan: 81, and Wan makes 4k+1 frames] (AnimateDiff adapters make "
                   "up to 32 at once, more with --context-length).")
@click.option("--fps", type=click.IntRange(min=1), help="Frames per second  [default: 8; Wan: 16]")
@click.option("--flow-shift", type=FiniteFloat(min=0, min_open=True),
              help="Flow-matching models (Wan): the shift of the noise schedule  [default: the model's, 3.0 for "
                   "Wan2.1 at 480p; its authors use 5.0 at 720p]")
@click.option("--context-length", type=click.IntRange(min=1),
              help="AnimateDiff: make clips longer than the adapter's window with FreeNoise: its motion modules "
                   "attend over overlapping windows of this many frames (16 is usual).")
@click.option("--context-stride", type=click.IntRange(min=1), default=4, show_default=True,
              help="Frames between the starts of two FreeNoise windows.")
@click.option("--context-weighting", type=click.Choice(sdcli.CONTEXT_WEIGHTINGS), default="pyramid",
              show_default=True, help="How the windows' outputs for a frame are averaged.")
@click.option("--steps", "-s", type=click.IntRange(min=1),
              help="Denoising steps  [default: the adapter preset's (animatediff-lightning 4, animatelcm 6), else 50]")
@click.option("--guidance", "--cfg-scale", "-g", type=FiniteFloat(min=0),
              help="Classifier-free guidance scale; 1 or less turns guidance off  [default: the adapter preset's "
                   "(animatediff-lightning 1, animatelcm 1.5), Wan 5, else 7.5]")
@click.option("--scheduler", "--sampler", "sampler", type=click.Choice(sdcli.SAMPLERS),
              help="Sampler  [default: the adapter preset's (animatediff-lightning euler, animatelcm lcm), else ddim "
                   "with AnimateDiff's settings (linear betas, linspace timesteps); Wan: unipc (also euler, heun, "
                   "dpmpp_2m)]")
@click.option("--timestep-spacing", type=click.Choice(sdcli.TIMESTEP_SPACINGS),
              help="AnimateDiff: timestep spacing  [default: linspace; animatediff-lightning: trailing]")
@click.option("--eta", type=FiniteFloat(min=0), default=0.0, help="DDIM's noise (0: deterministic).")
@click.option("--seed", type=click.IntRange(0, sdcli.MAX_SEED), help="Random seed  [default: random, printed]")
@click.option("--width", "-W", type=int, help="Frame width, a multiple of 8 (Wan: of 16)  [default: 512; Wan: 832]")
@click.option("--height", "-H", type=int, help="Frame height, a multiple of 8 (Wan: of 16)  [default: 512; Wan: 480]")
@click.option("--decode-chunk", type=click.IntRange(min=1), help="AnimateDiff: frames the VAE decodes at once "
                                                                  "(memory)  [default: 8; 1 with --low-memory]; Wan "
                                                                  "decodes one latent frame at a time")
@click.option("--low-memory", is_flag=True,
              help=f"Stream the weights from their files instead of holding them prepared; AnimateDiff also runs the "
                   f"UNet's spatial layers over {LOW_MEMORY_UNET_FRAMES} frames at a time and decodes one frame at a "
                   "time: less memory, slower, the same clip.")
@model_options
@click.option("--latents", "latents_file", type=click.Path(exists=True, dir_okay=False),
              help="Initial noise, unit variance, .npy: (1, 4, frames, height/8, width/8), or for Wan (1, 16, "
                   "1 + (frames-1)/4, height/8, width/8).")
@click.option("--save-latents", type=click.Path(dir_okay=False),
              help="Write the final latents (what the VAE decodes) to FILE.npy.")
@click.option("--output", "-o", default="sdcli-{seed}.mp4", show_default=True,
              help="A .mp4, .webm, .gif or .webp file, a folder of PNG frames, or a name with {frame} "
                   "(clip_{frame}.png); {seed}, {index} and {prompt} in it are the clip's. Several clips without "
                   "them go to numbered files (clip-1.mp4, ...).")
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
@click.option("--quiet", "-q", is_flag=True, help="No progress and no summary; errors only.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON record per clip on stdout; everything else goes to stderr.")
@click.option("--stream", is_flag=True,
              help="Streaming models (self-forcing-1.3b, or a converted generator .safetensors): make the clip "
                   "chunk by chunk and write each chunk's frames as soon as it is decoded (an MP4 playable after an "
                   "interrupt, PNG frames one by one, or raw RGB24 on stdout with -o -). Streaming models always "
                   "stream; the flag says so.")
@click.option("--chunks", type=click.IntRange(min=0),
              help="Streaming: chunks to make (9 frames, then 12 each); 0 runs until interrupted  [default: 7, 81 "
                   "frames]")
@click.option("--seconds", type=FiniteFloat(min=0, min_open=True),
              help="Streaming: the clip's length in seconds, rounded up to whole chunks (instead of --chunks).")
@click.option("--max-attention-frames", type=click.IntRange(min=1),
              help="Streaming: latent frames a chunk attends to, its own included; older ones leave the cache, "
                   "which keeps memory flat on long runs  [default: 21, the length the model was trained on]")
@click.option("--attention-sink", is_flag=True,
              help="Streaming: keep the first chunk in the attention window for good (an attention sink).")
@click.option("--base-num-frames", type=click.IntRange(min=1),
              help="SkyReels-V2 DF: frames of one denoising window; longer videos are made window by window, each "
                   "window's frames written as soon as it is decoded  [default: 97]")
@click.option("--overlap-history", type=click.IntRange(min=1),
              help="SkyReels-V2 DF: frames each later window takes over from the video so far  [default: 17]")
@click.option("--ar-step", type=click.IntRange(min=0),
              help="SkyReels-V2 DF: steps each causal block lags behind the one before (0: synchronous)  "
                   "[default: 0]")
@click.option("--causal-block-size", type=click.IntRange(min=1),
              help="SkyReels-V2 DF: latent frames per causal block  [default: the model's; 5 with --ar-step]")
@click.option("--addnoise-condition", type=FiniteFloat(min=0),
              help="SkyReels-V2 DF: the noise level the frames taken over are brought back to at every step  "
                   "[default: 20]")
@click.option("--base-model", default=None,
              help="Streaming: the Wan2.1 model whose text encoder and VAE a generator file uses  [default: "
                   "wan21-t2v-1.3b]")
@embedding_options
@download_options
@reports_errors
def video(model, motion_adapter, prompt, negative_prompt, prompts_file, frames, fps, flow_shift, context_length,
          context_stride, context_weighting, steps, guidance, sampler, timestep_spacing, eta, seed, width, height,
          decode_chunk, low_memory, clip_skip, precision, backend, latents_file, save_latents, output, overwrite, quiet,
          as_json, stream, chunks, seconds, max_attention_frames, attention_sink, base_num_frames, overlap_history,
          ar_step, causal_block_size, addnoise_condition, base_model, embedding_files, embedding_dirs, yes, offline):
    """Generate short videos from text prompts: with a video model (Wan2.1), with an AnimateDiff motion adapter
    on an SD 1.x model, or streamed chunk by chunk (Self-Forcing)."""
    started = time.perf_counter()
    if (prompt is None) == (prompts_file is None):
        raise sdcli.SdcliError("give either --prompt or --prompts-file")
    streaming_options = {"--chunks": chunks, "--seconds": seconds, "--max-attention-frames": max_attention_frames,
                         "--attention-sink": attention_sink or None, "--base-model": base_model}
    forcing = sdcli.DiffusionForcing(base_num_frames, overlap_history, ar_step, causal_block_size, addnoise_condition)
    if is_streaming_model(model) or (stream and sdcli.model_architecture(model) != "skyreels-v2-df"):
        refused = {"--motion-adapter": motion_adapter, "--prompts-file": prompts_file,
                   "--negative-prompt": negative_prompt, "--frames": frames, "--steps": steps, "--guidance": guidance,
                   "--sampler": sampler, "--flow-shift": flow_shift, "--context-length": context_length,
                   "--timestep-spacing": timestep_spacing, "--decode-chunk": decode_chunk, "--latents": latents_file,
                   "--save-latents": save_latents, "--eta": eta or None, "--embedding": embedding_files or None,
                   "--embedding-dir": embedding_dirs or None}
        for option, value in refused.items():
            if value is not None:
                raise sdcli.SdcliError(f"{option} does not apply to a streaming run (its model fixes its steps and "
                                       "needs no guidance; its length is --chunks or --seconds)")
        if forcing != sdcli.DiffusionForcing():
            raise sdcli.SdcliError(FORCING_ONLY)
        return stream_video(model, prompt, chunks, seconds, fps, seed, width, height, max_attention_frames,
                            attention_sink, base_model, precision, backend, low_memory, output, overwrite, quiet,
                            as_json, yes, offline, started)
    for option, value in streaming_options.items():
        if value is not None:
            raise sdcli.SdcliError(f"{option} applies to streaming models (self-forcing-1.3b) with --stream")
    try:
        family = sdcli.model_family(model)  # known at once for a preset or a model already here
    except sdcli.SdcliError:
        if not motion_adapter:
            raise
        family = False  # with a motion adapter: the AnimateDiff path, which looks the adapter up first
    if family is None:
        model = model_path(model, yes=yes, offline=offline, quiet=quiet)
        family = sdcli.model_family(model)
    is_wan = bool(family) and family.name == "wan"
    if is_wan and motion_adapter:
        raise sdcli.SdcliError(f"{model} is a Wan2.1 model, a video model of its own: --motion-adapter applies to "
                               "SD 1.x models")
    if not is_wan and not motion_adapter:
        raise sdcli.SdcliError(f"{model} is an image model: give it an AnimateDiff motion adapter (--motion-adapter "
                               "animatediff-lightning, for one), or use a video model (--model wan21-t2v-1.3b)")
    if not is_wan and flow_shift is not None:
        raise sdcli.SdcliError(f"--flow-shift applies to flow-matching models (Wan); {model} is an SD model run by "
                               "AnimateDiff's samplers")
    if is_wan and decode_chunk is not None:
        raise sdcli.SdcliError("--decode-chunk applies to AnimateDiff: Wan's VAE decodes one latent frame at a time")
    if is_wan and (embedding_files or embedding_dirs):
        raise sdcli.SdcliError("--embedding and --embedding-dir apply to AnimateDiff's SD 1.x text encoder, not to "
                               "Wan's T5")
    embeddings = [] if is_wan else sdcli.read_embeddings(embedding_files, sdcli.embedding_folders(embedding_dirs))
    is_forcing = is_wan and sdcli.model_architecture(model) == "skyreels-v2-df"
    if not is_forcing and forcing != sdcli.DiffusionForcing():
        raise sdcli.SdcliError(FORCING_ONLY)
    model_defaults = sdcli.SKYREELS_DEFAULTS if is_forcing else sdcli.WAN_DEFAULTS
    default_frames = model_defaults.frames if is_wan else sdcli.DEFAULT_FRAMES
    base = sdcli.VideoParams(prompt or "", negative_prompt, frames=frames, fps=fps, steps=steps, sampler=sampler,
                             guidance_scale=guidance, timestep_spacing=timestep_spacing, seed=seed, width=width,
                             height=height, flow_shift=flow_shift,
                             decode_chunk=decode_chunk or (1 if low_memory else sdcli.DEFAULT_DECODE_CHUNK),
                             clip_skip=clip_skip, eta=eta, context_length=context_length, context_stride=context_stride,
                             context_weighting=context_weighting,
                             unet_frames=LOW_MEMORY_UNET_FRAMES if low_memory and not is_wan else None).validate()
    lines = [sdcli.PromptLine(base.prompt)]
    if prompts_file:
        lines = sdcli.read_prompts_file(prompts_file, samplers=sdcli.SAMPLERS, extra_options=sdcli.VIDEO_OPTIONS,
                                        check=lambda text, overrides: base.with_(prompt=text, **overrides).validate())
    seed_drawn = seed is None
    run_seed = base.with_seed().seed  # clip i: run_seed + i unless its line sets a seed, as images count
    clips = [base.with_(prompt=line.prompt, **{"seed": (run_seed + index) % (sdcli.MAX_SEED + 1), **line.overrides})
             for index, line in enumerate(lines)]
    if is_wan:  # the frame counts, sides and options Wan can take, checked before anything loads
        clips = [sdcli.check_wan_params(clip.with_(frames=clip.frames or default_frames,
                                                   width=clip.width or model_defaults.width,
                                                   height=clip.height or model_defaults.height))
                 for clip in clips]
    latents = None
    if latents_file:
        if len(clips) > 1:
            raise sdcli.SdcliError("--latents holds one clip's noise; it cannot be used with a prompts file")
        latents = np.load(latents_file, allow_pickle=False)
        clip_frames = clips[0].frames or default_frames
        channels, latent_frames = (16, 1 + (clip_frames - 1) // 4) if is_wan else (4, clip_frames)
        if latents.ndim != 5 or latents.shape[:3] != (1, channels, latent_frames):
            raise sdcli.SdcliError(f"{latents_file}: video latents must be (1, {channels}, {latent_frames}, height/8, "
                                   f"width/8) for {clip_frames} frames, got shape {latents.shape}")
        clips = [clips[0].with_(height=latents.shape[3] * 8, width=latents.shape[4] * 8)]
    # every output checked before the model loads
    paths = sdcli.plan_video_outputs(output, [clip.seed for clip in clips], [clip.prompt for clip in clips],
                                     [clip.frames or default_frames for clip in clips], overwrite)
    if save_latents:
        if len(clips) > 1:
            raise sdcli.SdcliError("--save-latents keeps one clip's latents; it cannot be used with a prompts file")
        save_latents = sdcli.check_output(save_latents, overwrite)
    status = error_console if as_json else console
    if seed_drawn and not quiet:
        status.print(f"seed {clips[0].seed}", highlight=False)

    model = model_path(model, yes=yes, offline=offline, quiet=quiet)
    if motion_adapter:
        # fetched here when allowed; the pipeline looks the name up again and knows the preset (and its settings)
        model_path(motion_adapter, yes=yes, offline=offline, quiet=quiet, resolve=sdcli.resolve_motion_adapter)
    pipeline = sdcli.load_video_pipeline(model, motion_adapter, precision=precision, backend=backend,
                                         low_memory=low_memory, embeddings=embeddings)
    # the model's and the adapter's defaults, every clip checked before the first step
    clips = [pipeline.prepare(clip)[0] for clip in clips]
    if is_wan:  # every prompt of the run encoded up front, then the text encoder goes
        pipeline.encode_prompts(clips)
        pipeline.release_text_encoder()
    reporter = Progress(quiet, status, unit="clip")
    for index, (params, path) in enumerate(zip(clips, paths)):
        reporter.start(index, len(clips), params)
        adapter = pipeline.motion_adapter
        record = {"path": path, "seed": params.seed, "model": str(pipeline.checkpoint.path),
                  "motion_adapter": motion_adapter, "motion_adapter_path": str(adapter.path) if adapter else None,
                  "precision": precision, "backend": backend, "sdcli_version": sdcli.__version__,
                  "parameters": dataclasses.asdict(params)}
        if is_forcing:  # window by window, each window's frames written as it is decoded
            result = forcing_clip(pipeline, params, forcing, latents, path, record, overwrite, reporter)
            written = result.paths
        else:
            result = None
            try:
                for item in pipeline.run(params, initial_noise=latents):
                    if isinstance(item, sdcli.GeneratedVideo):
                        result = item
                    elif isinstance(item, sdcli.DecodeRecord):
                        reporter.decode(item)
                    else:
                        reporter.step(item)
            finally:
                reporter.finish()
            record.update(parameters=dataclasses.asdict(result.params))
        record["timings"] = {key: round(value, 4) for key, value in result.timings.items()}
        if not is_forcing:
            pixels = sdcli.images_to_uint8(result.frames[0])  # (F, H, W, 3)
            written = sdcli.save_video(path, pixels, params.fps, {"sdcli": json.dumps(record)},
                                       overwrite=overwrite)
        if save_latents:
            sdcli.save_array(save_latents, result.latents, overwrite=overwrite)
        if as_json:
            click.echo(json.dumps(record))
        elif not quiet:
            where = written[0] if len(written) <= 2 else written[0].parent
            console.print(f"saved {where}  (seed {params.seed}, {params.frames} frames at {params.fps} fps)",
                          highlight=False)
        reporter.add_timings(result.timings)
    if not quiet:
        frame_count = sum(clip.frames for clip in clips)
        reporter.summary(pipeline.timings.get("load_s", 0.0), time.perf_counter() - started, len(clips),
                         f"clip(s) of {frame_count} frames in all")


@dataclasses.dataclass
class ForcingResult:
    latents: np.ndarray  # (1, 16, T, h, w), every window's new latent frames
    timings: dict
    paths: list


def forcing_clip(pipeline, params, forcing, initial_noise, output, record, overwrite, reporter) -> ForcingResult:
    """One SkyReels-V2 diffusion-forcing clip: its windows' frames written through a frame sink as each window is
    decoded (an MP4 playable after an interrupt, PNG frames one by one)."""
    sink = sdcli.open_frame_sink(output, width=params.width, height=params.height, fps=params.fps,
                                 text={"sdcli": json.dumps(record)}, overwrite=overwrite)
    latents = []
    try:
        with sink:
            for item in pipeline.run(params, forcing, initial_noise=initial_noise):
                if isinstance(item, sdcli.ChunkFrames):
                    sink.write(sdcli.images_to_uint8(item.frames[0]))  # (F, H, W, 3)
                    latents.append(item.latents)
                else:
                    reporter.step(item)
    except KeyboardInterrupt:
        error_console.print(f"interrupted: {sink.frames_written} frames written to {sink.describe()}",
                            highlight=False)
        raise
    finally:
        reporter.finish()
    return ForcingResult(np.concatenate(latents, axis=2), dict(pipeline.run_timings), list(sink.paths))


def is_streaming_model(model: str) -> bool:
    """A streaming preset, or a .safetensors file holding a Wan transformer in the original layout (a converted
    generator)."""
    if sdcli.streaming_preset(model) is not None:
        return True
    path = Path(model).expanduser()
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return False
    try:
        with sdcli.SafetensorsFile(path) as file:
            return sdcli.is_original_layout(set(file.keys())) is not None
    except sdcli.SdcliError:
        return False


STREAM_DEFAULTS = {"chunks": 7, "width": 832, "height": 480}


def stream_video(model, prompt, chunks, seconds, fps, seed, width, height, max_attention_frames, attention_sink,
                 base_model, precision, backend, low_memory, output, overwrite, quiet, as_json, yes, offline, started):
    """``sdcli video`` for a streaming model: chunks denoised and decoded in turn, each chunk's frames written as
    soon as it is finished."""
    preset = sdcli.streaming_preset(model)
    if preset is None and not is_streaming_model(model):
        raise sdcli.SdcliError(f"--stream needs a streaming model: self-forcing-1.3b, a converted generator "
                               f".safetensors, or a SkyReels-V2 DF model (skyreels-v2-df-1.3b-540p); {model} is not one")
    if chunks is not None and seconds is not None:
        raise sdcli.SdcliError("give --chunks or --seconds, not both")
    fps = fps or (preset.fps if preset else 16)
    width, height = width or STREAM_DEFAULTS["width"], height or STREAM_DEFAULTS["height"]
    params = sdcli.check_wan_params(sdcli.VideoParams(prompt, frames=1, fps=fps, width=width, height=height,
                                                      seed=seed).with_seed())
    if output == "-" and as_json:
        raise sdcli.SdcliError("-o - writes the frames to stdout; --json cannot share it")
    frames_per_chunk = sdcli.SELF_FORCING_FRAMES_PER_CHUNK
    if max_attention_frames is not None and max_attention_frames < frames_per_chunk * (2 if attention_sink else 1):
        raise sdcli.SdcliError(f"--max-attention-frames must hold a chunk of {frames_per_chunk} latent frames"
                               + (" and the sink chunk" if attention_sink else "") + f", got {max_attention_frames}")
    if seconds is not None:  # whole chunks: the first one's frames, then each other's
        first, later = sdcli.chunk_frame_count(0), sdcli.chunk_frame_count(1)
        chunks = 1 + max(0, math.ceil((math.ceil(seconds * fps) - first) / later))
    chunks = STREAM_DEFAULTS["chunks"] if chunks is None else chunks
    record = {"model": str(model), "seed": params.seed, "prompt": prompt, "width": width, "height": height, "fps": fps,
              "chunks": chunks or None, "precision": precision, "backend": backend, "sdcli_version": sdcli.__version__}
    output = output.replace("{seed}", str(params.seed))
    status = error_console if as_json or output == "-" else console
    sdcli.open_frame_sink(output, width=width, height=height, fps=fps, text={}, overwrite=overwrite,
                          check_only=True)  # refused before anything loads
    if not quiet and seed is None:
        status.print(f"seed {params.seed}", highlight=False)
    if preset is not None:  # converted once, downloaded first if need be, as a model is fetched
        generator = model_path(model, yes=yes, offline=offline, quiet=quiet,
                               resolve=lambda _, **lookup: sdcli.resolve_streaming_generator(preset, **lookup))
        base = base_model or preset.base_model
    else:
        generator, base = Path(model).expanduser(), base_model or sdcli.SELF_FORCING.base_model
    base = model_path(base, yes=yes, offline=offline, quiet=quiet)
    streaming = sdcli.load_streaming_model(generator, base, precision=precision, backend=backend,
                                           max_attention_frames=max_attention_frames or
                                           sdcli.SELF_FORCING_ATTENTION_FRAMES,
                                           attention_sink=attention_sink, low_memory=low_memory, preset=preset)
    text = streaming.text.conditioning(prompt, 1)  # (1, 512, 4096)
    streaming.text.release_text_encoder()
    reporter = StreamProgress(quiet, status, chunks)
    written = 0
    sink = sdcli.open_frame_sink(output, width=width, height=height, fps=fps, text={"sdcli": json.dumps(record)},
                                 overwrite=overwrite)
    try:
        with sink:
            for item in streaming.video.stream(text, height=height, width=width, seeds=[params.seed],
                                               chunks=chunks or None):
                if isinstance(item, sdcli.ChunkFrames):
                    sink.write(sdcli.images_to_uint8(item.frames[0]))  # (F, H, W, 3)
                    written += item.frames.shape[1]
                    reporter.chunk(item, written)
                else:
                    reporter.step(item)
    except sdcli.OutputClosedError:
        reporter.note("the reader closed the stream")
    except KeyboardInterrupt:
        reporter.note(f"interrupted: {written} frames written to {sink.describe()}")
        raise
    finally:
        reporter.finish()
    record.update(path=output, frames=written, timings=reporter.timings(time.perf_counter() - started))
    if as_json:
        click.echo(json.dumps(record))
    elif not quiet:
        if output != "-":
            status.print(f"saved {sink.describe()}  (seed {params.seed}, {written} frames at {fps} fps)",
                         highlight=False)
        reporter.summary(streaming.timings.get("load_s", 0.0), time.perf_counter() - started, written)


class StreamProgress:
    """Progress of a streaming run: a line per chunk with the frames so far, the time to the first frame and the
    frame rate; a summary line at the end."""

    def __init__(self, quiet: bool, out: Console, chunks: int):
        self.quiet, self.out, self.chunks = quiet, out, chunks
        self.first_frame_s: float | None = None
        self.first_chunk_frames = 0
        self.last_s = 0.0
        self.frames = 0

    def step(self, record) -> None:
        pass  # a chunk's few steps are reported with the chunk

    def chunk(self, chunk, written: int) -> None:
        if self.first_frame_s is None:
            self.first_frame_s, self.first_chunk_frames = chunk.elapsed_s, written
        self.last_s, self.frames = chunk.elapsed_s, written
        if not self.quiet:
            of = f"/{self.chunks}" if self.chunks else ""
            self.out.print(f"chunk {chunk.index + 1}{of}: {written} frames, first frame after "
                           f"{self.first_frame_s:.1f} s, {self.rate():.2f} frames/s", highlight=False)

    def rate(self) -> float:
        """Frames per second after the first chunk (the steady rate), or over the first chunk alone."""
        if self.frames > self.first_chunk_frames and self.last_s > self.first_frame_s:
            return (self.frames - self.first_chunk_frames) / (self.last_s - self.first_frame_s)
        return self.frames / self.first_frame_s if self.first_frame_s else 0.0

    def note(self, text: str) -> None:
        if not self.quiet:
            self.out.print(text, highlight=False)

    def finish(self) -> None:
        pass

    def timings(self, total_s: float) -> dict:
        return {"first_frame_s": round(self.first_frame_s or 0.0, 3), "frames_per_s": round(self.rate(), 4),
                "total_s": round(total_s, 3)}

    def summary(self, load_s: float, total_s: float, frames: int) -> None:
        self.out.print(f"{frames} frames in {total_s:.1f} s: load {load_s:.1f} s, first frame after "
                       f"{self.first_frame_s or 0.0:.1f} s, {self.rate():.2f} frames/s; peak memory "
                       f"{peak_memory_bytes() / 2**30:.2f} GiB", highlight=False)


# -- generate ----------------------------------------------------------------------------------------------------

DEFAULT_OUTPUT = "sdcli-{seed}.png"


@main.command()
@click.option("--model", "-m", default="sd15", show_default=True, help=MODEL_HELP)
@click.option("--prompt", "-p", help="What to draw.")
@click.option("--negative-prompt", "-n", default="", help="What to steer away from.")
@click.option("--prompts-file", type=click.Path(dir_okay=False),
              help="One prompt per line, optionally followed by --seed/--steps/--guidance/... overrides.")
@click.option("--steps", "-s", type=click.IntRange(min=1), help="Denoising steps  [default: 50; lcm: 4]")
@click.option("--guidance", "--cfg-scale", "-g", type=FiniteFloat(min=0), default=sdcli.DEFAULT_GUIDANCE,
              show_default=True, help="Classifier-free guidance scale; 1 or less turns guidance off.")
@click.option("--guidance-rescale", type=FiniteFloat(0, 1), default=0.0, show_default=True,
              help="Rescale guided predictions toward the conditional one's spread (Lin et al. 2023).")
@click.option("--scheduler", "--sampler", "sampler", type=click.Choice(sdcli.SAMPLERS),
              help="Sampler  [default: the model's own scheduler, PNDM for SD 1.5, DDIM for SD 2.1]")
@click.option("--eta", type=FiniteFloat(min=0), default=0.0, help="DDIM's noise (0: deterministic).")
@click.option("--seed", type=click.IntRange(0, sdcli.MAX_SEED), help="Random seed  [default: random, printed]")
@click.option("--width", "-W", type=int, help="Image width, a multiple of 8  [default: the model's, 512 for SD 1.5]")
@click.option("--height", "-H", type=int, help="Image height, a multiple of 8  [default: the model's]")
@click.option("--num-images", "-N", type=click.IntRange(min=1), default=1, show_default=True,
              help="Images per prompt (seeds seed, seed+1, ...).")
@click.option("--batch-size", "-b", type=click.IntRange(min=1), default=1, show_default=True,
              help="Images denoised together (faster per image, more memory).")
@model_options
@click.option("--vae", type=click.Choice(sdcli.VAE_CHOICES), default="full", show_default=True,
              help="Decode with the model's VAE, or with the shipped tiny TAESD (much faster, a little softer).")
@click.option("--vae-tiling", is_flag=True,
              help="Decode large images in overlapping tiles, as diffusers' enable_tiling(): bounded memory, faint "
                   "differences near the seams.")
@click.option("--low-memory", is_flag=True,
              help="Encode every prompt first and free the text encoder before denoising; implies --vae-tiling.")
@click.option("--latents", "latents_file", type=click.Path(exists=True, dir_okay=False),
              help="Initial noise, unit variance, (images, 4, height/8, width/8) .npy: scaled by the sampler as "
                   "diffusers scales its latents= argument.")
@click.option("--save-latents", type=click.Path(dir_okay=False),
              help="Write the final latents (what the VAE decodes) of all images to FILE.npy.")
@click.option("--init-image", type=click.Path(dir_okay=False),
              help="Start from this image (PNG, JPEG, WebP, ...): image to image, or inpainting with --mask. The "
                   "run's size is the image's (rounded down to a multiple of 8) unless --width/--height say otherwise.")
@click.option("--strength", type=FiniteFloat(min=0, max=1, min_open=True),
              help="How much of the init image is redrawn, in (0, 1]: the share of the steps run  [default: 0.8; "
                   "inpainting: 1.0]")
@click.option("--mask", type=click.Path(dir_okay=False),
              help="Inpainting: repaint where this image is white, keep the init image where it is black.")
@click.option("--mask-blur", type=FiniteFloat(min=0), default=0, show_default=True,
              help="Blur the mask by a Gaussian of this radius first (diffusers' mask_processor.blur).")
@click.option("--padding-mask-crop", type=click.IntRange(min=0),
              help="Inpaint only the box around the mask grown by this many pixels, at the run's size, and put it "
                   "back into the full-size init image.")
@click.option("--no-resize", is_flag=True,
              help="Refuse an init image (or mask) of another size than the run's instead of resizing it.")
@click.option("--encode-mode", type=click.Choice(sdcli.ENCODE_MODES), default="sample", show_default=True,
              help="The init image's latents: a seeded sample of the VAE's posterior, or its mean.")
@click.option("--lora", "loras", multiple=True, metavar="FILE_OR_NAME[:WEIGHT]",
              help="Merge a LoRA (kohya/A1111, diffusers/PEFT or LoCon .safetensors) into the text encoder and "
                   "UNet, at WEIGHT (default 1.0); a name is NAME.safetensors in --lora-dir. Repeatable. Prompts "
                   "may also carry A1111's <lora:name:weight> tags.")
@click.option("--lora-dir", type=click.Path(file_okay=False),
              help="Where LoRA names are looked up  [default: loras in the weights folder, ./weights/loras]")
@click.option("--output", "-o", default=DEFAULT_OUTPUT, show_default=True,
              help="A .png file (several images: numbered files next to it), a folder, or a template with "
                   "{seed}, {index} or {prompt}.")
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
@click.option("--shard", callback=lambda ctx, param, value: parse_shard(value), metavar="K/N",
              help="Make only the K-th (1..N) of N deterministic slices of the run's batches, for Slurm arrays, GNU "
                   "parallel or indexed jobs: every image keeps its seed and its output name, so the N shards "
                   "together make exactly the images of the whole run. Needs --seed and a file or template output.")
@click.option("--skip-existing", is_flag=True,
              help="Leave the images whose output file exists (resuming a killed run): a batch whose images all "
                   "exist is not made again. Needs a file or template output.")
@click.option("--preview", type=click.Path(dir_okay=False),
              help="Keep a TAESD preview of the image being denoised in this PNG file.")
@click.option("--preview-every", type=click.IntRange(min=1), default=5, show_default=True,
              help="Steps between two --preview updates.")
@click.option("--quiet", "-q", is_flag=True, help="No progress and no summary; errors only.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON record per image (path, seed, parameters, "
                                                      "timings) on stdout; everything else goes to stderr.")
@embedding_options
@download_options
@reports_errors
def generate(model, prompt, negative_prompt, prompts_file, steps, guidance, guidance_rescale, sampler, eta, seed,
             width, height, num_images, batch_size, clip_skip, precision, backend, vae, vae_tiling, low_memory,
             latents_file, save_latents, init_image, strength, mask, mask_blur, padding_mask_crop, no_resize,
             encode_mode, loras, lora_dir, output, overwrite, shard, skip_existing, preview, preview_every, quiet,
             as_json, embedding_files, embedding_dirs, yes, offline):
    """Generate images from a text prompt and save them as PNG, with the generation parameters embedded."""
    started = time.perf_counter()
    if (prompt is None) == (prompts_file is None):
        raise sdcli.SdcliError("give either --prompt or --prompts-file")
    if init_image is None and (mask or strength is not None or no_resize or mask_blur or padding_mask_crop is not None):
        raise sdcli.SdcliError("--mask, --strength, --no-resize, --mask-blur and --padding-mask-crop need an "
                               "--init-image")
    init = sdcli.load_init_image(init_image, mask, width=width, height=height, resize=not no_resize,
                                 mask_blur=mask_blur, padding_mask_crop=padding_mask_crop) if init_image else None
    base = sdcli.GenerateParams(prompt=prompt or "", negative_prompt=negative_prompt, steps=steps,
                                guidance_scale=guidance, guidance_rescale=guidance_rescale, sampler=sampler,
                                seed=seed, width=width, height=height, clip_skip=clip_skip, eta=eta,
                                strength=strength, encode_mode=encode_mode)
    lines = sdcli.read_prompts_file(prompts_file, samplers=sdcli.SAMPLERS,
                                    extra_options=sdcli.IMAGE_OPTIONS) if prompts_file else None
    family = None
    if latents_file:  # latents have the model family's shape: known at once for a preset or a model already here
        family = sdcli.model_family(model)
        if family is None:
            model = model_path(model, yes=yes, offline=offline, quiet=quiet)
            family = sdcli.model_family(model)
    plan = sdcli.plan_run(base, prompts=lines, num_images=num_images, batch_size=batch_size, latents=latents_file,
                          family=family, init_image=init)
    embeddings = sdcli.read_embeddings(embedding_files, sdcli.embedding_folders(embedding_dirs))
    lora_dir = lora_dir or sdcli.default_lora_dir()
    uses = [sdcli.parse_lora_option(value) for value in loras]
    loras = [(sdcli.resolve_lora(use.name, lora_dir), use.unet_weight) for use in uses]  # files read before loading
    for text in dict.fromkeys(plan.prompts):  # every <lora:...> tag names a readable LoRA file
        sdcli.prompt_loras(text, lora_dir)
    save_latents = sdcli.check_output(save_latents, overwrite) if save_latents else None
    preview = sdcli.check_output(preview, overwrite) if preview else None
    if shard or skip_existing:
        paths = resumable_paths(plan, output, shard, skip_existing, overwrite)
        plan = plan.shard(*shard) if shard else plan
    else:
        paths = sdcli.plan_output_paths(output, len(plan.seeds), plan.seeds, plan.prompts, overwrite=overwrite)
    if skip_existing:  # the batches with an image still to make
        plan = dataclasses.replace(plan, jobs=[job for job in plan.jobs if not all(
            paths[job.first_image + i].exists() for i in range(job.params.batch_size))])
        if not plan.jobs:
            if not quiet:
                (error_console if as_json else console).print("every image exists already; nothing to do",
                                                              highlight=False)
            return
    status = error_console if as_json else console

    model = model_path(model, yes=yes, offline=offline, quiet=quiet)
    pipeline = sdcli.load_pipeline(model, precision=precision, backend=backend, vae=vae, vae_tiling=vae_tiling,
                                   low_memory=low_memory, embeddings=embeddings, loras=loras, lora_dir=lora_dir)
    if plan.seed_drawn and not quiet:
        status.print(f"seed {plan.seed}", highlight=False)
    jobs = [pipeline.prepare(job) for job in plan.jobs]  # every job checked against the model before the first image
    if low_memory:
        pipeline.encode_prompts(jobs)
        pipeline.release_text_encoder()
    reporter = Progress(quiet, status)
    all_latents = []
    count = sum(job.params.batch_size for job in jobs)
    done = 0
    for job in jobs:
        batch = None
        reporter.start(done, count, job.params)
        try:
            for record in pipeline.run(job, preview_every=preview_every if preview else 0):
                if isinstance(record, sdcli.GeneratedBatch):
                    batch = record
                else:
                    reporter.step(record)
                    if record.preview is not None and preview:
                        sdcli.save_png(preview, sdcli.images_to_uint8(record.preview)[0], {}, overwrite=True)
        finally:
            reporter.finish()
        pixels = sdcli.images_to_uint8(batch.images)  # (B, H, W, 3)
        for i, image_seed in enumerate(batch.seeds):
            index = job.first_image + i  # in the whole run, whatever the shard
            done += 1
            if skip_existing and paths[index].exists():
                continue  # made by an earlier run; its batch ran for the others
            record = image_record(pipeline, batch.params, image_seed, paths[index], batch.timings, job.init_image)
            record["index"] = index + 1  # 1-based, as {index} in an output template
            text = {"parameters": sdcli.a1111_parameters(batch.params.with_(seed=image_seed), seed=image_seed,
                                                         width=pixels.shape[2], height=pixels.shape[1],
                                                         model=pipeline.checkpoint.path.stem,
                                                         extra=a1111_init_fields(batch.params, job.init_image)),
                    "sdcli": json.dumps(reproducible(record))}
            sdcli.save_png(paths[index], pixels[i], text, overwrite=overwrite)
            if as_json:
                click.echo(json.dumps(record))
            elif not quiet:
                console.print(f"saved {paths[index]}  (seed {image_seed})", highlight=False)
        all_latents.append(batch.latents)
        reporter.add_timings(batch.timings)
    if save_latents:
        sdcli.save_array(save_latents, np.concatenate(all_latents), overwrite=overwrite)
    if not quiet:
        reporter.summary(pipeline.timings.get("load_s", 0.0), time.perf_counter() - started, count)


def parse_shard(value: str | None) -> tuple[int, int] | None:
    """``K/N`` -> (K, N), 1 <= K <= N; a one-line usage error otherwise."""
    if value is None:
        return None
    number, _, count = value.partition("/")
    if not (number.strip().isdigit() and count.strip().isdigit()) or not 1 <= int(number) <= int(count):
        raise click.BadParameter(f"{value!r}: give K/N with 1 <= K <= N (the K-th of N shards), e.g. 3/8")
    return int(number), int(count)


def resumable_paths(plan, output: str, shard, skip_existing: bool, overwrite: bool) -> list:
    """The output of every image of the whole run, for a shard or a resumed run: named by the run alone (a file
    or a template; a folder's numbering depends on what is in it, so it is refused), checked as a plain run checks
    them but only for the images this run makes (other shards' files may be there already)."""
    if skip_existing and overwrite:
        raise sdcli.SdcliError("--skip-existing keeps existing images; --overwrite replaces them: give one")
    if shard and plan.seed_drawn:
        raise sdcli.SdcliError("--shard needs --seed: every shard must give every image the seed the whole run "
                               "gives it")
    if not sdcli.template_fields(output) and (output.endswith(("/", "\\")) or Path(output).expanduser().is_dir()):
        raise sdcli.SdcliError(f"--shard and --skip-existing need images named by the run alone: a file name or a "
                               f"template such as {output.rstrip('/')}/{{index}}-{{seed}}.png, not the folder {output!r} "
                               "(its numbering depends on the files in it)")
    paths = sdcli.plan_output_paths(output, len(plan.seeds), plan.seeds, plan.prompts, overwrite=True)
    mine = plan.shard(*shard) if shard else plan
    for job in mine.jobs:
        for i in range(job.params.batch_size):
            path = paths[job.first_image + i]
            if not skip_existing:
                sdcli.check_output(path, overwrite)
    return paths


def image_record(pipeline, params, seed: int, path, timings: dict, init=None) -> dict:
    """The JSON record of one image: where it is and everything needed to make it again (with an init image:
    its file's name and content hash, and its mask's, beside the strength)."""
    values = params.with_(seed=seed, batch_size=1).as_dict()
    values.pop("extra", None)
    if init is None:  # the options of runs from an init image
        values.pop("strength", None)
        values.pop("encode_mode", None)
    return {"path": str(path), "seed": seed, "model": str(pipeline.checkpoint.path),
            "precision": pipeline.precision, "backend": pipeline.backend, "vae": pipeline.vae,
            "sdcli_version": sdcli.__version__, "parameters": values, **(init.record() if init else {}),
            **({"loras": [[str(lora.path), weight] for lora, _, weight in pipeline.loras]} if pipeline.loras else {}),
            "timings": {key: round(value, 4) for key, value in timings.items()}}


def a1111_init_fields(params, init) -> dict:
    """The fields AUTOMATIC1111's img2img tab writes for a run from an init image (none without one)."""
    if init is None:
        return {}
    fields = {"Denoising strength": params.strength}
    if init.inpainting and init.mask_blur:
        fields["Mask blur"] = init.mask_blur
    return fields


def reproducible(record: dict) -> dict:
    """What an image's PNG holds of its record: everything that makes it again, not where it was written nor how
    long it took (those are in --json), so that the same run writes the same bytes wherever and whenever it runs,
    sharded or not."""
    return {key: value for key, value in record.items() if key not in ("path", "timings")}


def peak_memory_bytes() -> int:
    """The peak resident memory of this process (Linux reports kilobytes, macOS bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class Progress:
    """Step progress: a rich bar on a terminal, one plain line per step otherwise, nothing when quiet."""

    def __init__(self, quiet: bool, out: Console, unit: str = "image"):
        self.quiet, self.out, self.unit = quiet, out, unit
        self.interactive = out.is_terminal and not quiet
        self.bar = None
        self.totals = {"text_encoding_s": 0.0, "denoising_s": 0.0, "decode_s": 0.0, "steps": 0}

    def start(self, first: int, count: int, params) -> None:
        unit = self.unit
        label = f"{unit}s {first + 1}-{first + params.batch_size}" if params.batch_size > 1 else f"{unit} {first + 1}"
        self.label = f"{label}/{count}"
        if self.interactive:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self.bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                           console=self.out, transient=True)
            self.bar.start()
            self.task = self.bar.add_task(self.label, total=params.steps, rate="")

    def step(self, record) -> None:
        rate = f"{record.elapsed_s / (record.index + 1):.2f} s/it"
        if self.bar is not None:
            self.bar.update(self.task, completed=record.index + 1, total=record.total, rate=rate)
        elif not self.quiet:
            self.out.print(f"{self.label} step {record.index + 1}/{record.total}  {rate}", highlight=False)

    def decode(self, record) -> None:
        """Decoding progress after the steps (a decoder that goes a piece at a time)."""
        if self.bar is not None:
            self.bar.update(self.task, description=f"{self.label} decoding", completed=record.done,
                            total=record.total, rate="")
        elif not self.quiet:
            self.out.print(f"{self.label} decoded {record.done}/{record.total}", highlight=False)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def add_timings(self, timings: dict) -> None:
        for key in ("text_encoding_s", "denoising_s", "decode_s"):
            self.totals[key] += timings.get(key, 0.0)
        self.totals["steps"] += timings["steps"]

    def summary(self, load_s: float, total_s: float, images: int, what: str = "image(s)") -> None:
        t = self.totals
        per_step = t["denoising_s"] / t["steps"] if t["steps"] else 0.0
        self.out.print(f"{images} {what} in {total_s:.1f} s: load {load_s:.1f} s, text encoding "
                       f"{t['text_encoding_s']:.2f} s, denoising {t['denoising_s']:.1f} s ({per_step:.2f} s/it), "
                       f"decode {t['decode_s']:.1f} s; peak memory {peak_memory_bytes() / 2**30:.2f} GiB",
                       highlight=False)
