"""The report stage on synthetic sweep results: metrics, collapse flags, intervals, figures, HTML, validation."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import stages.report as report
from dynaprompt.records import block_accuracies

N, BLOCK, BUFFER = 200, 40, 4
METHOD_KINDS = {"zero_shot": "zero_shot", "tpt": "tpt", "online_tpt": "online_tpt", "dynaprompt": "dynaprompt"}
ORDERING_KINDS = {"shuffle-0": "shuffle", "shuffle-1": "shuffle", "class_blocked-0": "class_blocked"}
PARAMS = {"model": {"arch": "tiny-clip", "pretrained": "data/models/tiny.pt"},
          "report": {"collapse_margin": 0.1, "bootstrap_samples": 500, "confidence": 0.95, "seed": 0}}


def stream(labels: np.ndarray, ordering: str) -> np.ndarray:
    """Sample indices in the order an ordering presents them."""
    if ORDERING_KINDS.get(ordering) == "class_blocked":
        return np.lexsort((np.arange(len(labels)), labels))
    return np.random.default_rng(int(ordering.split("-")[1])).permutation(len(labels))


def buffer_columns(n: int, rng: np.random.Generator, append_at=None) -> dict:
    """A paper-style buffer: a fresh prompt now and then, the least recently used one deleted when full."""
    buffer, next_id, columns = [], 0, {k: [] for k in ("selected", "appended", "deleted", "buffer_size")}
    for t in range(n):
        appended, deleted = [], []
        if not buffer or (append_at(t) if append_at else rng.random() < 0.15):
            if len(buffer) == BUFFER:
                deleted.append(buffer.pop(0))
            appended.append(next_id)
            buffer.append(next_id)
            next_id += 1
        chosen = appended or [buffer[int(rng.integers(len(buffer)))]]
        buffer.remove(chosen[0])
        buffer.append(chosen[0])  # most recently used last
        for key, value in (("selected", chosen), ("appended", appended), ("deleted", deleted),
                           ("buffer_size", len(buffer))):
            columns[key].append(value)
    return columns


def records_table(sample_ids, labels, correct, buffer=None, **extra) -> pd.DataFrame:
    """A records table with the stable columns, in stream order."""
    n = len(sample_ids)
    empty = {"selected": [[]] * n, "appended": [[]] * n, "deleted": [[]] * n, "buffer_size": [0] * n}
    columns = buffer or empty
    return pd.DataFrame({
        "position": np.arange(n), "sample_id": sample_ids, "label": labels,
        "pred": np.where(correct, labels, (labels + 1) % 5), "correct": np.asarray(correct, dtype=bool),
        "entropy_before": np.linspace(1.0, 0.5, n), "entropy_after": np.linspace(0.9, 0.4, n),
        "selected": columns["selected"], "n_selected": [len(s) for s in columns["selected"]],
        "appended": columns["appended"], "deleted": columns["deleted"], "buffer_size": columns["buffer_size"],
        "seconds": np.full(n, 0.01), **extra,
    })


def run_row(dataset, method, ordering, ordering_kind, records) -> dict:
    """runs.parquet's row for one records table."""
    blocks = block_accuracies(records["correct"], BLOCK)
    return {"dataset": dataset, "method": method, "method_kind": METHOD_KINDS[method], "ordering": ordering,
            "ordering_kind": ordering_kind, "n": len(records), "accuracy": float(records["correct"].mean()),
            "block_size": BLOCK, "block_accuracy": blocks, "first_block_accuracy": blocks[0],
            "last_block_accuracy": blocks[-1], "seconds_per_sample": 0.01, "seconds_total": 0.01 * len(records),
            "order_independent": METHOD_KINDS[method] in ("zero_shot", "tpt"), "reused": False}


def dataset_runs(dataset: str, seed: int):
    """Every run on one dataset: zero-shot once, TPT under every ordering, Online TPT collapsing, DynaPrompt."""
    rng = np.random.default_rng(seed)
    labels = np.arange(N) % 5
    ids = np.array([f"{dataset}-{i:03d}" for i in range(N)])
    zero_shot = rng.random(N) < 0.6
    tpt = zero_shot ^ (rng.random(N) < 0.05)  # order-independent: the same per-sample answers in every order
    for method in METHOD_KINDS:
        orderings = ["shuffle-0"] if method == "zero_shot" else list(ORDERING_KINDS)  # zero-shot ran once
        for ordering in orderings:
            order = stream(labels, ordering)
            run_rng = np.random.default_rng([seed, len(method), int(ordering.split("-")[1]), len(ordering)])
            correct = {"zero_shot": zero_shot, "tpt": tpt}.get(method, zero_shot)[order]
            buffer = None
            if method == "online_tpt":  # fine for one block, then it collapses to ~10%
                correct = np.where(np.arange(N) < BLOCK, correct, run_rng.random(N) < 0.1)
            if method == "dynaprompt":
                correct = correct | (run_rng.random(N) < 0.1)
                buffer = buffer_columns(N, run_rng)
            yield dataset, method, ordering, ORDERING_KINDS[ordering], records_table(ids[order], labels[order],
                                                                                      correct, buffer)


def mixture_run():
    """DynaPrompt on a cyclic mixture: domains in blocks of 30, a fresh prompt at the start of each block."""
    n, labels = 120, np.arange(120) % 5
    domain = np.array(["noise", "blur"])[(np.arange(n) // 30) % 2]
    buffer = buffer_columns(n, np.random.default_rng(7), append_at=lambda t: t % 30 in (0, 10))
    correct = np.random.default_rng(8).random(n) < 0.55
    ids = np.array([f"mix-{i:03d}" for i in range(n)])
    return "mix", "dynaprompt", "cyclic-0", "cyclic", records_table(ids, labels, correct, buffer, domain=domain)


def write_results(results_dir, datasets=("noise", "blur"), mixture=True) -> pd.DataFrame:
    """A complete synthetic sweep under `results_dir`; returns its runs table."""
    runs = [r for i, d in enumerate(datasets) for r in dataset_runs(d, i)] + ([mixture_run()] if mixture else [])
    rows = []
    for dataset, method, ordering, kind, records in runs:
        target = report.records_file(results_dir, dataset, method, ordering)
        target.parent.mkdir(parents=True, exist_ok=True)
        records.to_parquet(target, index=False)
        rows.append(run_row(dataset, method, ordering, kind, records))
    table = pd.DataFrame(rows)
    table.to_parquet(results_dir / "runs.parquet", index=False)
    plan = [{"dataset": r["dataset"], "method": r["method"], "ordering": r["ordering"]} for r in rows]
    (results_dir / "plan.json").write_text(json.dumps({"runs": plan}))
    return table


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The stage run once on the full synthetic sweep."""
    root = tmp_path_factory.mktemp("sweep")
    runs = write_results(root / "results")
    metrics = report.build_report(root / "results", root / "reports", PARAMS)
    return root, runs, metrics


def run_main(monkeypatch, root):
    """The stage's entry point, pointed at `root`."""
    folders = {"results": root / "results", "reports": root / "reports", "validation": root / "reports" / "validation"}
    monkeypatch.setattr(report, "path", lambda name: folders[name])
    monkeypatch.setattr(report, "params", lambda: PARAMS)
    report.main()


def test_metrics_equal_pandas(built):
    root, runs, metrics = built
    on_disk = json.loads((root / "reports" / "metrics.json").read_text())
    assert on_disk == metrics
    for (dataset, method), group in runs.groupby(["dataset", "method"]):
        entry = metrics["datasets"][dataset][method]
        assert entry["mean"] == pytest.approx(group["accuracy"].mean())
        std = group["accuracy"].std()
        assert (entry["std"] is None) if np.isnan(std) else entry["std"] == pytest.approx(std)
        assert entry["min"] == pytest.approx(group["accuracy"].min())
        assert entry["max"] == pytest.approx(group["accuracy"].max())
        assert entry["n_orderings"] == len(group)
        assert entry["worst_ordering"] == group.loc[group["accuracy"].idxmin(), "ordering"]


def test_paired_difference_reuses_the_order_independent_reference(built):
    _, runs, metrics = built
    zero_shot = runs.query("dataset == 'noise' and method == 'zero_shot'")["accuracy"].item()
    online = runs.query("dataset == 'noise' and method == 'online_tpt'")["accuracy"]
    diff = metrics["datasets"]["noise"]["online_tpt"]["vs_zero_shot"]
    assert diff["mean_diff"] == pytest.approx(online.mean() - zero_shot)
    assert diff["ci_method"] == report.CI_OVER_ORDERINGS and diff["n_orderings"] == 3


def test_wins_and_losses_are_matched_by_sample_id(built):
    root, _, metrics = built
    read = lambda m, o: pd.read_parquet(report.records_file(root / "results", "noise", m, o)).set_index("sample_id")
    zero_shot = read("zero_shot", "shuffle-0")["correct"]
    wins = [int((read("tpt", o)["correct"] & ~zero_shot).sum()) for o in ORDERING_KINDS]
    assert metrics["datasets"]["noise"]["tpt"]["wins_vs_zero_shot"] == pytest.approx(np.mean(wins))


def test_online_tpt_collapses_and_tpt_does_not(built):
    _, _, metrics = built
    for dataset in ("noise", "blur"):
        methods = metrics["datasets"][dataset]
        assert methods["online_tpt"]["collapsed"]
        assert methods["online_tpt"]["collapsed_orderings"] == list(ORDERING_KINDS)
        assert not methods["tpt"]["collapsed"] and not methods["zero_shot"]["collapsed"]
        assert not methods["dynaprompt"]["collapsed"]
    assert "collapses" in metrics["collapse_definition"] and metrics["collapse_margin"] == 0.1


def test_collapse_without_zero_shot_compares_raw_blocks(built):
    _, runs, metrics = built
    entry = metrics["datasets"]["mix"]["dynaprompt"]["per_ordering"]["cyclic-0"]
    row = runs.query("dataset == 'mix'").iloc[0]
    assert entry["zero_shot_last_block"] is None and not entry["below_zero_shot"]  # (a) needs zero-shot
    assert entry["below_first_block"] == (row["last_block_accuracy"] < row["first_block_accuracy"] - 0.1)


def test_intervals_bracket_the_estimate(built):
    _, _, metrics = built
    labels = set()
    for methods in metrics["datasets"].values():
        for entry in methods.values():
            for diff in (entry["vs_zero_shot"], entry["vs_tpt"]):
                if diff and diff["ci_low"] is not None:
                    assert diff["ci_low"] <= diff["mean_diff"] <= diff["ci_high"]
                    labels.add(diff["ci_method"])
    # zero-shot ran under one ordering, and TPT's difference to it is the same under every ordering:
    # both fall back to samples rather than report a zero-width interval
    assert labels == {report.CI_OVER_ORDERINGS, report.CI_OVER_SAMPLES}
    assert metrics["datasets"]["noise"]["zero_shot"]["vs_tpt"]["ci_method"] == report.CI_OVER_SAMPLES
    assert metrics["datasets"]["noise"]["tpt"]["vs_zero_shot"]["ci_method"] == report.CI_OVER_SAMPLES
    assert metrics["datasets"]["noise"]["dynaprompt"]["vs_tpt"]["ci_method"] == report.CI_OVER_ORDERINGS


def test_cyclic_prompt_loss_is_reported(built):
    _, _, metrics = built
    fraction = metrics["datasets"]["mix"]["dynaprompt"]["cyclic_prompt_loss_before_return"]["cyclic-0"]
    assert 0.0 <= fraction <= 1.0


def test_cyclic_prompt_loss_by_hand():
    # domains A A B B A A B B; id 0 is appended at 0, its slot reset and refilled at 1 (official rule)
    records = pd.DataFrame({
        "position": range(8), "domain": list("AABBAABB"),
        "appended": [[0], [0], [1], [], [2], [], [], []],
        "deleted": [[], [0], [], [], [], [], [], [1]],
    })
    loss = report.cyclic_prompt_loss(records)
    # counted: (0, id0) lost at 1; (1, id0) never deleted; (2, id1) deleted at 7, after B returned at 6
    assert loss["appended_before_return"] == 3 and loss["deleted_before_return"] == 1
    assert loss["fraction"] == pytest.approx(1 / 3)


def test_figures_are_pngs(built):
    root, _, _ = built
    for name in report.FIGURE_FILES.values():
        target = root / "reports" / "figures" / name
        assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(target) as image:
            image.verify()


def test_report_is_self_contained(built):
    root, _, _ = built
    page = (root / "reports" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(report.FIGURE_FILES)
    assert "<script" not in page and 'src="http' not in page and 'href="http' not in page
    text = (root / "reports" / "report.md").read_text()
    assert "figures/accuracy_per_block.png" in text and "What collapsed" in text
    assert "noise/online_tpt/shuffle-0" in text and "tiny-clip" in text


def test_missing_planned_run_fails_naming_it(tmp_path, monkeypatch, capsys):
    runs = write_results(tmp_path / "results", datasets=("noise",), mixture=False)
    keep = ~((runs["method"] == "dynaprompt") & (runs["ordering"] == "shuffle-1"))
    runs[keep].to_parquet(tmp_path / "results" / "runs.parquet", index=False)
    with pytest.raises(SystemExit) as stop:
        run_main(monkeypatch, tmp_path)
    assert stop.value.code != 0
    assert "noise/dynaprompt/shuffle-1" in capsys.readouterr().err
    validation = json.loads((tmp_path / "reports" / "validation" / "results.json").read_text())
    assert validation["missing_runs"] == ["noise/dynaprompt/shuffle-1"] and not validation["success"]
    assert not (tmp_path / "reports" / "metrics.json").exists()


def test_records_length_mismatch_is_named(tmp_path, monkeypatch, capsys):
    write_results(tmp_path / "results", datasets=("noise",), mixture=False)
    target = report.records_file(tmp_path / "results", "noise", "tpt", "class_blocked-0")
    pd.read_parquet(target).iloc[:-3].to_parquet(target, index=False)
    with pytest.raises(SystemExit) as stop:
        run_main(monkeypatch, tmp_path)
    assert stop.value.code != 0
    error = capsys.readouterr().err
    assert "noise/tpt/class_blocked-0: expect_table_row_count_to_equal" in error
    validation = json.loads((tmp_path / "reports" / "validation" / "results.json").read_text())
    assert validation["failed_runs"] == ["noise/tpt/class_blocked-0"]


def test_unknown_report_param_is_an_error():
    with pytest.raises(ValueError, match="collapse_margn"):
        report.report_params({"report": {"collapse_margn": 0.2}})
