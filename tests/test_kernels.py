"""The same bits on every x86-64 CPU with AVX2: N pretraining steps and a short method run under each ATen
capability level this CPU has and 1 and 2 threads, with the pipeline's CPU-kernel pins and without them."""
import platform

import pytest

from benchmarks.kernels import cpu_levels, measure

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the pins are x86-64's")]


@pytest.mark.parametrize("threads", [1, 2])
def test_pinned_kernels_give_the_same_weights_and_records_at_every_level(threads):
    levels = cpu_levels()
    native = {level: measure(level, False, threads, steps=12, samples=12) for level in levels}
    pinned = {level: measure(level, True, threads, steps=12, samples=12) for level in levels}
    assert {r["capability"] for r in pinned.values()} == {"AVX2"}
    assert len({(r["weights"], r["records"]) for r in pinned.values()}) == 1, pinned
    # the test can fail: this CPU's own kernels (default, AVX-512 where it has it) give other bits than AVX2's
    if "avx512" in levels:
        assert native["default"]["weights"] != native["avx2"]["weights"], native
