"""Resident memory of one run over a large feature cache: the memory-mapped fp16 cache against the whole-cache load
it replaced.

    python -m benchmarks.cache_rss [--samples 50000] [--views 64] [--dim 512] [--classes 1000] [--run-samples N]
        [--dir /tmp/...] [--out reports/benchmark-cache-rss.json]

It writes one synthetic cache of `--samples` x `--views` x `--dim` twice: as the embed stage writes it now
(`FeatureStore`: one features.npy in fp16) and in the format before (chunk files of 256 fp32 rows, which
`FeatureStore.load` concatenated whole). Then, each in a fresh subprocess, one run of TDA (`--classes` random
text classes) over `--run-samples` of the samples (default: all) in shuffled order, and the child's peak RSS
(VmHWM), next to its RSS after its imports (torch's CUDA build alone is ~600 MiB resident), so the run's
own share shows. A mixture reads only its members' chosen rows, which is the `--run-samples` case.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.rss import peak_rss_mib

CHUNK = 256


def write_caches(folder: Path, samples: int, views: int, dim: int) -> None:
    """The same random unit-norm rows in both formats, written a chunk at a time."""
    from dynaprompt.features import FeatureStore

    store = FeatureStore(folder / "mapped")
    store.folder.mkdir(parents=True)
    mapped = np.lib.format.open_memmap(store.features_file, mode="w+", dtype="float16", shape=(samples, views, dim))
    legacy = folder / "legacy"
    legacy.mkdir()
    generator = torch.Generator().manual_seed(0)
    for index, start in enumerate(range(0, samples, CHUNK)):
        rows = torch.nn.functional.normalize(torch.randn(min(CHUNK, samples - start), views, dim,
                                                         generator=generator), dim=-1).half()
        mapped[start:start + len(rows)] = rows.numpy()
        torch.save(rows.float(), legacy / f"chunk-{index:05d}.pt")  # the old format: fp32 chunks
    mapped.flush()
    del mapped
    ids = [f"s{i:06d}" for i in range(samples)]
    store.write_meta({"identity": {}, "sample_ids": ids, "shape": [samples, views, dim], "chunk_size": CHUNK,
                      "chunks_done": [], "complete": True})
    (legacy / "ids.json").write_text(json.dumps(ids))


def legacy_source(folder: Path):
    """FeatureStore.load before: every chunk loaded and concatenated into one fp32 tensor."""
    from dynaprompt.features import CachedViewSource

    ids = json.loads((folder / "ids.json").read_text())
    chunks = [torch.load(folder / f"chunk-{i:05d}.pt", weights_only=True) for i in range(-(-len(ids) // CHUNK))]
    return CachedViewSource(ids, torch.cat(chunks)), ids


def child(folder: Path, fmt: str, classes: int, run_samples: int | None) -> dict:
    """One TDA run over the cache in this process; peak RSS and time."""
    from dynaprompt.features import FeatureStore
    from dynaprompt.methods.tda import TDA
    from dynaprompt.objectives import TuningConfig
    from dynaprompt.runner import run_stream

    torch.set_num_threads(1)
    baseline = peak_rss_mib()  # torch, open_clip, pandas imported
    start = time.perf_counter()
    if fmt == "legacy":
        source, ids = legacy_source(folder / "legacy")
    else:
        store = FeatureStore(folder / "mapped")
        source, ids = store.open("cpu"), store.read_meta()["sample_ids"]
    dim = source(ids[0]).shape[-1]
    order = np.random.default_rng(0).permutation(len(ids))[: run_samples or len(ids)]
    stream = [ids[i] for i in order]

    class Text:  # random class text features: the method reads only these and the scale
        features = torch.nn.functional.normalize(torch.randn(classes, dim, generator=torch.Generator().manual_seed(1)),
                                                 dim=-1)
        init_context = torch.zeros(4, 8)

        def encode(self, contexts):
            return self.features.unsqueeze(0)

        def logit_scale(self):
            return torch.tensor(100.0)

    method = TDA(Text(), TuningConfig(), TDA.Config(query="confident"))
    records = run_stream(method, stream, {s: 0 for s in stream}, source)
    peak = peak_rss_mib()
    return {"format": fmt, "samples_read": len(records), "seconds": round(time.perf_counter() - start, 1),
            "peak_rss_mib": round(peak, 1), "baseline_rss_mib": round(baseline, 1),
            "run_rss_mib": round(peak - baseline, 1)}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cache_rss", description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=50000)
    parser.add_argument("--views", type=int, default=64)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--run-samples", default="0,6000", help="samples each run reads (0: all), comma-separated")
    parser.add_argument("--dir", default=None, help="where to write the caches (default: a temporary folder)")
    parser.add_argument("--out", default="reports/benchmark-cache-rss.json")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(child(Path(spec["folder"]), spec["format"], spec["classes"], spec["run_samples"])))
        return []
    folder = Path(args.dir or tempfile.mkdtemp(prefix="cache-rss-"))
    write_caches(folder, args.samples, args.views, args.dim)
    rows = []
    try:
        for run_samples in map(int, args.run_samples.split(",")):
            for fmt in ("legacy", "mapped"):
                spec = {"folder": str(folder), "format": fmt, "classes": args.classes, "run_samples": run_samples}
                done = subprocess.run([sys.executable, "-m", "benchmarks.cache_rss", "--child", json.dumps(spec)],
                                      capture_output=True, text=True)
                if done.returncode != 0:
                    raise RuntimeError(done.stderr[-2000:])
                row = {"cache": [args.samples, args.views, args.dim], **json.loads(done.stdout.splitlines()[-1])}
                rows.append(row)
                print(f"{fmt:7s} cache {args.samples}x{args.views}x{args.dim}, run over {row['samples_read']} "
                      f"samples: peak RSS {row['peak_rss_mib']:.0f} MiB ({row['run_rss_mib']:.0f} MiB above the "
                      f"process after its imports), {row['seconds']}s", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
