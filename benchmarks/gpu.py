"""The GPU figures in one command, for whoever is lent a GPU: `benchmarks/gpu.sh`, within 8 minutes on one H100.

    benchmarks/gpu.sh [--device cuda] [--quick] [--out reports/benchmark-gpu] [--parts coverage,resume,...]
        [--overall-s 460]

ViT-B/16 with random weights (nothing is downloaded), the paper's settings read from configs/paper.yaml
(`run.max_text_tokens`, `views.n_views`, `embed.loader_workers`, `embed.samples_per_batch`). Each part is a
benchmark module run in its own subprocess and process group, under a wall-clock budget (PARTS), and within the
overall budget: a part that fails is recorded with its error and the others go on; a part past its budget is
killed with everything it started, and what it had written stays.

1. environment: Python, torch, the GPU, where open_clip came from (the carried wheels?), /dev/shm;
2. coverage: every kind in `dynaprompt.methods.METHODS` through `run_stream` at 1000 classes, chunked: ms/sample,
   peak MiB, mean selected prompts, and the effective TFLOP/s that `check.tflops_per_second` takes;
3. step: one tuning step at 1 prompt (TPT) and 10 (DynaPrompt), chunked and in one pass: time and peak memory;
4. resume: checkpoint and resume of every stateful method, predictions against an uninterrupted run;
5. pinning: the sweep's worker initializer in spawned children, each seeing only its GPU;
6. embed: the DataLoader at the paper's workers and batch, against the serial path, with the /dev/shm headroom;
7. share: two worker processes sharing the GPU against one;
8. lockstep: TPT and DynaPrompt against their plain references, and orderings in lockstep against one by one.

`--out` gets index.json (rewritten after every part: each part's status ok / failed / timed out / skipped, its
seconds and budget, file and error), one <part>.json per part (written by the part as it goes), log.txt (all the
parts' output) and summary.md (the tables, also printed). `--device cpu --quick` runs every part at the bundled
tiny size (the tests do).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import yaml

from benchmarks import memory

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "configs" / "paper.yaml"
OVERALL_S = 460  # the issue's 8 minutes on one H100 (issue 26, item 9), less the wheels' install and a margin
QUICK_OVERALL_S = 1800  # --quick on a shared 2-core CPU: a cap, not a target
QUICK_PART_S = 300
MIN_PART_S = 10  # a part is not started with less left than this
PART_SHARE = 0.8  # of its budget a part spends starting items (methods, cases); the rest finishes the last one


@dataclass(frozen=True)
class Part:
    name: str
    module: str
    budget_s: float  # at the full size on one H100: a first allotment, not yet measured (no GPU was lent)


PARTS = (Part("environment", "environment", 30), Part("coverage", "coverage", 120), Part("step", "memory", 75),
         Part("resume", "resume", 60), Part("pinning", "pinning", 40), Part("embed", "embed", 60),
         Part("share", "share", 45), Part("lockstep", "bench", 45))


def sizes(quick: bool) -> dict:
    """The size of every part: the paper's at ViT-B/16, or a tiny model's, chunked all the same. The tiny model
    (quick-clip.json) is the bundled tiny-clip with ViT-B/16's 12 image blocks, so that every method's default
    options apply (TTL adapts blocks 9 to 11)."""
    if quick:
        return {"arch": "benchmarks/quick-clip.json", "classes": 20, "samples": 2, "views": 8, "max_text_tokens": 128,
                "resume_classes": 20, "resume_samples": 5, "every": 2, "die_at": 3, "embed_samples": 6,
                "serial_samples": 3, "image_size": 28, "workers": 2, "samples_per_batch": 2, "augmix": False,
                "share_samples": 2, "lockstep_samples": 2, "chunked_only": True}
    paper = yaml.safe_load(PAPER.read_text())
    return {"arch": "ViT-B-16", "classes": 1000, "samples": 8, "views": paper["views"]["n_views"],
            "max_text_tokens": paper["run"]["max_text_tokens"], "resume_classes": 200, "resume_samples": 9,
            "every": 3, "die_at": 7, "embed_samples": 256, "serial_samples": 32, "image_size": 256,
            "workers": paper["embed"]["loader_workers"], "samples_per_batch": paper["embed"]["samples_per_batch"],
            "augmix": paper["views"]["augmix"], "share_samples": 24, "lockstep_samples": 4, "chunked_only": False}


def part_argv(name: str, size: dict, device: str, out: Path, budget_s: float) -> list[str]:
    """The part's command-line arguments."""
    common = ["--arch", size["arch"], "--device", device]
    tokens = ["--max-text-tokens", str(size["max_text_tokens"])]
    inner = ["--budget-s", f"{PART_SHARE * budget_s:.0f}"]
    argv = {
        "environment": ["--device", device],
        "coverage": [*common, *tokens, *inner, "--classes", str(size["classes"]), "--samples", str(size["samples"]),
                     "--views", str(size["views"])],
        "step": [*common, *inner, "--classes", str(size["classes"]), "--max-text-tokens",
                 str(size["max_text_tokens"]), "--repeats", "2", *(["--chunked-only"] if size["chunked_only"] else [])],
        "resume": [*common, *tokens, *inner, "--classes", str(size["resume_classes"]), "--samples",
                   str(size["resume_samples"]), "--views", str(size["views"]), "--every", str(size["every"]),
                   "--die-at", str(size["die_at"])],
        "pinning": ["--device", device],
        "embed": [*common, "--samples", str(size["embed_samples"]), "--serial-samples", str(size["serial_samples"]),
                  "--views", str(size["views"]), "--image-size", str(size["image_size"]), "--workers",
                  str(size["workers"]), "--samples-per-batch", str(size["samples_per_batch"]),
                  *(["--augmix"] if size["augmix"] else [])],
        "share": [*common, *tokens, "--classes", str(size["classes"]), "--samples", str(size["share_samples"])],
        "lockstep": [*common, *tokens, "--classes", str(size["classes"]), "--samples", str(size["lockstep_samples"]),
                     "--views", str(size["views"]), "--methods", "tpt,dynaprompt", "--lockstep-orderings", "3",
                     "--reference-samples", "1", "--threads", "1", "--params", ""],
    }[name]
    return [*argv, "--out", str(out)]


def stream_output(process: subprocess.Popen, log, tail: deque) -> None:
    """Copy the part's output to the terminal and the log, keeping its last lines for the index."""
    for line in process.stdout:
        sys.stdout.write(line)
        log.write(line)
        tail.append(line)
    sys.stdout.flush()
    log.flush()


def kill_group(process: subprocess.Popen) -> None:
    """End the part's process group: the part, its case subprocesses, loader workers, spawned children."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def part_command(part: Part, size: dict, device: str, out: Path, budget_s: float) -> list[str]:
    return [sys.executable, "-m", f"benchmarks.{part.module}", *part_argv(part.name, size, device, out, budget_s)]


def run_part(name: str, command: list[str], budget_s: float, log) -> dict:
    """One part in its own process group, killed at `budget_s` with all it started; its status, seconds, error."""
    log.write(f"\n===== {name}: {' '.join(command)}\n")
    log.flush()
    print(f"== {name} (budget {budget_s:.0f} s)", flush=True)
    started, tail = time.monotonic(), deque(maxlen=25)
    process = subprocess.Popen(command, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    reader = threading.Thread(target=stream_output, args=(process, log, tail), daemon=True)
    reader.start()
    try:
        code = process.wait(timeout=budget_s)
        status = "ok" if code == 0 else "failed"
    except subprocess.TimeoutExpired:
        code, status = None, "timed out"
    kill_group(process)  # also after an exit: nothing of a part outlives it
    process.wait()
    reader.join(timeout=10)
    error = None if status == "ok" else "".join(tail).strip()[-2000:] or f"exit {code}"
    return {"part": name, "status": status, "seconds": round(time.monotonic() - started, 1),
            "budget_s": round(budget_s), "returncode": code, "error": error}


def write_json(path: Path, data) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(partial, path)


def run(device: str, quick: bool, out: Path, names: list[str], overall_s: float) -> dict:
    size, started = sizes(quick), time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    index = {"command": " ".join(["benchmarks/gpu.sh", *sys.argv[1:]]), "device": device, "quick": quick,
             "sizes": size, "overall_budget_s": overall_s, "started_at": datetime.now(timezone.utc).isoformat(),
             "parts": [], "wall_seconds": None, "finished": False}
    with open(out / "log.txt", "w") as log:
        for part in (p for p in PARTS if p.name in names):
            left = overall_s - (time.monotonic() - started)
            budget = min(QUICK_PART_S if quick else part.budget_s, left)
            file = out / f"{part.name}.json"
            file.unlink(missing_ok=True)  # a file from an earlier run must not pass for this one's
            if budget < MIN_PART_S:
                row = {"part": part.name, "status": "skipped", "seconds": 0, "budget_s": round(budget),
                       "returncode": None, "error": f"the overall {overall_s:.0f} s budget was spent"}
            else:
                row = run_part(part.name, part_command(part, size, device, file, budget), budget, log)
            if row["status"] == "ok" and not file.is_file():
                row.update(status="failed", error="the part exited 0 but wrote no file")
            row["file"] = file.name if file.is_file() else None
            row["problems"] = problems(part.name, load(out, part.name)) if row["file"] else []
            index["parts"].append(row)
            index["wall_seconds"] = round(time.monotonic() - started, 1)
            write_json(out / "index.json", index)
            print(f"== {part.name}: {row['status']} in {row['seconds']} s", flush=True)
    index["finished"] = True
    write_json(out / "index.json", index)
    summary = markdown(index, out)
    (out / "summary.md").write_text(summary + "\n")
    print(summary)
    return index


# ----------------------------------------------------------------------------------------------- summary


def problems(name: str, report) -> list[str]:
    """What in a part's file did not come out as it should: a method that failed, a resume that differs, ..."""
    try:
        if name in ("coverage", "resume"):
            found = [f"{r['method']}: {r['status']}" for r in report["rows"] if r["status"] != "ok"]
            return found + ([] if report["complete"] else ["stopped before every method had run"])
        if name == "step":
            return [f"{r['method']} U={r['prompts']} chunked={r['chunked']}: {r['note']}" for r in report
                    if not r["measured"] and "peak_mib" not in r]
        if name == "pinning":
            return [] if report["ok"] else ["a worker was not pinned to its slot's GPU"]
        if name == "environment":
            return [f"{m}: {v['error']}" for m, v in report["modules"].items() if "error" in v and m != "dask_cuda"]
        if name == "lockstep":
            return ([f"{r['method']}: {r['identical']}/{r['n']} predictions as the reference's"
                     for r in report["methods"] if r["identical"] is not None and r["identical"] < r["n"]]
                    + [f"{r['method']} lockstep: {r['identical_predictions']}/{r['samples_total']} as one by one"
                       for r in report["lockstep"] if r["identical_predictions"] < r["samples_total"]])
    except (KeyError, TypeError) as error:  # a part killed half-way
        return [f"its file is incomplete ({type(error).__name__} {error})"]
    return []


def load(out: Path, name: str):
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def cell(value, digits: int = 1) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def parts_section(index: dict) -> list[str]:
    lines = ["| part | status | s | budget s | error or problems |", "|---|---|---|---|---|"]
    for row in index["parts"]:
        error = (row["error"] or "").strip().splitlines()[-1:] or ["; ".join(row.get("problems", []))]
        lines.append(f"| {row['part']} | {row['status']} | {row['seconds']} | {row['budget_s']} | "
                     f"{error[0][:200].replace('|', '/')} |")
    return lines


def environment_section(env: dict) -> list[str]:
    gpu, clip, shm = env["gpu"], env["modules"]["open_clip"], env["shm"]
    card = f"{gpu['name']} ({gpu['total_gib']} GiB, driver {gpu['driver']})" if gpu else "no GPU"
    return [f"Python {env['python']}, torch {env['torch']} (CUDA {env['torch_cuda']}), {card}, {env['cpus']} CPUs, "
            f"/dev/shm {shm.get('free_gib')} of {shm.get('total_gib')} GiB free; open_clip {clip.get('version')} from "
            f"{clip.get('file')}."]


def status_cell(row: dict) -> str:
    return row["status"] + (f": {row['error'][:120]}".replace("|", "/") if row.get("error") else "")


def coverage_section(report: dict) -> list[str]:
    c = report["config"]
    lines = [f"Every method through `run_stream` ({c['arch']}, {c['classes']} classes, {c['samples']} samples x "
             f"{c['views']} views, chunks of {c['max_text_tokens']} tokens, on {c['device']}):", "",
             "| method | input | ms/sample | method ms | peak MiB | mean selected | status |",
             "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['method']} | {'pixels' if r.get('reads_images') else 'features'} | "
                     f"{cell(r.get('ms_per_sample'))} | {cell(r.get('method_ms'))} | {cell(r.get('peak_mib'), 0)} | "
                     f"{cell(r.get('mean_selected'), 2)} | {status_cell(r)} |")
    if not report.get("complete"):
        lines.append("(the part stopped before every method had run)")
    t = report.get("tflops")
    if t:
        how = "chunked" if t["chunked"] else "in one pass"
        lines += ["", f"Effective text-encoder throughput: {t['tflops_per_second']} TFLOP/s (TPT: "
                      f"{t['tflop_per_sample']} TFLOP per sample over {t['tpt_method_ms']} ms, counted {how} as "
                      "`dynaprompt check` counts it): set `check.tflops_per_second` to it for `dynaprompt check`'s "
                      "estimate in this GPU's hours."]
    return lines


def resume_section(report: dict) -> list[str]:
    c = report["config"]
    lines = [f"Checkpoint and resume ({c['classes']} classes, {c['samples']} samples, a checkpoint every {c['every']},"
             f" lost at sample {c['die_at']}):", "",
             "| method | resumed at | identical predictions | max abs dH | status |", "|---|---|---|---|---|"]
    for r in report["rows"]:
        same = f"{r['identical_predictions']}/{r['samples']}" if "samples" in r else "–"
        lines.append(f"| {r['method']} | {cell(r.get('resumed_at'))} | {same} | {cell(r.get('max_entropy_diff'), 6)} | "
                     f"{status_cell(r)} |")
    return lines


def pinning_section(report: dict) -> list[str]:
    workers = "; ".join(f"slot {w['slot']}: CUDA_VISIBLE_DEVICES={w['visible']}, {w['cuda_devices']} GPU(s) seen, "
                        f"{'ok' if w['ok'] else 'WRONG'}" for w in report["workers"])
    fake = " (a faked node: CUDA_VISIBLE_DEVICES only)" if report["faked_node"] else ""
    return [f"Pinning{fake}: {report['node_gpus']} GPU(s), {report['workers_per_gpu']} worker(s) per GPU: {workers}. "
            f"{'All pinned as they should be.' if report['ok'] else 'NOT as they should be.'}"]


def embed_section(rows: list) -> list[str]:
    e = rows[-1]
    shm = e["shm"]
    return [f"Embed ({e['samples']} samples x {e['views']} views{', AugMix' if e['augmix'] else ''}, {e['workers']} "
            f"workers x {e['samples_per_batch']} samples a batch): DataLoader {e['loader_samples_per_s']} samples/s, "
            f"serial {e['serial_samples_per_s']} ({e['serial_samples']} samples), {e['speedup']}x; identical features: "
            f"{e['identical_features']} (max |diff| {e['max_abs_diff']:.2g}). /dev/shm: {shm['shm_free_gib']} GiB free "
            f"for {shm['in_flight_gib']} GiB in flight ({shm['batch_mib']} MiB a batch x prefetch {shm['prefetch']} x "
            f"workers): headroom {shm['headroom_gib']} GiB; {shm['note'] or 'the loader ran as asked'}."]


def share_section(s: dict) -> list[str]:
    return [f"Two workers sharing the device: {s['ratio']}x one worker's throughput ({s['method']}, C={s['classes']}: "
            f"{s['one_worker_samples_per_s']} against {s['two_workers_samples_per_s']} samples/s)."]


def lockstep_section(report: dict) -> list[str]:
    lines = ["| method | library ms | reference ms | speedup | identical |", "|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {cell(r['library_ms'])} | {cell(r['reference_ms'])} | {cell(r['speedup'])} | "
              f"{r['identical']}/{r['n']} |" for r in report["methods"]]
    lines += ["", "| method | orderings | one-by-one ms | lockstep ms | throughput x | identical |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['orderings']} | {cell(r['one_by_one_ms_per_sample'])} | "
              f"{cell(r['lockstep_ms_per_sample'])} | {r['throughput_ratio']:.2f} | "
              f"{r['identical_predictions']}/{r['samples_total']} |" for r in report["lockstep"]]
    return lines


SECTIONS = {"environment": environment_section, "coverage": coverage_section, "step": lambda rows: [memory.table(rows)],
            "resume": resume_section, "pinning": pinning_section, "embed": embed_section, "share": share_section,
            "lockstep": lockstep_section}


def markdown(index: dict, out: Path) -> str:
    size = index["sizes"]
    lines = [f"### {size['arch']} on {index['device']}: {index['wall_seconds']} s of the {index['overall_budget_s']} s "
             "budget", "", *parts_section(index)]
    for row in index["parts"]:
        report = load(out, row["part"])
        if report is None:
            continue
        try:
            section = SECTIONS[row["part"]](report)
        except (KeyError, TypeError, IndexError) as error:  # a part killed half-way: say so, keep the rest
            section = [f"({row['part']}: its file is incomplete: {type(error).__name__} {error})"]
        lines += ["", f"#### {row['part']}", "", *section]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="benchmarks/gpu.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="the bundled tiny size: a check that every part runs")
    parser.add_argument("--out", default="reports/benchmark-gpu", help="the folder for the index and the parts")
    parser.add_argument("--parts", default=",".join(p.name for p in PARTS), help="which parts, in their order")
    parser.add_argument("--overall-s", type=float, default=None, help=f"wall-clock budget (default {OVERALL_S})")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.parts.split(",") if n.strip()]
    unknown = sorted(set(names) - {p.name for p in PARTS})
    if unknown:
        raise SystemExit(f"unknown --parts {unknown}; choose from {[p.name for p in PARTS]}")
    overall = args.overall_s if args.overall_s is not None else (QUICK_OVERALL_S if args.quick else OVERALL_S)
    return run(args.device, args.quick, Path(args.out).resolve(), names, overall)


if __name__ == "__main__":
    main()
