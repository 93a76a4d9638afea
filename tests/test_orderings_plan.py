"""Orderings as data and the sweep plan."""
import pandas as pd
import pytest

from dynaprompt.config import settings_from_params
from dynaprompt.orderings import order_samples
from dynaprompt.plan import expand_plan
from dynaprompt.results import RunKey


def toy_manifest(domains=("a", "b", "c"), per_domain=10):
    rows = [{"sample_id": f"{d}/{i}", "label": i % 3, "domain": d} for d in domains for i in range(per_domain)]
    return pd.DataFrame(rows)


def test_shuffle_is_a_seeded_permutation():
    manifest = toy_manifest()
    a = order_samples(manifest, {"kind": "shuffle", "seed": 0})
    assert sorted(a) == sorted(manifest["sample_id"])
    assert a == order_samples(manifest, {"kind": "shuffle", "seed": 0})
    assert a != order_samples(manifest, {"kind": "shuffle", "seed": 1})


def test_class_blocked_keeps_each_class_together():
    manifest = toy_manifest()
    stream = order_samples(manifest, {"kind": "class_blocked", "seed": 3})
    labels = manifest.set_index("sample_id").loc[stream, "label"].tolist()
    changes = sum(1 for x, y in zip(labels, labels[1:]) if x != y)
    assert changes == 2 and sorted(stream) == sorted(manifest["sample_id"])


def test_cyclic_domains_recur_in_the_declared_pattern():
    manifest = toy_manifest(per_domain=10)
    stream = order_samples(manifest, {"kind": "cyclic", "block": 4, "seed": 0})
    domains = [s.split("/")[0] for s in stream]
    blocks = [domains[i : i + 4] for i in range(0, 24, 4)]
    assert all(len(set(b)) == 1 for b in blocks)
    assert [b[0] for b in blocks] == ["a", "b", "c", "a", "b", "c"]
    assert domains[24:] == ["a"] * 2 + ["b"] * 2 + ["c"] * 2  # the remainders, still in turn
    assert sorted(stream) == sorted(manifest["sample_id"])


def test_cyclic_needs_a_domain_column():
    with pytest.raises(ValueError, match="domain"):
        order_samples(toy_manifest().drop(columns="domain"), {"kind": "cyclic"})


def test_unknown_ordering_kind_is_named():
    with pytest.raises(ValueError, match="zigzag"):
        order_samples(toy_manifest(), {"kind": "zigzag"})


PARAMS = {
    "datasets": {"a": {"kind": "image_folder", "root": "."}, "b": {"kind": "image_folder", "root": "."}},
    "mixtures": {"ab": {"members": ["a", "b"]}},
    "methods": {"zs": {"kind": "zero_shot"}, "tpt": {"kind": "tpt"}, "dp": {"kind": "dynaprompt"}},
    "orderings": {"s0": {"kind": "shuffle", "seed": 0}, "cb": {"kind": "class_blocked"},
                  "cy": {"kind": "cyclic", "block": 5}, "cy1": {"kind": "cyclic", "block": 5, "seed": 1}},
}


def plan_of(**blocks):
    return [key for key, _ in expand_plan(settings_from_params({**PARAMS, **blocks}))]


def test_plan_crosses_datasets_methods_orderings_and_pairs_cyclic_with_mixtures():
    plan = plan_of()
    # s0 and cb run on every stream (their default `on: all`), the cyclic ones on the mixture only
    assert len(plan) == 2 * 3 * 2 + 1 * 3 * 4
    assert RunKey("ab", "dp", "cy") in plan and RunKey("a", "dp", "cy") not in plan
    assert RunKey("ab", "dp", "s0") in plan
    only = plan_of(sweep={"datasets": ["a"], "methods": ["tpt"]})
    assert only == [RunKey("a", "tpt", "s0"), RunKey("a", "tpt", "cb")]


def test_on_selects_the_streams_an_ordering_runs_on():
    orderings = {"s0": {"kind": "shuffle", "seed": 0, "on": "mixtures"},
                 "cb": {"kind": "class_blocked", "on": "datasets"},
                 "d": {"kind": "dirichlet", "delta": 0.1, "on": ["b"]}, "cy": {"kind": "cyclic", "block": 5}}
    plan = plan_of(orderings=orderings, sweep={"methods": ["dp"]})
    assert sorted((k.dataset, k.ordering) for k in plan) == [("a", "cb"), ("ab", "cy"), ("ab", "s0"), ("b", "cb"),
                                                              ("b", "d")]


def test_ablation_plan_runs_every_variant_and_reference_on_its_stream():
    ablations = {"dataset": "ab", "orderings": ["cy", "cy1"], "base": "dp", "references": ["zs", "tpt"],
                 "criteria": ["entropy_only", "probdiff_only"], "no_append": True, "buffer_sizes": [1, 10, 20],
                 "entropy_margins": [0.0, 0.1], "probdiff_margins": [0.0, 0.2]}
    settings = settings_from_params({**PARAMS, "sweep": {"datasets": ["a"]}, "ablations": ablations})
    planned = expand_plan(settings)
    ablation = sorted({key.method for key, group in planned if group == "ablation"})
    # M=10 is the base itself; margins (0, 0) too: 2 criteria + no-append + 2 sizes + 3 margin cells
    assert ablation == sorted(["zs", "tpt", "dp~entropy_only", "dp~probdiff_only", "dp~no_append", "dp~M1", "dp~M20",
                               "dp~tau_h0-tau_d0.2", "dp~tau_h0.1-tau_d0", "dp~tau_h0.1-tau_d0.2"] + ["dp"])
    assert {key.ordering for key, group in planned if group == "ablation"} == {"cy", "cy1"}
    assert {key.dataset for key, group in planned if group == "ablation"} == {"ab"}
    variant = settings.method("dp~tau_h0.1-tau_d0.2")
    assert variant.options["entropy_margin"] == 0.1 and variant.options["probdiff_margin"] == 0.2
    assert settings.method("dp~M20").options["buffer_size"] == 20
    # a run two groups share is planned once
    keys = [key for key, _ in planned]
    assert len(keys) == len(set(keys))


def test_calibration_plan_crosses_methods_and_learning_rates():
    calibration = {"dataset": "b", "ordering": "s0", "methods": ["tpt", "dp"], "lrs": [1e-3, 1e-2], "reference": "zs"}
    settings = settings_from_params({**PARAMS, "sweep": {"datasets": ["a"]}, "calibration": calibration})
    runs = sorted(key.method for key, group in expand_plan(settings) if group == "calibration")
    assert runs == sorted(["zs", "tpt~lr0.001", "tpt~lr0.01", "dp~lr0.001", "dp~lr0.01"])
    from dynaprompt.resolve import resolve_run

    assert resolve_run(settings, "b", "dp~lr0.001").tuning.lr == 1e-3
