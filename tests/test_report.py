"""The report stage on synthetic results: metrics, statistics, collapse flags, ablations, figures, HTML, validation."""
from __future__ import annotations

import json
import zlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import stages.report as report
from dynaprompt.config import settings_from_params
from dynaprompt.orderings import order_samples
from dynaprompt.plan import expand_plan
from dynaprompt.records import summarize
from dynaprompt.results import ResultsLayout, RunKey, RunSummary
from stages.reporting.document import FIGURES
from stages.reporting.metrics import cyclic_prompt_loss

N, BLOCK, BUFFER, CLASSES = 200, 40, 4, 5
ORDERINGS = {"shuffle-0": {"kind": "shuffle", "seed": 0}, "shuffle-1": {"kind": "shuffle", "seed": 1},
             "shuffle-2": {"kind": "shuffle", "seed": 2}, "class_blocked-0": {"kind": "class_blocked", "seed": 0},
             "cyclic-0": {"kind": "cyclic", "block": 30, "seed": 0},
             "cyclic-1": {"kind": "cyclic", "block": 30, "seed": 1},
             "cyclic-2": {"kind": "cyclic", "block": 30, "seed": 2}}


def params(root) -> dict:
    dataset = lambda: {"kind": "image_folder", "root": "."}  # never opened: the report reads results only
    return {
        "paths": {"results": str(root / "results"), "reports": str(root / "reports"),
                  "validation": str(root / "reports" / "validation")},
        "run": {"block_size": BLOCK},
        "datasets": {"noise": dataset(), "blur": dataset(), "calib": dataset()},
        "mixtures": {"mix": {"members": ["noise", "blur"], "per_member": 60}},
        "methods": {"zero_shot": {"kind": "zero_shot"}, "tpt": {"kind": "tpt"}, "online_tpt": {"kind": "online_tpt"},
                    "dynaprompt": {"kind": "dynaprompt", "buffer_size": BUFFER}},
        "orderings": ORDERINGS,
        "sweep": {"datasets": ["noise", "blur", "mix"], "view_seeds": [0, 1, 2]},
        "calibration": {"dataset": "calib", "ordering": "shuffle-0", "methods": ["tpt"], "lrs": [1e-3, 1e-2]},
        "ablations": {"dataset": "mix", "orderings": ["cyclic-0", "cyclic-1", "cyclic-2"], "base": "dynaprompt",
                      "criteria": ["entropy_only"], "no_append": True, "buffer_sizes": [1, 8],
                      "entropy_margins": [0.0, 0.1], "probdiff_margins": [0.0, 0.1]},
        "report": {"collapse_margin": 0.1, "bootstrap_samples": 300, "confidence": 0.95, "seed": 0,
                   "variance_bootstrap": 20, "workers": 1},
    }


def manifest(dataset: str) -> pd.DataFrame:
    if dataset == "mix":
        parts = [manifest(m).head(60).assign(domain=m, sample_id=lambda f, m=m: m + "/" + f["sample_id"])
                 for m in ("noise", "blur")]
        return pd.concat(parts, ignore_index=True)
    return pd.DataFrame({"sample_id": [f"{dataset}-{i:03d}" for i in range(N)], "label": np.arange(N) % CLASSES})


def buffer_columns(n: int, rng: np.random.Generator) -> dict:
    """A paper-style buffer: a fresh prompt now and then, the least recently used one deleted when full."""
    buffer, next_id, columns = [], 0, {k: [] for k in ("selected", "appended", "deleted", "buffer_size")}
    for _ in range(n):
        appended, deleted = [], []
        if not buffer or rng.random() < 0.15:
            if len(buffer) == BUFFER:
                deleted.append(buffer.pop(0))
            appended.append(next_id)
            buffer.append(next_id)
            next_id += 1
        chosen = appended or [buffer[int(rng.integers(len(buffer)))]]
        buffer.remove(chosen[0])
        buffer.append(chosen[0])
        for key, value in (("selected", chosen), ("appended", appended), ("deleted", deleted),
                           ("buffer_size", len(buffer))):
            columns[key].append(value)
    return columns


def stable_hash(*parts: str) -> int:
    """Python's hash() of strings changes per process; this does not."""
    return zlib.crc32("/".join(parts).encode())


def correctness(dataset: str, method: str, ordering: str, stream: list, seed: int = 0) -> np.ndarray:
    """Per-sample answers: zero-shot fixed per sample, TPT fixed per sample and seed, Online TPT collapsing,
    DynaPrompt a bit better (the order-dependent ones drawn per ordering and seed)."""
    base = {sid: (stable_hash(dataset, sid) % 10) < 6 for sid in stream}
    fixed = np.array([base[s] for s in stream])
    rng = np.random.default_rng(stable_hash(dataset, method, ordering, str(seed)))
    if method == "zero_shot":
        return fixed
    if method.startswith("tpt"):
        return np.array([base[s] ^ ((stable_hash(s, str(seed)) % 20) == 0) for s in stream])
    if method == "online_tpt":
        return np.where(np.arange(len(stream)) < BLOCK, fixed, rng.random(len(stream)) < 0.1)
    return fixed | (rng.random(len(stream)) < 0.1)


def write_results(root, drop=()) -> ResultsLayout:
    """Every planned run of params(root), written through the results layout."""
    settings = settings_from_params(params(root))
    layout = ResultsLayout(settings.path("results"))
    planned = expand_plan(settings)
    layout.write_plan(planned)
    for key, _ in planned:
        if key in drop:
            continue
        frame = manifest(key.dataset)
        stream = order_samples(frame, settings.ordering(key.ordering))
        labels = frame.set_index("sample_id").loc[stream, "label"].to_numpy()
        correct = correctness(key.dataset, key.method, key.ordering, stream, key.seed or 0)
        spec = settings.method(key.method)
        buffer = buffer_columns(len(stream), np.random.default_rng(len(key.label))) if spec.kind == "dynaprompt" \
            else {"selected": [[]] * len(stream), "appended": [[]] * len(stream), "deleted": [[]] * len(stream),
                  "buffer_size": [0] * len(stream)}
        records = pd.DataFrame({
            "position": np.arange(len(stream)), "sample_id": stream, "label": labels,
            "pred": np.where(correct, labels, (labels + 1) % CLASSES), "correct": correct,
            "entropy_before": 1.0, "entropy_after": 0.5, "selected": buffer["selected"],
            "n_selected": [len(s) for s in buffer["selected"]], "appended": buffer["appended"],
            "deleted": buffer["deleted"], "buffer_size": buffer["buffer_size"], "seconds": 0.01})
        if "domain" in frame.columns:
            records["domain"] = frame.set_index("sample_id").loc[stream, "domain"].to_numpy()
        summary = RunSummary(dataset=key.dataset, method=key.method, method_kind=spec.kind, ordering=key.ordering,
                             ordering_kind=settings.ordering(key.ordering).kind,
                             order_independent=spec.order_independent, **summarize(records, BLOCK),
                             fingerprint="f", started_at=1.0, ended_at=2.0, seed=key.seed, view_seed=key.seed or 0)
        layout.write_run(key, records, summary)
    return layout


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The stage run once on the full synthetic sweep."""
    root = tmp_path_factory.mktemp("sweep")
    layout = write_results(root)
    settings = settings_from_params(params(root))
    return root, layout, settings, report.build_report(settings)


def test_metrics_equal_pandas_and_t_intervals(built):
    root, layout, settings, metrics = built
    assert json.loads((root / "reports" / "metrics.json").read_text()) == metrics
    runs = pd.DataFrame([s.row() for s in layout.summaries()])
    main = runs[runs["dataset"].isin(["noise", "blur", "mix"]) & runs["method"].isin(settings.sweep.methods or
                                                                                   ["zero_shot", "tpt", "online_tpt",
                                                                                    "dynaprompt"])]
    for (dataset, method), group in main.groupby(["dataset", "method"]):
        if dataset == "mix" and method not in metrics["datasets"]["mix"]:
            continue
        entry = metrics["datasets"][dataset][method]
        assert entry["mean"] == pytest.approx(group["accuracy"].mean())
        assert entry["n_orderings"] == group["ordering"].nunique() and entry["n_seeds"] == 3
        assert entry["n_cells"] == len(group) == entry["n_orderings"] * 3
        per_ordering = group.groupby("ordering")["accuracy"].mean()
        assert entry["std"] == pytest.approx(per_ordering.std())  # between orderings, seeds averaged
        assert entry["ci95"][0] <= entry["mean"] <= entry["ci95"][1] or entry["std"] == 0
        assert entry["too_few_orderings"] == (entry["n_orderings"] < 3)
        worst = sorted(group["accuracy"])[: max(1, -(-len(group) // 10))]
        assert entry["tail_accuracy"] == pytest.approx(np.mean(worst))


def test_order_independent_methods_have_no_spread_between_orderings(built):
    _, _, _, metrics = built
    tpt, zero_shot = metrics["datasets"]["noise"]["tpt"], metrics["datasets"]["noise"]["zero_shot"]
    assert tpt["std"] == 0 and zero_shot["worst_cell"] is None  # zero-shot: one answer per sample, whatever runs
    assert tpt["cochran_q"]["q"] == 0.0 and tpt["cochran_q"]["p_value"] == 1.0
    assert tpt["cochran_q_seeds"]["discordant_samples"] > 0  # TPT's views change with the seed
    assert tpt["worst_cell"] is not None and tpt["min"] < tpt["max"]  # its seeds differ, its orderings do not


def test_order_dependent_method_has_a_cochran_test_and_two_intervals(built):
    _, _, _, metrics = built
    online = metrics["datasets"]["noise"]["online_tpt"]
    assert online["cochran_q"]["df"] == online["n_orderings"] - 1 == 3
    assert 0 <= online["cochran_q"]["p_value"] <= 1
    diff = online["vs_zero_shot"]
    assert diff["reference"] == "zero_shot" and diff["n_samples"] == N and diff["n_orderings"] == 4
    assert diff["n_runs"] == 12
    assert diff["ci_samples"][0] <= diff["mean_diff"] <= diff["ci_samples"][1]
    assert diff["ci_orderings"][0] <= diff["mean_diff"] <= diff["ci_orderings"][1]
    assert online["between_sd"] is not None and online["within_se"] > 0


def test_online_tpt_collapses_and_tpt_does_not(built):
    _, _, _, metrics = built
    for dataset in ("noise", "blur"):
        methods = metrics["datasets"][dataset]
        assert methods["online_tpt"]["collapsed"] and not methods["tpt"]["collapsed"]
        assert not methods["zero_shot"]["collapsed"]


def test_first_against_last_block_only_where_they_hold_the_same_classes_and_domains(built):
    """Class-blocked and cyclic orderings start and end on other classes or domains: only zero-shot on the same
    samples decides a collapse there."""
    _, _, _, metrics = built
    kinds = {name: spec["kind"] for name, spec in ORDERINGS.items()}
    checked = 0
    for methods in metrics["datasets"].values():
        for m in methods.values():
            for cell, e in m["per_cell"].items():
                if kinds[cell.split("~")[0]] in ("class_blocked", "cyclic"):
                    assert not e["below_first_block"] and e["collapsed"] == e["below_zero_shot"]
                    checked += 1
    assert checked > 0


def test_ablation_keys_for_dvc_metrics(built):
    _, _, _, metrics = built
    variants = {r["variant"] for r in metrics["ablation"]}
    assert {"base", "entropy_only", "no_append", "M1", "M8", "tau_h0.1-tau_d0.1", "zero_shot", "tpt"} <= variants
    assert [r["M"] for r in metrics["buffer_size"]] == [1, BUFFER, 8]
    assert {(r["tau_h"], r["tau_d"]) for r in metrics["margins"]} == {(0, 0), (0, 0.1), (0.1, 0), (0.1, 0.1)}
    for rows in (metrics["ablation"], metrics["buffer_size"], metrics["margins"]):
        assert all({"dataset", "variant", "mean", "std", "n_orderings"} <= set(r) for r in rows)
        assert all(r["n_orderings"] == 3 for r in rows)


def test_calibration_curve_and_best_lr(built):
    _, _, _, metrics = built
    calibration = metrics["calibration"]
    assert [r["lr"] for r in calibration["rows"]] == [1e-3, 1e-2]
    assert calibration["best_lr"] in (1e-3, 1e-2) and calibration["dataset"] == "calib"


def test_evidence_rows_for_order_dependent_methods(built):
    _, _, settings, metrics = built
    rows = {(r["dataset"], r["method"]): r for r in metrics["evidence"]}
    assert ("noise", "online_tpt") in rows and ("noise", "tpt") not in rows
    row = rows[("noise", "online_tpt")]
    assert row["n_orderings"] == 4 and [p["orderings"] for p in row["by_count"]] == [2, 3, 4]
    assert row["met"] == (row["half_width"] <= settings.sweep.schedule.target_half_width)


def test_variance_components_for_every_stream_and_method(built):
    _, _, _, metrics = built
    rows = {(r["dataset"], r["method"]): r for r in metrics["variance_components"]}
    assert set(rows) == {(d, m) for d, ms in metrics["datasets"].items() for m in ms}
    online, tpt = rows[("noise", "online_tpt")], rows[("noise", "tpt")]
    for key in ("sd_order", "sd_order_ci", "sd_seed", "sd_seed_ci", "sd_residual", "n_orderings", "n_seeds", "test",
                "p_value", "verdict", "tail_accuracy"):
        assert key in online
    assert online["n_orderings"] == 4 and online["n_seeds"] == 3
    assert online["sd_order_ci"][0] <= online["sd_order"] <= online["sd_order_ci"][1]
    assert online["verdict"] in ("order > chance", "not distinguishable from chance")
    assert tpt["verdict"] == "order-independent" and tpt["sd_order"] == 0 and tpt["sd_seed"] > 0
    assert rows[("mix", "online_tpt")]["n_orderings"] == 3


def test_cyclic_prompt_loss_by_hand():
    # domains A A B B A A B B; id 0 is appended at 0, its slot reset and refilled at 1 (official rule)
    records = pd.DataFrame({"position": range(8), "domain": list("AABBAABB"),
                            "appended": [[0], [0], [1], [], [2], [], [], []],
                            "deleted": [[], [0], [], [], [], [], [], [1]]})
    loss = cyclic_prompt_loss(records)
    # counted: (0, id0) lost at 1; (1, id0) never deleted; (2, id1) deleted at 7, after B returned at 6
    assert loss["appended_before_return"] == 3 and loss["deleted_before_return"] == 1
    assert loss["fraction"] == pytest.approx(1 / 3)


def test_figures_and_plot_data(built):
    root, *_ = built
    for name in FIGURES:
        target = root / "reports" / "figures" / name
        assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        with Image.open(target) as image:
            image.verify()
    blocks = pd.read_csv(root / "reports" / "plots" / "accuracy_per_block.csv")
    assert set(blocks.columns) >= {"dataset", "method", "ordering", "samples_seen", "accuracy"}
    assert set(pd.read_csv(root / "reports" / "plots" / "ordering_spread.csv").columns) >= {"between_sd", "within_se"}


def test_report_is_self_contained_and_alt_texts_describe(built):
    root, *_ = built
    page = (root / "reports" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(FIGURES)
    assert "<script" not in page and 'src="http' not in page and 'href="http' not in page
    assert 'alt="figures/' not in page and 'alt="Accuracy per block' in page
    text = (root / "reports" / "report.md").read_text()
    for section in ("Does the order matter", "SD(order) % [95% CI]", "Anderson & ter Braak", "tail accuracy",
                    "Against zero-shot and TPT", "Ablations of DynaPrompt",
                    "Calibrating the learning rate", "The statistics", "Cochran", "Evidence"):
        assert section in text, section
    assert "noise/online_tpt/shuffle-0" in text and "all tie" in text


def test_missing_planned_run_fails_naming_it(tmp_path, monkeypatch, capsys):
    write_results(tmp_path, drop={RunKey("noise", "dynaprompt", "shuffle-1")})
    monkeypatch.setattr(report, "settings", lambda: settings_from_params(params(tmp_path)))
    with pytest.raises(SystemExit) as stop:
        report.main()
    assert stop.value.code != 0
    assert "noise/dynaprompt/shuffle-1" in capsys.readouterr().err
    validation = json.loads((tmp_path / "reports" / "validation" / "results.json").read_text())
    assert validation["missing_runs"] == ["noise/dynaprompt/shuffle-1"] and not validation["success"]
    assert not (tmp_path / "reports" / "metrics.json").exists()


def test_records_length_mismatch_is_named(tmp_path, monkeypatch, capsys):
    layout = write_results(tmp_path)
    key = RunKey("noise", "online_tpt", "class_blocked-0")
    layout.read_records(key).iloc[:-3].to_parquet(layout.records(key), index=False)
    monkeypatch.setattr(report, "settings", lambda: settings_from_params(params(tmp_path)))
    with pytest.raises(SystemExit) as stop:
        report.main()
    assert stop.value.code != 0
    assert "noise/online_tpt/class_blocked-0" in capsys.readouterr().err
    validation = json.loads((tmp_path / "reports" / "validation" / "results.json").read_text())
    assert validation["failed_runs"] == ["noise/online_tpt/class_blocked-0"]
