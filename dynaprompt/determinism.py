"""The CPU kernels that decide the order of float operations, pinned so that a stage gives the same bits on every
Intel x86-64 CPU with AVX2, whatever else it supports.

A 257x513 @ 513x129 matmul followed by LayerNorm and softmax gives different last bits under ATen's AVX-512
kernels, its AVX2 kernels and MKL's conditional-bitwise-reproducibility mode; 700 pretraining steps amplify them
into different weights. The pins, applied to the environment before torch loads (by `dynaprompt`, `stages` and the
flows' environment, whichever a process imports first):

- ATEN_CPU_CAPABILITY=avx2: ATen's vectorised kernels (softmax, LayerNorm, GELU, the view transforms) take their
  AVX2 path, which every x86-64 CPU since 2013 has;
- MKL_CBWR=AVX2,STRICT: MKL's conditional bitwise reproducibility on its AVX2 code path, strict (reductions do not
  depend on the thread count where MKL can promise it). On Intel CPUs only: on other vendors MKL replaces it by
  its AUTO branch (oneMKL guide) and runs its own SGEMM and vector-math kernels, whose sqrt is built on the chip's
  approximate `rsqrtps`; no setting reproduces an AMD CPU's bits on Intel or back (README, "The same numbers on
  every machine");
- ONEDNN_MAX_CPU_ISA=AVX2: oneDNN (convolutions, some matmuls) dispatches no higher than AVX2;
- the thread count, which splits reductions, is a param (`run.threads`, `pretrain.threads`), part of a run's
  identity, and the embed stage's workers encode with one thread each.

Not pinned, and so not promised: CUDA (cuDNN/cuBLAS pick algorithms by GPU; a run records its device), non-Intel
x86 CPUs (above) and non-x86 CPUs (ARM's NEON/SVE kernels and its BLAS): there results repeat on the same CPU
model with the same thread count, not across models. `DYNAPROMPT_CPU_KERNELS=native` lifts the pins (faster on
AVX-512 machines; the numbers are then this CPU's).
"""
from __future__ import annotations

import os
import platform

CPU_PINS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT", "ONEDNN_MAX_CPU_ISA": "AVX2"}
SWITCH = "DYNAPROMPT_CPU_KERNELS"  # "pinned" (default) | "native"


def x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def pin_cpu_kernels(environ=os.environ) -> dict:
    """Set the pins in `environ` (before torch loads: they are read once, at its first use); what was set."""
    if environ.get(SWITCH, "pinned") == "native" or not x86_64():
        return {}
    environ.update(CPU_PINS)
    return dict(CPU_PINS)


def kernels_in_use() -> dict:
    """What this process computes with (for the run's records): the pins, ATen's capability, threads."""
    import torch

    return {"pinned": {k: os.environ.get(k) for k in CPU_PINS}, "aten": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "machine": platform.machine()}
