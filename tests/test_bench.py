"""Smoke test of the benchmark: every method timed against its plain reference, predictions identical."""
import json

from dynaprompt.bench import LOCKSTEP_METHODS, METHOD_NAMES, format_report, image_encoder_passes, main


def test_benchmark_main_on_the_tiny_config(tmp_path, capsys):
    out = tmp_path / "benchmark.json"
    report = main([
        "--arch", "tiny-clip", "--classes", "6", "--samples", "3", "--views", "8", "--buffer-size", "3",
        "--threads", "1", "--lr", "0.05", "--params", str(tmp_path / "absent.yaml"), "--out", str(out),
    ])
    rows = {row["method"]: row for row in report["methods"]}
    assert set(rows) == set(METHOD_NAMES)
    for name, row in rows.items():
        assert row["skipped"] is None, name
        assert row["identical"] == row["n"] == 3, name
        assert row["library_ms"] > 0 and row["reference_ms"] > 0 and row["speedup"] > 0
        assert row["max_entropy_diff"] < 1e-4
        assert report["parts"][name]["library_twin_mismatches"] == 0
    assert {r["method"] for r in report["lockstep"]} == set(LOCKSTEP_METHODS)
    assert all(r["identical_predictions"] == r["samples_total"] == 9 for r in report["lockstep"])
    assert set(report["dynaprompt_tpt_ratio"]) >= {"dynaprompt/tpt library", "dynaprompt_official/tpt library"}
    assert report["parts"]["dynaprompt"]["library_parts_ms"].keys() >= {"metrics", "tune", "predict"}
    assert json.loads(out.read_text())["methods"] == json.loads(json.dumps(report["methods"]))
    printed = capsys.readouterr().out
    for name in METHOD_NAMES:
        assert name in printed
    assert format_report(report) in printed


def test_cache_arithmetic():
    passes = image_encoder_passes({"a": 100, "b": 50}, ["zero_shot", "tpt", "dynaprompt"], n_orderings=4, steps=1)
    assert passes["cached_passes"] == 150
    assert passes["uncached_passes"] == 150 * 4 * (1 + 2 + 2)
    assert passes["runs"] == 2 * 3 * 4
    assert passes["saved_passes"] == passes["uncached_passes"] - 150
