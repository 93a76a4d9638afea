"""The benchmark, kept outside the package: `bench` (harness), `reference` (plain reference, test oracle),
`stream`, `clock` and `lockstep`."""

import dynaprompt  # noqa: E402,F401  (the pipeline's CPU-kernel pins, before a benchmark imports torch)
