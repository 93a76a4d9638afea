"""Several orderings of one dataset advanced in lockstep, their text-encoder passes batched.

At every stream position each stream's method runs its own `begin` (selection, scores: no text pass), then one
tuning step serves all streams at once -- one `PromptTextEncoder.encode` over the concatenated contexts of every
stream, the streams' losses summed -- and one prediction pass encodes every stream's tuned contexts together;
each method's `finish` then keeps its own results. Streams never mix:

- the loss of stream s depends only on stream s's contexts (the text transformer treats every sequence on its
  own), so the gradient of the summed loss with respect to stream s's contexts is stream s's own gradient;
- each stream keeps its own leaf parameter, its own AdamW (fresh state per sample, as one by one) and its own
  GradScaler (the method's): on GPU an overflow in one stream skips that stream's step only and every scaler
  evolves as it would alone. (AdamW is elementwise, weight decay included, so one optimizer over the
  concatenation would step the same values; per-stream optimizers also keep the scalers exact.)

Records equal those of `runner.run_stream` per stream, up to float rounding of the batched passes (a larger
batch can round differently in the last bit); `seconds` is each lockstep step's wall time shared evenly among
the streams it advanced.

Kept out of the package: only the benchmark and tests/test_lockstep.py use it. The sweep runs orderings one by
one, since lockstep records differ in the last bits and a run's records must not depend on which other
orderings share its batch.
"""
from __future__ import annotations

import time

import pandas as pd
import torch
from tqdm.auto import tqdm

from dynaprompt.methods import build_method
from dynaprompt.objectives import (
    TuningConfig,
    TuningRequest,
    autocast,
    encode_for_prediction,
    make_optimizer,
    rows_to_encode,
    tuning_loss,
)
from dynaprompt.records import make_record, records_frame
from dynaprompt.runner import run_stream
from dynaprompt.text import PromptTextEncoder


def tune_contexts_lockstep(
    text: PromptTextEncoder, requests: list[TuningRequest], config: TuningConfig, scalers: list
) -> list[torch.Tensor]:
    """`tune_contexts` for several independent requests at once: one text pass per step over all their contexts."""
    params = [request.parameters() for request in requests]
    optimizers = [make_optimizer([p], config) for p in params]
    scale = text.logit_scale()
    device = requests[0].view_features.device
    for _ in range(config.steps):
        encoded = [request.encoded(p) for request, p in zip(requests, params)]
        sizes = [contexts.shape[0] for contexts, _ in encoded]
        with autocast(device, config):
            features = text.encode(torch.cat([contexts for contexts, _ in encoded])).split(sizes)
            losses = [
                tuning_loss(f, request.view_features, scale, config, seen)
                for f, request, (_, seen) in zip(features, requests, encoded)
            ]
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        torch.stack([scaler.scale(loss) for scaler, loss in zip(scalers, losses)]).sum().backward()
        for optimizer, scaler in zip(optimizers, scalers):
            scaler.step(optimizer)
            scaler.update()
    return [request.tuned(p) for request, p in zip(requests, params)]


def lockstep_supported(method) -> bool:
    """Tuning methods split into `begin` / `finish`; the others have no text pass to batch."""
    return all(hasattr(method, name) for name in ("begin", "finish", "scaler", "tuning"))


def run_lockstep(
    kind: str, text: PromptTextEncoder, tuning: TuningConfig, config, streams: list[list[str]], labels: dict,
    view_source, progress: bool = False,
) -> list[pd.DataFrame]:
    """`build_method(kind, text, tuning, config)` over every stream in lockstep; one records table per stream."""
    # Streams may differ in length: a finished stream drops out. Methods without a tuning step (zero-shot,
    # ZERO, the training-free peers) run stream by stream.
    methods = [build_method(kind, text, tuning, config) for _ in streams]
    if not methods:
        return []
    if not lockstep_supported(methods[0]):
        return [run_stream(method, stream, labels, view_source) for method, stream in zip(methods, streams)]
    for method in methods:
        method.reset()
    records = [[] for _ in streams]
    length = max(len(stream) for stream in streams)
    bar = tqdm(total=length, desc=f"lockstep {kind} x{len(streams)}", disable=not progress)
    for position in range(length):
        active = [k for k, stream in enumerate(streams) if position < len(stream)]
        view_features = {k: view_source(streams[k][position]) for k in active}
        start = time.perf_counter()
        requests = [methods[k].begin(view_features[k]) for k in active]
        tuned = tune_contexts_lockstep(text, requests, tuning, [methods[k].scaler for k in active])
        encoded = [rows_to_encode(r, t) for r, t in zip(requests, tuned)]
        tuned_features = encode_for_prediction(text, torch.cat(encoded), tuning).split([e.shape[0] for e in encoded])
        outcomes = [methods[k].finish(r, t, f) for k, r, t, f in zip(active, requests, tuned, tuned_features)]
        seconds = (time.perf_counter() - start) / len(active)
        for k, outcome in zip(active, outcomes):
            sample_id = streams[k][position]
            records[k].append(make_record(position, sample_id, labels[sample_id], outcome, seconds))
        bar.update(1)
    bar.close()
    return [records_frame(rows) for rows in records]
