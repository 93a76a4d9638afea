"""What the CPU kernels do to the numbers: N pretraining steps and a short method run, under each ATen capability
level this CPU has, with the pins of dynaprompt/determinism.py and without them.

    python -m benchmarks.kernels [--steps 50] [--threads 1,2] [--samples 20] [--out reports/benchmark-kernels.json]

Each case runs in a fresh process whose environment is set before torch loads: `ATEN_CPU_CAPABILITY=<level>`
(what a CPU of that level would give ATen; "default" leaves this CPU's best), and either the pins (the pipeline's
default) or `DYNAPROMPT_CPU_KERNELS=native` (none). A case pretrains the bundled tiny CLIP for `--steps` steps of
the `pretrain:` recipe on Fashion-MNIST and runs TPT and Online TPT over `--samples` view features through it; it
reports the loss every 50 steps, a hash of the weights, a hash of the records and the seconds the steps took.
Under the pins the hashes agree across levels; without them they differ wherever the kernels do.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cpu_levels() -> list[str]:
    """ATen capability levels this CPU runs: default, avx2 and, where the CPU has AVX-512, avx512."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return ["default", "avx2"] + (["avx512"] if "avx512f" in flags else [])


def case_environment(level: str, pinned: bool, threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")}
    if level != "default":
        env["ATEN_CPU_CAPABILITY"] = level
    env["DYNAPROMPT_CPU_KERNELS"] = "pinned" if pinned else "native"
    env["OMP_WAIT_POLICY"], env["BENCH_THREADS"] = "PASSIVE", str(threads)
    return env


def digest(tensors) -> str:
    hasher = hashlib.sha256()
    for tensor in tensors:
        hasher.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return hasher.hexdigest()[:16]


def run_case(steps: int, samples: int) -> dict:
    """This process's case (its environment was set by the caller)."""
    import torch

    import dynaprompt  # noqa: F401  (applies or lifts the pins before torch loads)
    from dynaprompt.config import load_settings
    from dynaprompt.datasets.fashion_mnist import CLASSNAMES, load_split, to_rgb
    from dynaprompt.methods import build_method
    from dynaprompt.model import ModelSpec, load_clip, located
    from dynaprompt.objectives import TuningConfig
    from dynaprompt.pretrain import pretrain
    from dynaprompt.runner import run_stream
    from dynaprompt.text import PromptTextEncoder

    threads = int(os.environ.get("BENCH_THREADS", "2"))
    torch.set_num_threads(threads)
    settings = load_settings(ROOT / "params.yaml")
    config = replace(settings.pretrain, steps=steps, threads=threads)
    clip = load_clip(ModelSpec(arch="tiny-clip", pretrained=None, init_seed=0, device="cpu"))
    images, labels = load_split(located(config.source, settings.base_dir), "train")  # relative: params' folder
    start = time.perf_counter()
    curve = pretrain(clip, to_rgb(images, clip.image_size), labels, CLASSNAMES, config, log=lambda *_: None)
    seconds = time.perf_counter() - start
    text = PromptTextEncoder(clip.model, clip.tokenizer, CLASSNAMES)
    generator = torch.Generator().manual_seed(0)
    views = {f"s{i}": torch.nn.functional.normalize(torch.randn(16, 128, generator=generator), dim=-1)
             for i in range(samples)}
    records = [run_stream(build_method(kind, text, TuningConfig(lr=1e-2)), list(views), {s: 0 for s in views},
                          views.__getitem__) for kind in ("tpt", "online_tpt")]
    state = clip.model.state_dict()
    return {"capability": torch.backends.cpu.get_cpu_capability(), "threads": threads,
            "pins": {k: os.environ.get(k) for k in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")},
            "losses": {str(p["step"]): p["loss"] for p in curve}, "weights": digest(state[k] for k in sorted(state)),
            "records": digest(torch.tensor(r[["pred", "entropy_after"]].to_numpy()) for r in records),
            "seconds": round(seconds, 1)}


def measure(level: str, pinned: bool, threads: int, steps: int, samples: int) -> dict:
    done = subprocess.run([sys.executable, "-m", "benchmarks.kernels", "--case", str(steps), str(samples)],
                          env=case_environment(level, pinned, threads), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"case {level}/{'pinned' if pinned else 'native'}/{threads}: {done.stderr[-2000:]}")
    return {"level": level, "pinned": pinned, **json.loads(done.stdout.strip().splitlines()[-1])}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", default="2")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--levels", default=None, help="comma-separated (default: every level this CPU has)")
    parser.add_argument("--out", default="reports/benchmark-kernels.json")
    parser.add_argument("--case", nargs=2, type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(*args.case)))
        return []
    levels = args.levels.split(",") if args.levels else cpu_levels()
    rows = [measure(level, pinned, int(threads), args.steps, args.samples)
            for threads in args.threads.split(",") for pinned in (False, True) for level in levels]
    for r in rows:
        losses = ", ".join(f"{k}: {v:.6f}" for k, v in r["losses"].items())
        print(f"{r['threads']} thread(s), {'pinned' if r['pinned'] else 'native'}, level {r['level']} "
              f"(ATen {r['capability']}): weights {r['weights']}, records {r['records']}, {r['seconds']}s; "
              f"loss {losses}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
