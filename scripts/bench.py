"""sdcli's benchmark: sdcli against the reference implementation, measured in one run on this machine.

So far it times the CLIP text encoder (batch 2 x 77 tokens) of the full SD1 and SD2 architectures with random
weights, alternating sdcli and transformers runs (A B A B ...) and quoting medians and their ratio. sdcli runs in
its own process, without torch loaded: two OpenMP runtimes in one process (torch's and sdcli's kernels') fight
over the cores and would make the comparison say nothing about either tool as users run it.

    python scripts/bench.py [--repeats 5] [--json bench-results/text_encoder.json]

transformers and torch are needed only for the reference side and for making the random weights.
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
    import sdcli
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="Also write the results to this JSON file.")
    args = parser.parse_args()
    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d"),
               "text_encoder": [bench_text_encoder(family, args.repeats) for family in ("sd15", "sd21")]}
    print(f"{results['machine']['cpu']}, {results['machine']['cores']} cores, {results['date']}")
    print(f"{'text encoder':<14}{'sdcli (s)':>11}{'transformers (s)':>18}{'ratio':>8}{'max |diff|':>12}")
    for row in results["text_encoder"]:
        print(f"{row['family']:<14}{row['sdcli_s']:>11.3f}{row['transformers_s']:>18.3f}{row['ratio']:>8.2f}"
              f"{row['max_abs_diff']:>12.2e}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
