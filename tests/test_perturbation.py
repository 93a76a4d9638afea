"""The last-bit perturbation: a control that reaches every method, and chaos replicates that differ only by it."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from dynaprompt.config import settings_from_params
from dynaprompt.features import LastBitPerturbation
from dynaprompt.methods import build_method
from dynaprompt.objectives import TuningConfig
from dynaprompt.resolve import resolve
from dynaprompt.results import RunKey
from dynaprompt.runner import run_stream
from dynaprompt.schema import ParamsError

from .conftest import make_params, random_view_features


def cached(features: list[torch.Tensor], dtype=torch.float16) -> dict:
    """Features as the cache hands them out: rounded to the storage dtype, returned in fp32."""
    return {f"s{i}": f.to(dtype).float() for i, f in enumerate(features)}


def ulps_moved(before: torch.Tensor, after: torch.Tensor, dtype=torch.int16) -> np.ndarray:
    """How many units in the last place each fp16 element moved (through its integer representation)."""
    a = before.to(torch.float16).view(dtype).numpy().astype(np.int64)
    b = after.to(torch.float16).view(dtype).numpy().astype(np.int64)
    return np.abs(a - b)


def test_every_element_moves_by_at_most_its_last_bit_and_about_half_move():
    features = cached(random_view_features(3, n_views=16, dim=128, seed=1))
    perturbed = LastBitPerturbation(features.__getitem__, "float16", view_seed=0, replicate=1)
    for sample_id, original in features.items():
        after = perturbed(sample_id)
        moved = ulps_moved(original, after)
        assert set(np.unique(moved)) <= {0, 1}
        assert 0.45 < moved.mean() < 0.55  # 2048 fair coin flips
        assert torch.equal(after.to(torch.float16).float(), after)  # still a value the fp16 cache could hold
        relative = ((after - original).abs() / original.abs().clamp_min(1e-3)).max()
        assert relative < 2e-3


def test_the_same_sample_gets_the_same_perturbation_and_another_replicate_another():
    features = cached(random_view_features(2, seed=2))
    first = LastBitPerturbation(features.__getitem__, "float16", view_seed=0, replicate=1)
    again = LastBitPerturbation(features.__getitem__, "float16", view_seed=0, replicate=1)
    other_replicate = LastBitPerturbation(features.__getitem__, "float16", view_seed=0, replicate=2)
    other_seed = LastBitPerturbation(features.__getitem__, "float16", view_seed=1, replicate=1)
    # order of the calls does not matter: each sample's generator is seeded by its own id
    assert torch.equal(first("s1"), again("s1")) and torch.equal(first("s0"), again("s0"))
    assert not torch.equal(first("s0"), other_replicate("s0"))
    assert not torch.equal(first("s0"), other_seed("s0"))
    assert not torch.equal(first("s0"), first("s1").roll(1))


def test_float32_caches_flip_their_own_last_bit():
    features = cached(random_view_features(1, seed=3), dtype=torch.float32)
    after = LastBitPerturbation(features.__getitem__, "float32", view_seed=0)("s0")
    before = features["s0"]
    moved = np.abs(before.view(torch.int32).numpy().astype(np.int64) - after.view(torch.int32).numpy().astype(np.int64))
    assert set(np.unique(moved)) <= {0, 1} and moved.any()


def test_features_not_in_the_storage_precision_are_refused_with_the_sample_named():
    raw = {"odd": torch.full((2, 4), 1.0 + 2.0 ** -20)}  # not an fp16 value
    with pytest.raises(ValueError, match="'odd'.*embed.dtype"):
        LastBitPerturbation(raw.__getitem__, "float16", view_seed=0)("odd")


def test_it_reaches_a_method_that_reads_only_the_original_view(text):
    """ECALP reads view 0 only, so another view seed changes nothing for it; the perturbation does."""
    features = cached(random_view_features(12, n_views=8, dim=128, seed=4))
    ids = list(features)
    labels = {s: i % 3 for i, s in enumerate(ids)}

    def entropies(source):
        method = build_method("ecalp", text, TuningConfig())
        return run_stream(method, ids, labels, source)["entropy_after"].to_numpy()

    plain = entropies(features.__getitem__)
    replicate = entropies(LastBitPerturbation(features.__getitem__, "float16", view_seed=0, replicate=1))
    assert not np.array_equal(plain, replicate)
    assert np.allclose(plain, replicate, atol=0.05)  # a last-bit change, not another stream


def test_a_replicate_is_its_own_run_with_its_own_identity(image_root):
    settings = settings_from_params(make_params(image_root))
    method = next(iter(settings.methods))
    ordering = next(iter(settings.orderings))
    grid = resolve(settings, RunKey("toy", method, ordering), "random(0)")
    again = resolve(settings, RunKey("toy", method, ordering), "random(0)")
    replicate = resolve(settings, RunKey("toy", method, ordering, replicate=1), "random(0)")
    assert grid.fingerprint == again.fingerprint != replicate.fingerprint
    assert grid.run.perturbation == f"lastbit(seed={settings.views.view_seed},replicate=0)"
    assert replicate.run.describe()["run.perturbation"].endswith("replicate=1)")
    assert replicate.key.cell == f"{ordering}~rep1"
    assert RunKey.from_cell("toy", method, f"{ordering}~seed2~rep3") == RunKey("toy", method, ordering, 2, 3)


def test_without_the_perturbation_a_replicate_is_refused(image_root):
    params = make_params(image_root)
    params["run"] = {**params.get("run", {}), "last_bit": False}
    settings = settings_from_params(params)
    method, ordering = next(iter(settings.methods)), next(iter(settings.orderings))
    plain = resolve(settings, RunKey("toy", method, ordering), "random(0)")
    assert plain.run.perturbation == "none"
    with pytest.raises(ParamsError, match="replicate 1 needs `run.last_bit: true`"):
        resolve(settings, RunKey("toy", method, ordering, replicate=1), "random(0)")


def test_the_flag_is_a_known_params_key(image_root):
    params = make_params(image_root)
    params["run"] = {**params.get("run", {}), "last_bit": True}
    assert settings_from_params(params).run.last_bit is True
    assert replace(settings_from_params(params).run, last_bit=False).last_bit is False


def chaos_params(image_root, **chaos) -> dict:
    params = make_params(image_root)
    params["methods"] = {"zero_shot": {"kind": "zero_shot"}, "online_tpt": {"kind": "online_tpt"},
                         "tda": {"kind": "tda"}}
    params["orderings"] = {"shuffle": {"kind": "shuffle", "seeds": 3},
                           "class_blocked": {"kind": "class_blocked", "seeds": 2}}
    params["sweep"] = {"datasets": ["toy"], "view_seeds": [0, 1], "chaos": chaos}
    return params


def test_the_chaos_group_replicates_the_named_cells_of_every_order_dependent_method(image_root):
    from dynaprompt.plan import expand_plan

    settings = settings_from_params(chaos_params(image_root, orderings=["shuffle", "class_blocked-1"], replicates=2))
    chaos = sorted(k.cell for k, group in expand_plan(settings) if group == "chaos" and k.method == "tda")
    assert chaos == ["class_blocked-1~rep1", "class_blocked-1~rep2", "shuffle-0~rep1", "shuffle-0~rep2"]
    methods = {k.method for k, group in expand_plan(settings) if group == "chaos"}
    assert methods == {"online_tpt", "tda"}  # zero-shot's orderings reorder one set of records: nothing to replicate
    main = {k for k, group in expand_plan(settings) if group == "main"}
    assert all(k.replicate == 0 for k in main) and RunKey("toy", "tda", "shuffle-0") in main


def test_no_chaos_group_without_replicates_and_unknown_orderings_are_named(image_root):
    from dynaprompt.plan import expand_plan

    settings = settings_from_params(chaos_params(image_root, orderings=["shuffle"], replicates=0))
    assert not [k for k, group in expand_plan(settings) if group == "chaos"]
    with pytest.raises(ParamsError, match=r"sweep.chaos.orderings.*'shufle'.*did you mean"):
        settings_from_params(chaos_params(image_root, orderings=["shufle"], replicates=1))
