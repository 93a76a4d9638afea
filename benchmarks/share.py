"""Two runs sharing one device against one run alone: does a second worker per GPU (`sweep.workers_per_gpu: 2`)
add throughput?

    python -m benchmarks.share [--arch ViT-B-16] [--classes 200] [--samples 24] [--method tpt] [--device cuda]
        [--threads 1] [--max-text-tokens 8192] [--out FILE]

One process runs `--method` over `--samples` random cached samples alone; then two such processes run at once on
the same device. It prints samples/s of each way and their ratio (2 workers / 1 worker).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(arch: str, classes: int, samples: int, method: str, device: str, threads: int, max_tokens: int,
          barrier: str, parties: int) -> dict:
    """One run in this process: samples/s after a warm-up sample, timed once every party is warm."""
    import torch
    from open_clip import IMAGENET_CLASSNAMES

    from dynaprompt.methods import build_method
    from dynaprompt.model import ModelSpec, load_clip
    from dynaprompt.objectives import TuningConfig
    from dynaprompt.text import PromptTextEncoder

    torch.set_num_threads(threads)
    clip = load_clip(ModelSpec(arch=arch, pretrained=None, device=device))
    text = PromptTextEncoder(clip.model, clip.tokenizer, list(IMAGENET_CLASSNAMES)[:classes], max_tokens=max_tokens)
    dim = clip.model.text_projection.shape[1]
    generator = torch.Generator().manual_seed(0)
    views = [torch.nn.functional.normalize(torch.randn(64, dim, generator=generator), dim=-1).to(clip.device)
             for _ in range(samples + 1)]
    run = build_method(method, text, TuningConfig(), None)
    run.reset()
    run(views[0])
    if clip.device.type == "cuda":
        torch.cuda.synchronize()
    folder = Path(barrier)
    (folder / f"ready-{os.getpid()}").touch()
    while len(list(folder.glob("ready-*"))) < parties:  # all start the timed loop together
        time.sleep(0.01)
    start = time.perf_counter()
    for v in views[1:]:
        run(v)
    if clip.device.type == "cuda":
        torch.cuda.synchronize()
    return {"samples_per_s": samples / (time.perf_counter() - start)}


def spawn(args, count: int) -> tuple[float, list[dict]]:
    barrier = tempfile.mkdtemp(prefix="share-")
    spec = json.dumps({"arch": args.arch, "classes": args.classes, "samples": args.samples, "method": args.method,
                       "device": args.device, "threads": args.threads, "max_tokens": args.max_text_tokens,
                       "barrier": barrier, "parties": count})
    start = time.perf_counter()
    processes = [subprocess.Popen([sys.executable, "-m", "benchmarks.share", "--child", spec],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(count)]
    outs = []
    for process in processes:
        out, err = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(err[-2000:])
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return time.perf_counter() - start, outs


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.share", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="ViT-B-16")
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--samples", type=int, default=24)
    parser.add_argument("--method", default="tpt")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-text-tokens", type=int, default=8192, help="run.max_text_tokens (params.yaml)")
    parser.add_argument("--out", default="", help="write the report here as JSON")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(child(**spec)))
        return {}
    _, alone = spawn(args, 1)
    _, pair = spawn(args, 2)
    one, two = alone[0]["samples_per_s"], sum(o["samples_per_s"] for o in pair)
    report = {"arch": args.arch, "classes": args.classes, "method": args.method, "device": args.device,
              "samples": args.samples, "max_text_tokens": args.max_text_tokens,
              "one_worker_samples_per_s": round(one, 3), "two_workers_samples_per_s": round(two, 3),
              "ratio": round(two / one, 3)}
    print(f"{args.method} at {args.arch}, C={args.classes} on {args.device}: one worker {one:.2f} samples/s, "
          f"two sharing it {two:.2f} samples/s ({two / one:.2f}x)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
