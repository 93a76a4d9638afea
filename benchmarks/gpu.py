"""The GPU figures in one command, for whoever has a GPU: `benchmarks/gpu.sh` (an estimated 8 minutes on one GPU,
not yet measured).

    benchmarks/gpu.sh [--device cuda] [--quick] [--out reports/benchmark-gpu.json]

At ViT-B/16 with random weights (nothing is downloaded), each part through the benchmark that measures it:
1. TPT, Online TPT and DynaPrompt ms/sample at C = 200 and C = 1000, and lockstep over 4 orderings against
   one-by-one runs (`benchmarks.bench`);
2. peak memory of one step, chunked under `run.max_text_tokens` against one pass (`benchmarks.memory`);
3. embed samples/s, DataLoader against serial (`benchmarks.embed`);
4. two processes sharing the GPU against one (`benchmarks.share`);
5. the effective text-encoder TFLOP/s of TPT at C = 1000, the figure `check.tflops_per_second` takes.
It writes `--out` (JSON) and a Markdown table next to it (`.md`) to paste into docs/benchmark.md.
`--device cpu --quick` runs every part at the bundled tiny size in well under a minute (the tests do).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks import bench, embed, memory, share


def sizes(quick: bool) -> dict:
    if quick:
        return {"arch": "tiny-clip", "classes": [10, 20], "samples": 2, "views": 8, "embed_samples": 6,
                "image_size": 28, "share_samples": 2}
    return {"arch": "ViT-B-16", "classes": [200, 1000], "samples": 12, "views": 64, "embed_samples": 64,
            "image_size": 256, "share_samples": 24}


def run(device: str, quick: bool, out: Path) -> dict:
    size, started = sizes(quick), time.perf_counter()
    report = {"device": device, "quick": quick, "arch": size["arch"], "speed": [], "lockstep": []}
    for classes in size["classes"]:
        result = bench.main(["--arch", size["arch"], "--classes", str(classes), "--samples", str(size["samples"]),
                             "--views", str(size["views"]), "--device", device, "--threads", "2",
                             "--methods", "tpt,online_tpt,dynaprompt", "--lockstep-orderings", "4",
                             "--reference-samples", "1", "--params", "", "--out", ""])
        report["speed"] += [{"classes": classes, "method": r["method"], "library_ms": r["library_ms"],
                             "reference_ms": r["reference_ms"]} for r in result["methods"]]
        report["lockstep"] += [{"classes": classes, **{k: r[k] for k in ("method", "orderings", "throughput_ratio",
                                                                          "identical_predictions", "samples_total")}}
                               for r in result["lockstep"]]
    report["tflops_per_second"] = effective_tflops(size["arch"], report["speed"])
    report["memory"] = memory.main(["--arch", size["arch"], "--classes", ",".join(map(str, size["classes"])),
                                    "--device", device, "--out", str(out.with_name(out.stem + "-memory.json"))])
    report["embed"] = embed.main(["--arch", size["arch"], "--samples", str(size["embed_samples"]), "--augmix",
                                  "--image-size", str(size["image_size"]), "--views", str(size["views"]),
                                  "--device", device, "--out", str(out.with_name(out.stem + "-embed.json"))])
    report["share"] = share.main(["--arch", size["arch"], "--classes", str(size["classes"][0]), "--samples",
                                  str(size["share_samples"]), "--device", device])
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report) + "\n")
    print(markdown(report))
    return report


def effective_tflops(arch: str, speed: list[dict]) -> float | None:
    """TPT's text FLOPs per sample over its measured seconds per sample, at the largest C: the throughput
    `check.tflops_per_second` takes, so that `dynaprompt check` estimates in this GPU's hours."""
    from benchmarks.stream import benchmark_classnames
    from dynaprompt.check import tpt_text_flops

    rows = [r for r in speed if r["method"] == "tpt" and r["library_ms"]]
    if not rows:
        return None
    row = max(rows, key=lambda r: r["classes"])
    flops = tpt_text_flops(arch, benchmark_classnames(row["classes"]))  # the names the bench encoded
    return round(flops / (row["library_ms"] / 1000) / 1e12, 3)


def markdown(report: dict) -> str:
    lines = [f"### {report['arch']} on {report['device']} ({report['wall_seconds']} s)", "",
             "| C | method | library ms/sample | plain reference ms/sample |", "|---|---|---|---|"]
    for r in report["speed"]:
        ref = "–" if r["reference_ms"] is None else f"{r['reference_ms']:.1f}"
        lines.append(f"| {r['classes']} | {r['method']} | {r['library_ms']:.1f} | {ref} |")
    lines += ["", "| C | method | lockstep over orderings: throughput x | identical predictions |", "|---|---|---|---|"]
    lines += [f"| {r['classes']} | {r['method']} | {r['throughput_ratio']:.2f} x {r['orderings']} | "
              f"{r['identical_predictions']}/{r['samples_total']} |" for r in report["lockstep"]]
    lines += ["", memory.table(report["memory"]), ""]
    e, s = report["embed"], report["share"]
    lines.append(f"Embed ({e['samples']} samples x {e['views']} views, AugMix): serial {e['serial_samples_per_s']} "
                 f"samples/s, DataLoader {e['loader_samples_per_s']} samples/s ({e['speedup']}x), identical features: "
                 f"{e['identical_features']}. Two workers sharing the device: {s['ratio']}x one worker's throughput "
                 f"({s['method']}, C={s['classes']}).")
    lines.append(f"Effective text-encoder throughput (TPT at the largest C): {report['tflops_per_second']} TFLOP/s: "
                 "set `check.tflops_per_second` to it for `dynaprompt check`'s estimate in this device's hours.")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="benchmarks/gpu.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="the bundled tiny size: a check that every part runs")
    parser.add_argument("--out", default="reports/benchmark-gpu.json")
    args = parser.parse_args(argv)
    return run(args.device, args.quick, Path(args.out))


if __name__ == "__main__":
    main()
