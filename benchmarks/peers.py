"""The online peers at the paper's scale: ms/sample over a long stream at C classes, once their memories are full.

    python -m benchmarks.peers [--classes 1000] [--samples 3000] [--views 64] [--dim 512] [--device cpu|cuda]

Each peer runs over the same stream of random view features drawn around random class directions (so pseudo-labels
spread over the classes and the caches fill); the table gives ms/sample over the first and the last quarter of the
stream, and the memory's size at the end. Run it from another checkout's root (PYTHONPATH) to compare
implementations side by side: only `dynaprompt.methods.build_method` and the method call are used.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

KINDS = ("tda", "boostadapter", "dmn", "onzeta", "dpe", "ecalp", "tca")


class StubText:
    """Class text features and a logit scale: all a training-free peer reads from the text side."""

    def __init__(self, features: torch.Tensor):
        self.features = features
        self.init_context = torch.zeros(4, 8, device=features.device)

    def encode(self, contexts):
        return self.features.unsqueeze(0).expand(contexts.shape[0], -1, -1)

    def encode_templates(self, templates):
        return self.features.unsqueeze(0)

    def logit_scale(self):
        return torch.tensor(100.0, device=self.features.device)


def stream(classes: int, samples: int, views: int, dim: int, device: str):
    generator = torch.Generator().manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(classes, dim, generator=generator), dim=-1)
    labels = torch.randint(0, classes, (samples,), generator=generator)
    rows = [torch.nn.functional.normalize(text[y] + 0.9 * torch.randn(views, dim, generator=generator), dim=-1)
            for y in labels]
    return text.to(device), [r.to(device) for r in rows]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--views", type=int, default=64)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from dynaprompt.methods import METHODS, build_method
    from dynaprompt.objectives import TuningConfig

    torch.set_num_threads(args.threads)
    text, rows = stream(args.classes, args.samples, args.views, args.dim, args.device)
    quarter, out = max(1, args.samples // 4), []
    for kind in [k for k in KINDS if k in METHODS]:
        method = build_method(kind, StubText(text), TuningConfig())
        method.start_stream(len(rows)) if hasattr(method, "start_stream") else method.reset()
        times = []
        for view_features in rows:
            start = time.perf_counter()
            outcome = method(view_features)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        row = {"method": kind, "classes": args.classes, "samples": args.samples,
               "first_quarter_ms": round(1000 * sum(times[:quarter]) / quarter, 3),
               "last_quarter_ms": round(1000 * sum(times[-quarter:]) / quarter, 3),
               "memory_at_end": int(outcome.buffer_size)}
        out.append(row)
        print(f"{kind:13s} first quarter {row['first_quarter_ms']:8.3f} ms/sample, last quarter "
              f"{row['last_quarter_ms']:8.3f} ms/sample, memory {row['memory_at_end']}", flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(out, handle, indent=2)
    return out


if __name__ == "__main__":
    main()
