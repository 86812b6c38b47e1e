"""SDCLI_CPU_LEVEL, the cap on the instruction sets the compiled kernels use (sdcli/ext/cpu_level.h).

The level is read once per process, so each case runs a new Python process. At every level this CPU has, that
process reports the level and the paths the op layer takes, and runs a few ops (element-wise, norms, linear,
convolution, attention, bf16 linear) against the numpy reference. The op and kernel tests run under the variable
(``SDCLI_CPU_LEVEL=avx2 pytest``) compare every kernel at that level; this file checks that the variable is
honoured, so that such a run tests what it says.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import sdcli
from sdcli.ext import cpu_level
from sdcli.ext.levels import ENV_VAR, LEVELS

SDCLI_PARENT = str(Path(sdcli.__file__).resolve().parents[1])  # the subprocesses import the sdcli this one does

# What each level runs: the float32 AVX-512 kernels (packed weights), the bf16 kernels' level, F16C conversions.
PATHS = {
    "baseline": {"f32_kernels": False, "bf16": "portable", "f16c": False},
    "avx2": {"f32_kernels": False, "bf16": "portable", "f16c": True},
    "avx512": {"f32_kernels": True, "bf16": "portable", "f16c": True},
    "avx512_bf16": {"f32_kernels": True, "bf16": "avx512_bf16", "f16c": True},
    "amx": {"f32_kernels": True, "bf16": "amx", "f16c": True},
}

# Largest error relative to max |reference| (numpy_ops on the same float32 inputs). The kernels differ from the
# reference by summation order and exp/erf polynomials: a few float32 ulp, ~sqrt(K) of them for the products
# (TOL in test_ops.py states each). A wrong path or a broken kernel gives errors of order 1.
BOUNDS = {"gelu": 1e-6, "quick_gelu": 2e-6, "softmax": 2e-6, "layer_norm": 1e-5, "group_norm": 1e-5,
          "linear": 1e-5, "conv2d": 1e-5, "attention": 1e-5, "linear_bf16": 1e-5}

# Prints {"level": cpu_level(), "paths": ..., "errors": {op: error}} for the level of its environment.
PROBE = r"""
import json
import numpy as np
from sdcli.ext import cpu_level, cpu_kernels
from sdcli.io.safetensors import float32_to_bf16
from sdcli.ops import cpu_ops, get_ops, numpy_ops
from sdcli.ops.parameter import Parameter, Weight

cpu = get_ops("cpu")
rng = np.random.default_rng(0)

def r(*shape):
    return rng.standard_normal(shape).astype(np.float32)

def error(got, expected):
    return float(np.abs(got.astype(np.float64) - expected).max() / np.abs(expected).max())

x, w, b, g, h = r(5, 77, 70), r(33, 70), r(33), r(70), r(70)
image, kernel, kb, gw, gb = r(2, 6, 13, 11), r(5, 6, 3, 3), r(5), r(6), r(6)
q, k, v = r(2, 3, 45, 40), r(2, 3, 140, 40), r(2, 3, 140, 24)
bits = float32_to_bf16(w)
errors = {
    "gelu": error(cpu.gelu(x), numpy_ops.gelu(x)),
    "quick_gelu": error(cpu.quick_gelu(x), numpy_ops.quick_gelu(x)),
    "softmax": error(cpu.softmax(x), numpy_ops.softmax(x)),
    "layer_norm": error(cpu.layer_norm(x, g, h, 1e-5), numpy_ops.layer_norm(x, g, h, 1e-5)),
    "group_norm": error(cpu.group_norm(image, 3, gw, gb, 1e-6, silu=True),
                        numpy_ops.group_norm(image, 3, gw, gb, 1e-6, silu=True)),
    "linear": error(cpu.linear(x, w, b), numpy_ops.linear(x, w, b)),  # a plain weight is prepared as a layer's
    "conv2d": error(cpu.conv2d(image, kernel, kb, padding=1),
                    numpy_ops.conv2d(image, kernel, kb, padding=1)),
    "attention": error(cpu.attention(q, k, v), numpy_ops.attention(q, k, v)),
}
half = np.empty(8, np.uint16)
paths = {"f32_kernels": isinstance(cpu.pack_linear(w), cpu_ops.PackedF32), "bf16": cpu_ops.bf16_level(),
         "f16c": bool(cpu_kernels.narrow_to_half(np.zeros(8, np.float32), half))}
# bf16 products round the activations to bf16 as numpy_ops.linear does for a bf16 weight; the float32 fallback
# does not
bf16_weight = lambda: Parameter(Weight(bits, "bf16"))  # noqa: E731
bf16_reference = (numpy_ops.linear(x, numpy_ops.weight_float32(bits, "bf16"), b) if paths["bf16"] == "portable"
                  else numpy_ops.linear(x, bf16_weight(), b))
errors["linear_bf16"] = error(cpu.linear(x, bf16_weight(), b), bf16_reference)
print(json.dumps({"level": list(cpu_level()), "paths": paths, "errors": errors}))
"""


def run(level: str | None, script: str) -> subprocess.CompletedProcess:
    """``python -c script`` with SDCLI_CPU_LEVEL set to ``level`` (unset for None), on the sdcli of this process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [SDCLI_PARENT, os.environ.get("PYTHONPATH")]))}
    env.pop(ENV_VAR, None)
    if level is not None:
        env[ENV_VAR] = level
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)


def probe(level: str | None) -> dict:
    result = run(level, PROBE)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_levels_are_ordered_and_this_process_reports_its_own():
    assert LEVELS == ("baseline", "avx2", "avx512", "avx512_bf16", "amx")
    level, detected = cpu_level()
    assert detected in LEVELS
    assert level == min(os.environ.get(ENV_VAR) or detected, detected, key=LEVELS.index)


@pytest.mark.parametrize("level", LEVELS)
def test_each_level_runs_its_paths_and_agrees_with_the_reference(level):
    detected = cpu_level().detected
    if LEVELS.index(level) > LEVELS.index(detected):
        pytest.skip(f"this CPU's best level is {detected}")
    report = probe(level)
    assert report["level"] == [level, detected]
    assert report["paths"] == PATHS[level]
    for op, bound in BOUNDS.items():
        assert report["errors"][op] <= bound, (op, report["errors"][op])


def test_unset_or_above_the_cpu_gives_its_best():
    detected = cpu_level().detected
    for value in (None, "", "amx"):
        result = run(value, "from sdcli.ext import cpu_level; print(*cpu_level())")
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.split() == [detected, detected]


def test_unknown_level_is_an_error_naming_the_variable():
    script = ("from sdcli.errors import BackendError\n"
              "for name in ('sdcli.ext.cpu_kernels', 'sdcli.ext.f32_kernels', 'sdcli.ext.bf16_kernels'):\n"
              "    try:\n"
              "        __import__(name)\n"
              "    except BackendError as error:\n"
              "        print(error)\n"
              "    else:\n"
              "        print(name, 'imported')\n")
    result = run("avx3", script)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and all(line.startswith("SDCLI_CPU_LEVEL='avx3' is not a CPU level") for line in lines)
    assert "baseline, avx2, avx512, avx512_bf16, amx" in lines[0]
