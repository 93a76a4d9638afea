"""Orderings as data and the sweep plan."""
import pandas as pd
import pytest

from dynaprompt.config import settings_from_params
from dynaprompt.orderings import order_samples
from dynaprompt.plan import RunKey, expand_plan


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


@pytest.fixture
def settings():
    return settings_from_params({
        "datasets": {"a": {}, "b": {}},
        "mixtures": {"ab": {"members": ["a", "b"]}},
        "methods": {"tpt": {"kind": "tpt"}, "dp": {"kind": "dynaprompt"}},
        "orderings": {"s0": {"kind": "shuffle", "seed": 0}, "cb": {"kind": "class_blocked"},
                      "cy": {"kind": "cyclic", "block": 5}},
    })


def test_plan_crosses_datasets_methods_orderings_and_pairs_cyclic_with_mixtures(settings):
    plan = expand_plan(settings)
    assert len(plan) == 2 * 2 * 2 + 1 * 2 * 1
    assert RunKey("ab", "dp", "cy") in plan and RunKey("a", "dp", "cy") not in plan
    assert RunKey("ab", "dp", "s0") not in plan
    assert expand_plan(settings, {"datasets": ["a"], "methods": ["tpt"]}) == [
        RunKey("a", "tpt", "s0"), RunKey("a", "tpt", "cb")]


def test_plan_names_unknown_entries(settings):
    with pytest.raises(KeyError, match="imagenet"):
        expand_plan(settings, {"datasets": ["imagenet"]})
