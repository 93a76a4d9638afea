"""The report stage on synthetic results with kinds of stream, seeded orderings, view seeds and last-bit replicates:
the answer (per-kind accuracy, contrasts, verdicts after adjustment), the chaos SD, the evidence per kind, the
diagnostics, collapse flags, ablations, figures, tables, HTML, validation.

The synthetic methods are built so that the answer is known: DynaPrompt loses exactly 10 points of its samples on the
class-blocked stream of `noise` and nothing anywhere else, its runs differing only by per-run flips (no ordering
effect, and replicates scatter as orderings do: chaos); Online TPT collapses after its first block to a level each
ordering sets (the same under every seed: an ordering effect, beyond chaos)."""
from __future__ import annotations

import json
import zlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from statsmodels.stats.multitest import multipletests

import stages.report as report
from dynaprompt.config import settings_from_params
from dynaprompt.orderings import label_correlation, order_samples
from dynaprompt.plan import expand_plan
from dynaprompt.records import summarize
from dynaprompt.results import ResultsLayout, RunKey, RunSummary
from dynaprompt.schema import ParamsError
from stages.reporting import orders
from stages.reporting.answer import order_frame
from stages.reporting.document import FIGURES
from stages.reporting.metrics import cyclic_prompt_loss
from stages.reporting.results import load_results

N, BLOCK, BUFFER, CLASSES = 200, 40, 4, 5
ORDERINGS = {"shuffle": {"kind": "shuffle", "seeds": 5},
             "dirichlet0.1": {"kind": "dirichlet", "delta": 0.1, "seeds": 3},
             "class_blocked": {"kind": "class_blocked", "seeds": 3, "on": "datasets"},
             "cyclic": {"kind": "cyclic", "block": 30, "seeds": 3}}
CHAOS = [RunKey("noise", m, f"shuffle-{o}", None, r) for m in ("online_tpt", "dynaprompt") for o in range(3)
         for r in (1, 2)]  # each of three cells twice more, under a last-bit perturbation alone
DIAGNOSTICS = {"model": "tiny-clip", "diagnostic_samples": 50, "seed": 0, "streams": {"noise": {
    "n_samples": N, "ecalp": {"ecalp": {"n_nodes": N, "text_edges": 3 * N, "negative_text_edges": 330,
                                        "negative_text_edge_share": 0.55, "heaviest_not_top1": 117,
                                        "heaviest_not_top1_share": 0.585}},
    "ctpt": {"ctpt": {"n_samples": 50, "gradient_ratio_median": 7.2, "follows_dispersion_share": 0.97}}}}}


def params(root, **report_overrides) -> dict:
    dataset = lambda: {"kind": "image_folder", "root": "."}  # never opened: the report reads results only
    return {
        "paths": {"results": str(root / "results"), "reports": str(root / "reports"),
                  "validation": str(root / "reports" / "validation")},
        "run": {"block_size": BLOCK},
        "datasets": {"noise": dataset(), "blur": dataset(), "calib": dataset()},
        "mixtures": {"mix": {"members": ["noise", "blur"], "per_member": 60}},
        "methods": {"zero_shot": {"kind": "zero_shot"}, "tpt": {"kind": "tpt"}, "ctpt": {"kind": "ctpt"},
                    "online_tpt": {"kind": "online_tpt"}, "dynaprompt": {"kind": "dynaprompt", "buffer_size": BUFFER}},
        "orderings": ORDERINGS,
        "sweep": {"datasets": ["noise", "blur", "mix"], "methods": ["zero_shot", "tpt", "ctpt", "online_tpt",
                                                                      "dynaprompt"], "view_seeds": [0, 1, 2]},
        "calibration": {"dataset": "calib", "ordering": "shuffle-0", "methods": ["tpt"], "lrs": [1e-3, 1e-2]},
        "ablations": {"dataset": "mix", "orderings": ["cyclic-0", "cyclic-1", "cyclic-2"], "base": "dynaprompt",
                      "criteria": ["entropy_only"], "no_append": True, "buffer_sizes": [1, 8],
                      "entropy_margins": [0.0, 0.1], "probdiff_margins": [0.0, 0.1]},
        "report": {"collapse_margin": 0.1, "bootstrap_samples": 300, "confidence": 0.95, "seed": 0,
                   "permutations": 999, "max_panels": 2, **report_overrides},
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


def uniform(*parts: str) -> float:
    return stable_hash(*parts) / 2**32


def ordering_effect(ordering: str) -> float:
    """Online TPT's level after its collapse, set by the ordering alone: -12, -6, 0, +6, +12 points around 15%."""
    return (6 * int(ordering.rsplit("-", 1)[1]) - 12) / 100


def correctness(key: RunKey, family: str, stream: list) -> np.ndarray:
    """Per-sample answers: zero-shot fixed per sample (60%); TPT and C-TPT fixed per sample and seed; DynaPrompt
    right on the samples below its level (70%, 60% on noise's class-blocked stream) with per-run flips; Online TPT
    at zero-shot for a block, then at its ordering's level."""
    dataset, method, seed = key.dataset, key.method, str(key.seed or 0)
    fixed = np.array([uniform(dataset, s) < 0.6 for s in stream])
    run = np.random.default_rng(stable_hash(dataset, method, key.ordering, seed, str(key.replicate)))
    if method == "zero_shot":
        return fixed
    if method.startswith(("tpt", "ctpt")):
        return fixed ^ np.array([uniform(method, s, seed) < 0.05 for s in stream])
    if method == "online_tpt":
        level = 0.15 + ordering_effect(key.ordering)
        return np.where(np.arange(len(stream)) < BLOCK, fixed, run.random(len(stream)) < level)
    level = 0.6 if (dataset, family) == ("noise", "class_blocked") else 0.7
    return np.array([uniform("level", dataset, s) < level for s in stream]) ^ (run.random(len(stream)) < 0.03)


def ordering_rows(settings, planned) -> list[dict]:
    """The plan's (stream, ordering) table, as the sweep writes it."""
    rows = {}
    for key, _ in planned:
        frame, spec = manifest(key.dataset), settings.ordering(key.ordering)
        labels = frame.set_index("sample_id").loc[order_samples(frame, spec), "label"]
        rows[(key.dataset, spec.name)] = {"dataset": key.dataset, "ordering": spec.name, "kind": spec.kind,
                                          "family": spec.family, "options": spec.defining_options, "seed": spec.seed,
                                          "n": len(frame), "label_correlation": label_correlation(labels)}
    return list(rows.values())


def write_results(root, drop=(), **report_overrides) -> ResultsLayout:
    """Every planned run of params(root) and the chaos replicates, written through the results layout."""
    settings = settings_from_params(params(root, **report_overrides))
    layout = ResultsLayout(settings.path("results"))
    planned = expand_plan(settings) + [(key, "chaos") for key in CHAOS]
    layout.write_plan(planned, ordering_rows(settings, planned))
    for key, _ in planned:
        if key in drop:
            continue
        frame = manifest(key.dataset)
        ordering = settings.ordering(key.ordering)
        stream = order_samples(frame, ordering)
        labels = frame.set_index("sample_id").loc[stream, "label"].to_numpy()
        correct = correctness(key, ordering.family, stream)
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
                             ordering_kind=ordering.kind, order_independent=spec.order_independent,
                             **summarize(records, BLOCK), fingerprint="f", started_at=1.0, ended_at=2.0,
                             seed=key.seed, replicate=key.replicate, view_seed=key.seed or 0,
                             ordering_family=ordering.family, label_correlation=label_correlation(labels))
        layout.write_run(key, records, summary)
    return layout


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The stage run once on the full synthetic sweep, with the diagnostics stage's output beside it."""
    root = tmp_path_factory.mktemp("sweep")
    layout = write_results(root)
    (root / "reports").mkdir()
    (root / "reports" / "diagnostics.json").write_text(json.dumps(DIAGNOSTICS))
    settings = settings_from_params(params(root))
    return root, layout, settings, report.build_report(settings)


def runs_of(layout) -> pd.DataFrame:
    return pd.DataFrame([s.row() for s in layout.summaries()])


def rows_of(metrics, stream, method) -> dict:
    """(term, kind) -> the tested row."""
    return {(r["term"], r["kind"]): r for r in metrics["order"].values()
            if r["stream"] == stream and r["method"] == method}


# --------------------------------------------------------------------------------------------- the answer


def test_the_kind_that_costs_ten_points_is_reported_as_costing(built):
    _, _, _, metrics = built
    blocked = rows_of(metrics, "noise", "dynaprompt")[("kind", "class_blocked")]
    assert blocked["estimate"] == pytest.approx(-0.10, abs=0.015)
    assert blocked["ci_low"] < blocked["estimate"] < blocked["ci_high"] < 0
    assert blocked["p_adjusted"] < 0.05
    assert blocked["verdict"].startswith("separate (class-blocked) costs ")
    assert blocked["n"] == (3 + 5) * 3  # its 3 orderings and the i.i.d. kind's 5, each under 3 seeds
    for stream in ("blur", "mix"):  # the same method loses nothing elsewhere
        for (_, kind), row in rows_of(metrics, stream, "dynaprompt").items():
            assert "costs" not in row["verdict"] and "gains" not in row["verdict"], (stream, kind, row["verdict"])


def test_orderings_that_do_nothing_get_no_ordering_verdict_and_those_that_do_get_one(built):
    _, _, _, metrics = built
    dynaprompt = [r for r in metrics["order"].values() if r["method"] == "dynaprompt" and r["term"] == "ordering"]
    assert len(dynaprompt) == 3 + 3 + 3  # a row for every kind of every stream, the i.i.d. kind included
    assert not any("ordering matters" in r["verdict"] for r in dynaprompt)
    online = rows_of(metrics, "noise", "online_tpt")[("ordering", "shuffle")]
    assert online["verdict"] == "ordering matters within i.i.d." and online["p_adjusted"] < 0.05
    effects = [ordering_effect(f"shuffle-{o}") for o in range(5)]
    assert online["ci_low"] < np.std(effects, ddof=1) * 0.85 < online["ci_high"]  # 85% of the run after block 1


def test_rows_carry_both_p_values_adjusted_across_the_whole_report(built):
    root, _, settings, metrics = built
    rows = order_frame(metrics)
    tested = rows[rows["p"].notna()]
    assert len(tested) == metrics["tested_rows"] and len(tested) > 20  # every stream, method, kind and term
    expected = multipletests(tested["p"], method="fdr_bh")[1]
    assert np.allclose(tested["p_adjusted"], expected)
    on_disk = json.loads((root / "reports" / "metrics.json").read_text())
    assert on_disk == metrics
    for entry in on_disk["order"].values():
        assert {"stream", "method", "term", "kind", "estimate", "ci_low", "ci_high", "p", "p_adjusted", "verdict",
                "n"} <= set(entry)
    assert not any(r["method"] in ("zero_shot", "tpt", "ctpt") for r in on_disk["order"].values())
    assert not any("not distinguishable" in r["verdict"] for r in on_disk["order"].values())


def test_holm_is_the_alternative_adjustment(built):
    root, layout, _, metrics = built
    holm = settings_from_params(params(root, adjustment="holm"))
    results = load_results(layout, holm)
    runs = orders.grid_runs(results)
    rows = orders.order_rows(results, holm, runs, orders.kind_table(results, holm, runs))
    tested = rows[rows["p_value"].notna()]
    assert np.allclose(tested["p_value"], order_frame(metrics)["p"].dropna())  # the same tests, another adjustment
    assert np.allclose(tested["p_adjusted"], multipletests(tested["p_value"], method="holm")[1])
    with pytest.raises(ParamsError, match="adjustment"):
        settings_from_params(params(root, adjustment="bonferroni"))


def test_accuracy_per_kind_and_the_exact_tail(built):
    _, layout, _, metrics = built
    runs = runs_of(layout)
    runs = runs[(runs["replicate"] == 0) & runs["method"].isin(params(built[0])["sweep"]["methods"])]
    for (stream, method, family), group in runs[runs["dataset"].isin(["noise", "blur", "mix"])].groupby(
            ["dataset", "method", "ordering_family"]):
        kind = metrics["datasets"][stream][method]["per_kind"][family]
        assert kind["accuracy"] == pytest.approx(group["accuracy"].mean())
        assert kind["n_runs"] == len(group) == kind["n_orderings"] * 3
        worst = np.sort(group["accuracy"].to_numpy())
        if len(group) == 15:  # 1.5 runs: the worst, and half of the next
            assert kind["tail"]["value"] == pytest.approx((worst[0] + 0.5 * worst[1]) / 1.5)
            assert kind["tail"]["label"] == "worst 10% of 15 runs (1.5 runs)"
    independent = metrics["datasets"]["noise"]["tpt"]["per_kind"]
    assert len({round(k["accuracy"], 12) for k in independent.values()}) == 1  # reordered: every kind alike


def test_kinds_are_named_as_the_field_names_them_with_their_label_correlation(built):
    _, _, _, metrics = built
    noise, mix = metrics["kinds"]["noise"], metrics["kinds"]["mix"]
    assert [k["label"] for k in noise.values()] == ["i.i.d.", "Dirichlet δ=0.1", "separate (class-blocked)"]
    assert [k["label"] for k in mix.values()] == ["mixed domains, i.i.d.", "mixed + correlated, Dirichlet δ=0.1",
                                                  "recurring domains (cyclic)"]
    assert noise["shuffle"]["label_correlation"] < 0.4 < noise["dirichlet0.1"]["label_correlation"]
    assert noise["class_blocked"]["label_correlation"] == pytest.approx((N - CLASSES) / (N - 1))


def test_chaos_told_from_order(built):
    _, _, _, metrics = built
    chaos = {(c["stream"], c["method"], c["kind"]): c for c in metrics["chaos"]}
    assert {s for s, _, _ in chaos} == {"noise"}
    dynaprompt, online = chaos[("noise", "dynaprompt", "shuffle")], chaos[("noise", "online_tpt", "shuffle")]
    assert dynaprompt["n_cells"] == 3 and dynaprompt["df"] == 6 and dynaprompt["chaos_sd"] > 0
    assert dynaprompt["ci_low"] < dynaprompt["chaos_sd"] < dynaprompt["ci_high"]
    assert dynaprompt["chaotic"] is True  # its orderings differ only as its replicates do
    assert online["chaotic"] is False  # each ordering sets its level: beyond chaos


def test_evidence_per_kind_for_order_dependent_methods(built):
    _, _, settings, metrics = built
    rows = {(r["stream"], r["method"], r["kind"]): r for r in metrics["evidence"]}
    assert ("noise", "online_tpt", "shuffle") in rows and not any(m == "tpt" for _, m, _ in rows)
    row = rows[("noise", "online_tpt", "shuffle")]
    assert row["n_orderings"] == 5 and [p["orderings"] for p in row["by_count"]] == [2, 3, 4, 5]
    assert row["met"] == (row["half_width"] <= settings.sweep.schedule.target_half_width
                          and row["sd_order_ci_width"] <= settings.sweep.schedule.target_sd_order_width)


def test_against_zero_shot_on_the_iid_kind(built):
    _, _, _, metrics = built
    online = metrics["datasets"]["noise"]["online_tpt"]["vs_zero_shot"]
    assert online["kind"] == "shuffle" and online["n_orderings"] == 5 and online["n_runs"] == 15
    assert online["n_samples"] == N and online["ci_samples"][0] <= online["mean_diff"] <= online["ci_samples"][1]


def test_diagnostics_sit_next_to_the_methods_accuracy(built):
    _, layout, _, metrics = built
    noise = metrics["diagnostics"]["streams"]["noise"]
    assert noise["ecalp"]["ecalp"]["negative_text_edge_share"] == 0.55 and noise["ecalp"]["ecalp"]["accuracy"] is None
    ctpt = noise["ctpt"]["ctpt"]
    assert ctpt["accuracy"] == pytest.approx(metrics["datasets"]["noise"]["ctpt"]["per_kind"]["shuffle"]["accuracy"])
    shares = []
    for seed in (0, 1, 2):
        cell = "shuffle-0" if seed == 0 else f"shuffle-0~seed{seed}"
        mine = layout.read_records(RunKey.from_cell("noise", "ctpt", cell)).set_index("sample_id")["pred"]
        theirs = layout.read_records(RunKey.from_cell("noise", "zero_shot", cell)).set_index("sample_id")["pred"]
        shares.append(float((mine == theirs.loc[mine.index]).mean()))
    assert ctpt["agreement_with_zero_shot"] == pytest.approx(np.mean(shares))


# ------------------------------------------------------------------------------------- the rest of the report


def test_online_tpt_collapses_and_tpt_does_not(built):
    _, _, _, metrics = built
    for dataset in ("noise", "blur"):
        methods = metrics["datasets"][dataset]
        assert methods["online_tpt"]["collapsed"] and not methods["tpt"]["collapsed"]
        assert not methods["zero_shot"]["collapsed"]


def test_first_against_last_block_only_where_they_hold_the_same_classes_and_domains(built):
    """Only an i.i.d. shuffle starts and ends on alike samples; class-blocked, Dirichlet, cyclic and difficulty
    orderings start and end on other classes, domains or difficulties: only zero-shot on the same samples decides a
    collapse there."""
    _, _, _, metrics = built
    checked = set()
    for methods in metrics["datasets"].values():
        for m in methods.values():
            for e in m["per_cell"].values():
                if e["ordering_kind"] != "shuffle":
                    assert not e["below_first_block"] and e["collapsed"] == e["below_zero_shot"]
                    checked.add(e["ordering_kind"])
    assert {"class_blocked", "cyclic"} <= checked


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


def test_cyclic_prompt_loss_by_hand():
    # domains A A B B A A B B; id 0 is appended at 0, its slot reset and refilled at 1 (official rule)
    records = pd.DataFrame({"position": range(8), "domain": list("AABBAABB"),
                            "appended": [[0], [0], [1], [], [2], [], [], []],
                            "deleted": [[], [0], [], [], [], [], [], [1]]})
    loss = cyclic_prompt_loss(records)
    # counted: (0, id0) lost at 1; (1, id0) never deleted; (2, id1) deleted at 7, after B returned at 6
    assert loss["appended_before_return"] == 3 and loss["deleted_before_return"] == 1
    assert loss["fraction"] == pytest.approx(1 / 3)


def test_figures_plot_data_and_tables(built):
    root, *_ = built
    for name in FIGURES:
        target = root / "reports" / "figures" / name
        assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        with Image.open(target) as image:
            image.verify()
    blocks = pd.read_csv(root / "reports" / "plots" / "accuracy_per_block.csv")
    assert set(blocks.columns) >= {"dataset", "method", "kind", "ordering", "samples_seen", "accuracy"}
    contrasts = pd.read_csv(root / "reports" / "plots" / "kind_contrasts.csv")
    assert "noise/dynaprompt/class_blocked" in set(contrasts["row"]) and "contrast" in contrasts.columns
    tables = root / "reports" / "tables"
    assert set(pd.read_csv(tables / "order_rows.csv").columns) >= {"p", "p_adjusted", "verdict"}
    assert len(pd.read_csv(tables / "runs_collapse.csv")) == 3 * 5 * 11 * 3  # every grid run, no replicate
    assert set(pd.read_csv(tables / "cyclic_memory.csv")["method"]) == {"dynaprompt"}


def test_the_report_leads_with_the_answer(built):
    root, *_ = built
    text = (root / "reports" / "report.md").read_text()
    sections = [line for line in text.splitlines() if line.startswith("## ")]
    assert sections[0] == "## The answer: each method on each kind of stream", sections
    answer = text[text.index("### noise"):text.index("### blur")]
    header = next(line for line in answer.splitlines() if line.startswith("| method"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "method", "i.i.d.", "Dirichlet δ=0.1", "separate (class-blocked)"]
    assert "separate (class-blocked) costs" in answer and "label correlation" in answer
    assert text.index("kind_contrasts.png") < text.index("## Setup")
    for section in ("## Orderings against chaos", "**chaotic**", "## Findings with their diagnostics",
                    "## Statistics", "Benjamini-Hochberg", "n behind every figure", "## Appendix",
                    "Against zero-shot and TPT", "Ablations of DynaPrompt", "Calibrating the learning rate",
                    "reports/tables/runs_collapse.csv"):
        assert section in text, section
    assert "Cochran" not in text and "not distinguishable" not in text


def test_report_is_self_contained_and_alt_texts_describe(built):
    root, *_ = built
    page = (root / "reports" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(FIGURES)
    assert "<script" not in page and 'src="http' not in page and 'href="http' not in page
    assert 'alt="figures/' not in page and 'alt="Forest plot' in page


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


def test_the_schedule_stops_on_the_same_per_kind_intervals_the_report_gives(built):
    """tasks.evidence's stopping rule reads each kind's mean interval and within-kind SD interval, as the report."""
    from tasks.evidence import cells_by_pair, kind_evidence

    _, layout, settings, metrics = built
    cells = cells_by_pair(layout, settings)
    for stream, method in (("noise", "online_tpt"), ("mix", "dynaprompt")):
        mine = [r for r in metrics["evidence"] if r["stream"] == stream and r["method"] == method]
        half, width = kind_evidence(cells[(stream, method)], settings.report.confidence)
        assert half == pytest.approx(max(r["half_width"] for r in mine))
        assert width == pytest.approx(max(r["sd_order_ci_width"] for r in mine))
    assert all(family != "" for family, *_ in cells[("noise", "online_tpt")])
    assert len(cells[("noise", "online_tpt")]) == 11 * 3  # the grid's runs; the replicates measure chaos
