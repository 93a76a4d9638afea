"""Peak memory of one tuning step, chunked under `run.max_text_tokens` against one unchunked pass.

    python -m benchmarks.memory [--arch ViT-B-16] [--classes 200,1000] [--device cpu|cuda] [--max-text-tokens 8192]
        [--threads 2] [--budget-gib G] [--repeats 1] [--chunked-only] [--budget-s S]
        [--out reports/benchmark-memory.json]

Each case runs in a fresh subprocess (`--case`), so one case's allocations never count for another: a
random-weight CLIP of `--arch`, a prompt encoder over the first C ImageNet class names, and one step of the
tuning machinery (`objectives.tune_contexts`: forward, backward and AdamW over U prompts x C classes, on 64
random view features) -- TPT's step (U = 1) and a DynaPrompt step that selected 10 prompts (U = 10).

- CPU: the child's peak resident set size (VmHWM), and the same after only loading the model; the step's
  own share is the difference. glibc keeps freed heap pages resident, so RSS would count every chunk's
  activations ever allocated, not the live ones: children run with `MALLOC_MMAP_THRESHOLD_=131072` (tensors
  above 128 KiB are mapped and given back when freed), so that RSS tracks what is live. `--glibc-default`
  measures without it.
- CUDA: `torch.cuda.max_memory_allocated` over the step (model included), and the model's share before it.

A case whose estimated peak exceeds `--budget-gib` (default: 80% of what the machine has free) is not started;
its row gives the estimate (linear in U from the U = 1 case, which the activations are) and says so. A case that
fails (out of memory, say) has its error in its row and the others go on, except U = 10 after a failed U = 1 in
the same mode (it would fail too); once `--budget-s` is spent the rest are listed as skipped. `--repeats N` runs N
steps per case: the peak is over all of them, `seconds` is the last one's (on a GPU the first step also sets up
kernels). `--chunked-only` leaves out the one-pass cases. Rows go to `--out` after every case, as a list of
{arch, classes, method, prompts, chunked, max_text_tokens, peak_mib, step_mib, device, measured, seconds}.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.rss import peak_rss_mib

CASES = (("tpt", 1), ("dynaprompt", 10))


def available_gib(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0] / 2**30
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def run_case(arch: str, classes: int, prompts: int, max_tokens: int, device: str, threads: int,
             repeats: int = 1) -> dict:
    """`repeats` steps in this process; their memory figures and the last one's time."""
    import torch
    from open_clip import IMAGENET_CLASSNAMES

    from dynaprompt.model import ModelSpec, load_clip
    from dynaprompt.objectives import TuningConfig, make_grad_scaler, tune_contexts
    from dynaprompt.text import PromptTextEncoder

    torch.set_num_threads(threads)
    clip = load_clip(ModelSpec(arch=arch, pretrained=None, device=device))
    names = list(IMAGENET_CLASSNAMES)[:classes]
    text = PromptTextEncoder(clip.model, clip.tokenizer, names, max_tokens=max_tokens)
    tuning = TuningConfig()
    dim = clip.model.text_projection.shape[1]
    generator = torch.Generator().manual_seed(0)
    views = torch.nn.functional.normalize(torch.randn(64, dim, generator=generator), dim=-1).to(clip.device)
    contexts = (text.init_context.unsqueeze(0).repeat(prompts, 1, 1)
                + 0.01 * torch.randn(prompts, *text.init_context.shape, generator=generator).to(clip.device))
    cuda = clip.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        model_mib = torch.cuda.memory_allocated(clip.device) / 2**20
        torch.cuda.reset_peak_memory_stats(clip.device)
    else:
        model_mib = peak_rss_mib()
    for _ in range(repeats):
        start = time.perf_counter()
        tune_contexts(text, contexts, views, tuning, make_grad_scaler(clip.device, tuning))
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(clip.device) / 2**20 if cuda else peak_rss_mib()
    return {"peak_mib": round(peak, 1), "model_mib": round(model_mib, 1), "step_mib": round(peak - model_mib, 1),
            "seconds": round(seconds, 2), "sequence_length": text.sequence_length,
            "tokens": prompts * classes * text.sequence_length,
            "device": torch.cuda.get_device_name(clip.device) if cuda else "cpu"}


def measure(arch, classes, method, prompts, chunked, max_tokens, device, threads, glibc_default=False,
            repeats=1) -> dict:
    """One case in a fresh subprocess: its figures, or {"error": the end of what it printed} if it failed."""
    command = [sys.executable, "-m", "benchmarks.memory", "--case", json.dumps(
        {"arch": arch, "classes": classes, "prompts": prompts, "max_tokens": max_tokens if chunked else 0,
         "device": device, "threads": threads, "repeats": repeats})]
    env = dict(os.environ) if glibc_default else {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}: {done.stderr.strip()[-1500:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def rows_for(arch: str, classes: int, device: str, max_tokens: int, threads: int, budget_gib: float,
             glibc_default: bool = False, repeats: int = 1, chunked_only: bool = False, deadline: float = math.inf,
             rows: list | None = None, save=lambda rows: None) -> list[dict]:
    """The cases at `classes`, appended to `rows` and passed to `save` one by one."""
    rows = [] if rows is None else rows
    for chunked in (True,) if chunked_only else (False, True):
        single = None
        for method, prompts in CASES:
            row = {"arch": arch, "classes": classes, "method": method, "prompts": prompts, "chunked": chunked,
                   "max_text_tokens": max_tokens if chunked else 0}
            estimate = None if single is None else single["model_mib"] + prompts * single["step_mib"]
            if time.monotonic() > deadline:
                rows.append({**row, "measured": False, "note": "skipped: the part's budget was spent"})
            elif prompts > 1 and single is None:  # the U = 1 case failed: a larger one would too, and cost more
                rows.append({**row, "measured": False, "note": "skipped: the U = 1 case failed"})
            elif estimate is not None and not chunked and estimate / 1024 > budget_gib:
                rows.append({**row, "peak_mib": round(estimate, 1), "step_mib": round(prompts * single["step_mib"], 1),
                             "measured": False, "device": single["device"],
                             "note": f"estimated as {prompts} x the U = 1 step: over the {budget_gib:.0f} GiB budget"})
            else:
                result = measure(arch, classes, method, prompts, chunked, max_tokens, device, threads, glibc_default,
                                 repeats)
                rows.append(case_row(row, result, glibc_default or device != "cpu"))
                if prompts == 1 and "error" not in result:
                    single = result
            print(case_line(rows[-1]), flush=True)
            save(rows)
    return rows


def case_row(row: dict, result: dict, glibc_default: bool) -> dict:
    """A measured case's row, or a failed one's with its error."""
    if "error" in result:
        return {**row, "measured": False, "note": "failed", "error": result["error"]}
    return {**row, **result, "measured": True, "malloc": "glibc default" if glibc_default else "mmap threshold 128 KiB"}


def case_line(row: dict) -> str:
    what = f"{row['arch']} C={row['classes']} {row['method']} U={row['prompts']} " + (
        "chunked" if row["chunked"] else "one pass")
    if row["measured"]:
        return f"{what}: peak {row['peak_mib']:.0f} MiB (step {row['step_mib']:.0f} MiB) in {row['seconds']:.1f}s"
    return f"{what}: {row['note']}" + (f": {row['error'][-300:]}" if "error" in row else "")


def table(rows: list[dict]) -> str:
    lines = ["| arch | C | method | U | pass | peak MiB | step MiB | measured | s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        how = f"chunks of {r['max_text_tokens']} tokens" if r["chunked"] else "one pass"
        peak, step = (f"{r[k]:.0f}" if k in r else "–" for k in ("peak_mib", "step_mib"))
        state = "yes" if r["measured"] else ("estimated" if "peak_mib" in r else r["note"])
        lines.append(f"| {r['arch']} | {r['classes']} | {r['method']} | {r['prompts']} | {how} | {peak} | {step} "
                     f"| {state} | {r.get('seconds', '–')} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="ViT-B-16")
    parser.add_argument("--classes", default="200,1000")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-text-tokens", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget-gib", type=float, default=None)
    parser.add_argument("--glibc-default", action="store_true", help="CPU: measure under glibc's default malloc")
    parser.add_argument("--repeats", type=int, default=1, help="steps per case (the time is the last one's)")
    parser.add_argument("--chunked-only", action="store_true", help="leave out the one-pass cases")
    parser.add_argument("--budget-s", type=float, default=math.inf, help="start no case after this many seconds")
    parser.add_argument("--out", default="reports/benchmark-memory.json")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        case = json.loads(args.case)
        print(json.dumps(run_case(case["arch"], case["classes"], case["prompts"], case["max_tokens"], case["device"],
                                  case["threads"], case["repeats"])))
        return []
    budget = args.budget_gib if args.budget_gib is not None else 0.8 * available_gib(args.device)
    out, rows, deadline = Path(args.out), [], time.monotonic() + args.budget_s
    out.parent.mkdir(parents=True, exist_ok=True)
    save = lambda rows: out.write_text(json.dumps(rows, indent=2) + "\n")  # noqa: E731 -- after every case
    for classes in map(int, args.classes.split(",")):
        rows_for(args.arch, classes, args.device, args.max_text_tokens, args.threads, budget, args.glibc_default,
                 args.repeats, args.chunked_only, deadline, rows, save)
    save(rows)
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
