"""Smoke test of the benchmark: every method timed against its plain reference (predictions identical), the
online peers as library-only rows next to TPT, the tables printed through pandas."""
import json

from benchmarks.bench import (
    LOCKSTEP_METHODS,
    METHOD_NAMES,
    PEERS,
    REFERENCED,
    format_report,
    image_encoder_passes,
    main,
    methods_table,
    plan_passes,
    show,
)
from dynaprompt.config import settings_from_params

from .conftest import make_params


def test_benchmark_main_on_the_tiny_config(tmp_path, capsys):
    out = tmp_path / "benchmark.json"
    report = main([
        "--arch", "tiny-clip", "--classes", "6", "--samples", "3", "--views", "8", "--buffer-size", "3",
        "--threads", "1", "--lr", "0.05", "--params", str(tmp_path / "absent.yaml"), "--out", str(out),
    ])
    rows = {row["method"]: row for row in report["methods"]}
    assert list(rows) == list(METHOD_NAMES)
    for name in REFERENCED:
        row = rows[name]
        assert row["skipped"] is None, name
        assert row["identical"] == row["n"] == 3, name
        assert row["library_ms"] > 0 and row["reference_ms"] > 0 and row["speedup"] > 0
        assert row["max_entropy_diff"] < 1e-4
        assert report["parts"][name]["library_twin_mismatches"] == 0
    for name in PEERS:  # library only, timed next to TPT
        row = rows[name]
        assert row["reference_ms"] is None and row["skipped"] and row["n"] == 3
        assert row["library_ms"] > 0
        assert row["library_vs_tpt"] == row["library_ms"] / rows["tpt"]["library_ms"]
    assert {r["method"] for r in report["lockstep"]} == set(LOCKSTEP_METHODS)
    assert all(r["identical_predictions"] == r["samples_total"] == 9 for r in report["lockstep"])
    assert set(report["dynaprompt_tpt_ratio"]) >= {"dynaprompt/tpt library", "dynaprompt_official/tpt library"}
    assert report["parts"]["dynaprompt"]["library_parts_ms"].keys() >= {"metrics", "tune", "predict"}
    assert [p["plan"] for p in report["feature_cache"]] == ["paper's 15 datasets x 7 methods x 5 orderings"]
    assert report["peak_rss_mib"] > 0
    assert json.loads(out.read_text())["methods"] == json.loads(json.dumps(report["methods"]))
    printed = capsys.readouterr().out
    for name in METHOD_NAMES:
        assert name in printed
    assert show(methods_table(report)) in printed
    assert format_report(report) in printed
    assert "peak RSS" in printed


def test_cache_arithmetic():
    passes = image_encoder_passes({"a": 100, "b": 50}, ["zero_shot", "tpt", "dynaprompt"], n_orderings=4, steps=1)
    assert passes["cached_passes"] == 150
    assert passes["uncached_passes"] == 150 * 4 * (1 + 2 + 2)
    assert passes["runs"] == 2 * 3 * 4
    assert passes["saved_passes"] == passes["uncached_passes"] - 150


def test_cache_arithmetic_over_a_planned_sweep(image_root):
    """The params' plan through `expand_plan`: sized datasets count, the image folder of unknown size is named."""
    params = make_params(image_root)
    params["datasets"]["sized"] = {"kind": "image_folder", "root": str(image_root), "expected_samples": 12}
    params["methods"] = {"zero_shot": {"kind": "zero_shot"}, "tpt": {"kind": "tpt", "tuning": {"steps": 2}},
                         "tda": {"kind": "tda"}}
    passes = plan_passes(settings_from_params(params))
    assert passes["left_out"] == ["toy"]
    assert passes["runs"] == 3 * 4  # 3 methods x 4 orderings on the sized dataset
    assert passes["cached_passes"] == 12
    assert passes["uncached_passes"] == 12 * 4 * (1 + 3 + 1)


def test_the_peers_benchmark_times_every_training_free_peer_and_fills_its_memory(tmp_path, capsys):
    from benchmarks.peers import KINDS
    from benchmarks.peers import main as peers_main

    rows = peers_main(["--classes", "6", "--samples", "24", "--views", "4", "--dim", "8",
                       "--out", str(tmp_path / "peers.json")])
    assert [row["method"] for row in rows] == list(KINDS)
    assert json.loads((tmp_path / "peers.json").read_text()) == rows
    assert all(row["first_quarter_ms"] > 0 and row["last_quarter_ms"] > 0 for row in rows)
    cached = {row["method"]: row["memory_at_end"] for row in rows}
    assert cached["tda"] > 0 and cached["dmn"] > 0  # the stream is long enough that the caches hold samples
    assert "last quarter" in capsys.readouterr().out
