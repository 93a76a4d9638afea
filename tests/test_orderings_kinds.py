"""The streams the field uses: NOTE's Dirichlet stream, hardest/easiest first, families of seeded orderings."""
import numpy as np
import pandas as pd
import pytest
import yaml

from dynaprompt.config import load_settings, settings_from_params
from dynaprompt.orderings import dirichlet_chunks, label_correlation, order_samples
from dynaprompt.plan import expand_plan, ordering_table
from dynaprompt.results import PLAN_ORDERING_COLUMNS, ResultsLayout
from dynaprompt.schema import ParamsError

from .conftest import make_params

# ---------------------------------------------------------------- NOTE's sampler, written again here


def note_stream(labels, delta, rng, min_size_thresh=10):
    """NOTE learner/dnn.py `target_data_processing`, branch `tgt_train_dist == 4`, transcribed line by line with
    lists (chunks = classes; the balance rule; redraw until every chunk holds `min_size_thresh`; chunks concatenated,
    each in a shuffled class order). `rng` is NOTE's random source: a numpy Generator, or a legacy RandomState as
    NOTE's `np.random` calls use. Where every open chunk's proportion underflows to 0, the proportions are drawn
    over the open chunks (the project's documented choice; NOTE divides 0 by 0 there).
    Returns the stream (row positions) and, per chunk, the samples of each class in it."""
    labels = list(labels)
    classes = sorted(set(labels))
    num_chunks, n = len(classes), len(labels)
    min_size = -1
    while min_size < min_size_thresh:
        idx_batch = [[] for _ in range(num_chunks)]
        idx_batch_cls = [[] for _ in range(num_chunks)]
        for k in classes:
            idx_k = np.array([i for i, y in enumerate(labels) if y == k])
            rng.shuffle(idx_k)
            proportions = rng.dirichlet([delta] * num_chunks)
            is_open = [len(idx_j) < n / num_chunks for idx_j in idx_batch]
            proportions = np.array([p * o for p, o in zip(proportions, is_open)])
            if proportions.sum() == 0:
                redrawn = iter(rng.dirichlet([delta] * sum(is_open)))
                proportions = np.array([next(redrawn) if o else 0.0 for o in is_open])
            proportions = proportions / proportions.sum()
            proportions = (np.cumsum(proportions) * len(idx_k)).astype(int)[:-1]
            parts = np.split(idx_k, proportions)
            idx_batch = [idx_j + idx.tolist() for idx_j, idx in zip(idx_batch, parts)]
            min_size = min(len(idx_j) for idx_j in idx_batch)
            for idx_j, idx in zip(idx_batch_cls, parts):
                idx_j.append(idx)
    stream = []
    for chunk in idx_batch_cls:
        cls_seq = list(range(num_chunks))
        rng.shuffle(cls_seq)
        for cls in cls_seq:
            stream.extend(chunk[cls].tolist())
    return stream, [[len(part) for part in chunk] for chunk in idx_batch_cls]


def balanced(classes=10, per_class=30) -> pd.DataFrame:
    labels = np.repeat(np.arange(classes), per_class)
    return pd.DataFrame({"sample_id": [f"s{i:04d}" for i in range(len(labels))], "label": labels})


def unbalanced(n=450, classes=10, seed=1) -> pd.DataFrame:
    """Labels drawn at random (classes of unequal size, as a mixture's), in a scrambled manifest order."""
    labels = np.random.default_rng(seed).integers(0, classes, n)
    return pd.DataFrame({"sample_id": [f"m{i:04d}" for i in range(n)], "label": labels})


def stream_labels(manifest, stream) -> np.ndarray:
    return manifest.set_index("sample_id").loc[stream, "label"].to_numpy()


def run_lengths(labels) -> list[int]:
    lengths, current = [], 1
    for before, after in zip(labels, labels[1:]):
        if before == after:
            current += 1
        else:
            lengths.append(current)
            current = 1
    return lengths + [current]


def statistics(labels, chunk_class_counts) -> dict:
    """The label statistics a Dirichlet stream is judged by."""
    return {"correlation": label_correlation(labels), "mean_run": float(np.mean(run_lengths(list(labels)))),
            "classes_per_chunk": float(np.mean([np.count_nonzero(counts) for counts in chunk_class_counts])),
            "largest_chunk": float(np.max([np.sum(counts) for counts in chunk_class_counts]))}


def our_statistics(manifest, delta, seed) -> dict:
    labels = manifest["label"].to_numpy()
    chunks = dirichlet_chunks(labels, delta, seed)
    classes = np.unique(labels)
    counts = [[int(np.sum(labels[chunk] == k)) for k in classes] for chunk in chunks]
    return statistics(stream_labels(manifest, order_samples(manifest, {"kind": "dirichlet", "delta": delta,
                                                                        "seed": seed})), counts)


@pytest.mark.parametrize("make_manifest", [balanced, unbalanced])
@pytest.mark.parametrize("delta", [0.01, 0.1, 1.0])
def test_dirichlet_is_notes_sampler_draw_for_draw(make_manifest, delta):
    """Given NOTE's order of draws on the same Generator, the transcription and the library give the same stream."""
    manifest = make_manifest()
    for seed in range(6):
        expected, _ = note_stream(manifest["label"], delta, np.random.default_rng(seed))
        got = order_samples(manifest, {"kind": "dirichlet", "delta": delta, "seed": seed})
        assert got == manifest["sample_id"].to_numpy()[expected].tolist(), f"seed {seed}"


@pytest.mark.parametrize("make_manifest", [balanced, unbalanced])
@pytest.mark.parametrize("delta", [0.01, 0.1, 1.0])
def test_dirichlet_label_statistics_match_notes_own_random_source(make_manifest, delta):
    """Against NOTE's sampler on NumPy's legacy RandomState (as NOTE draws): class-run lengths, label correlation,
    classes per chunk and the largest chunk agree in mean over 40 seeds, within 4 standard errors."""
    manifest = make_manifest()
    ours = pd.DataFrame([our_statistics(manifest, delta, seed) for seed in range(40)])
    theirs = []
    for seed in range(40):
        stream, counts = note_stream(manifest["label"], delta, np.random.RandomState(1000 + seed))
        theirs.append(statistics(manifest["label"].to_numpy()[stream], counts))
    theirs = pd.DataFrame(theirs)
    for column in ours.columns:
        error = np.sqrt(ours[column].var() / len(ours) + theirs[column].var() / len(theirs))
        assert abs(ours[column].mean() - theirs[column].mean()) <= 4 * error + 1e-9, column


def test_dirichlet_streams_are_permutations_with_every_chunk_filled():
    manifest = unbalanced()
    for seed in range(5):
        stream = order_samples(manifest, {"kind": "dirichlet", "delta": 0.1, "seed": seed})
        assert sorted(stream) == sorted(manifest["sample_id"])
        chunks = dirichlet_chunks(manifest["label"].to_numpy(), 0.1, seed)
        assert len(chunks) == 10 and min(len(c) for c in chunks) >= 10  # NOTE's min_size_thresh
        for chunk in chunks:  # each class's share of a chunk is contiguous
            labels = manifest["label"].to_numpy()[chunk]
            assert len(run_lengths(list(labels))) == len(set(labels))


def test_dirichlet_correlation_falls_with_delta_from_class_blocked_to_iid():
    manifest = balanced()
    labels = lambda options: stream_labels(manifest, order_samples(manifest, options))
    mean = lambda delta: np.mean([label_correlation(labels({"kind": "dirichlet", "delta": delta, "seed": s}))
                                  for s in range(10)])
    correlations = [mean(delta) for delta in (1e-3, 0.01, 0.1, 1.0)]
    assert correlations == sorted(correlations, reverse=True)
    blocked = label_correlation(labels({"kind": "class_blocked", "seed": 0}))
    assert blocked == pytest.approx(290 / 299) and correlations[0] > 0.95 * blocked  # tiny delta: near separate
    # large delta, classes thinner than the chunks (12 samples over 40 chunks): near i.i.d.
    thin = balanced(classes=40, per_class=12)
    iid = np.mean([label_correlation(stream_labels(thin, order_samples(thin, {"kind": "shuffle", "seed": s})))
                   for s in range(20)])
    spread = np.mean([label_correlation(stream_labels(thin, order_samples(
        thin, {"kind": "dirichlet", "delta": 1e4, "seed": s, "min_chunk": 0}))) for s in range(20)])
    assert iid == pytest.approx(1 / 40, abs=0.01) and spread == pytest.approx(iid, abs=0.01)


def test_dirichlet_that_cannot_fill_its_chunks_names_n_c_and_delta():
    with pytest.raises(ValueError, match=r"120 samples cannot fill 20 chunks .* at least 10 .*delta 0.1"):
        order_samples(balanced(classes=20, per_class=6), {"kind": "dirichlet", "delta": 0.1, "seed": 0})
    with pytest.raises(ValueError, match=r"no draw in 1000 .*N = 600 samples, C = 50 classes.*delta 0.1"):
        order_samples(balanced(classes=50, per_class=12), {"kind": "dirichlet", "delta": 0.1, "seed": 0})
    stream = order_samples(balanced(classes=50, per_class=12), {"kind": "dirichlet", "delta": 0.1, "min_chunk": 0})
    assert len(stream) == 600


# ---------------------------------------------------------------- by difficulty


def with_hand_made_difficulty(n=20) -> pd.DataFrame:
    values = np.random.default_rng(3).permutation(n).astype(float)  # sample i has difficulty values[i]
    return pd.DataFrame({"sample_id": [f"x{i}" for i in range(n)], "label": np.arange(n) % 4, "difficulty": values})


def bins_of(manifest, stream, size) -> list[set]:
    ranks = manifest.set_index("sample_id").loc[stream, "difficulty"].tolist()
    return [set(ranks[i:i + size]) for i in range(0, len(ranks), size)]


def test_hardest_first_goes_decile_by_decile_and_easiest_first_mirrors_it():
    manifest = with_hand_made_difficulty(20)
    hardest = order_samples(manifest, {"kind": "hardest_first", "seed": 0, "bins": 10})
    easiest = order_samples(manifest, {"kind": "easiest_first", "seed": 0, "bins": 10})
    assert sorted(hardest) == sorted(easiest) == sorted(manifest["sample_id"])
    assert bins_of(manifest, hardest, 2) == [{19.0 - 2 * i, 18.0 - 2 * i} for i in range(10)]
    assert bins_of(manifest, easiest, 2) == bins_of(manifest, hardest, 2)[::-1]


def test_uneven_deciles_mirror_too():
    manifest = with_hand_made_difficulty(23)  # bins of 3, 3, 3, 2, ... (easiest first)
    easiest = order_samples(manifest, {"kind": "easiest_first", "seed": 1})
    hardest = order_samples(manifest, {"kind": "hardest_first", "seed": 1})
    sizes = [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    cut = lambda stream, sizes: [set(stream[sum(sizes[:i]):sum(sizes[:i + 1])]) for i in range(len(sizes))]
    assert cut(easiest, sizes) == cut(hardest, sizes[::-1])[::-1]
    values = manifest.set_index("sample_id").loc[easiest, "difficulty"].to_numpy()
    assert [max(values[:3])] == [2.0] and min(values[-2:]) == 21.0


def test_the_seed_changes_only_the_order_within_a_decile():
    manifest = with_hand_made_difficulty(40)
    streams = [order_samples(manifest, {"kind": "hardest_first", "seed": s}) for s in range(4)]
    assert len({tuple(s) for s in streams}) == 4
    assert all(bins_of(manifest, s, 4) == bins_of(manifest, streams[0], 4) for s in streams)


def test_difficulty_kinds_need_the_column():
    manifest = with_hand_made_difficulty().drop(columns="difficulty")
    for kind in ("hardest_first", "easiest_first"):
        with pytest.raises(ValueError, match=f"the {kind} ordering needs a `difficulty` column"):
            order_samples(manifest, {"kind": kind, "seed": 0})
    gap = with_hand_made_difficulty().assign(difficulty=lambda f: f["difficulty"].where(f["sample_id"] != "x5"))
    with pytest.raises(ValueError, match="sample 'x5' has no `difficulty`"):
        order_samples(gap, {"kind": "hardest_first"})


def test_label_correlation_by_hand():
    assert label_correlation([0, 0, 1, 1, 1, 2]) == pytest.approx(3 / 5)
    assert label_correlation(["a", "b", "a", "b"]) == 0.0
    assert label_correlation([7, 7, 7]) == 1.0
    assert np.isnan(label_correlation([3]))


# ---------------------------------------------------------------- families in params


def write(tmp_path, params) -> str:
    """A params file as a user writes it: a bare `on:` key (PyYAML quotes it; YAML 1.1 reads it as true)."""
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False).replace("'on':", "on:"))
    return str(path)


def line_of(path, text: str, after: int = 0) -> int:
    return next(i for i, line in enumerate(open(path), start=1) if i > after and text in line)


def family_params(image_root, **orderings) -> dict:
    params = make_params(image_root, mixtures={"mix": {"members": ["toy", "other"]}})
    params["datasets"]["other"] = {"kind": "image_folder", "root": str(image_root)}
    params["orderings"] = orderings or {
        "shuffle": {"kind": "shuffle", "seeds": 3},
        "dirichlet0.1": {"kind": "dirichlet", "delta": 0.1, "seeds": 2},
        "separate": {"kind": "class_blocked", "seeds": 2, "on": "datasets"},
        "hard": {"kind": "hardest_first", "bins": 4, "seeds": 1, "on": ["toy"]},
        "cyclic": {"kind": "cyclic", "block": 2, "seeds": 2},
        "late-shuffle": {"kind": "shuffle", "seed": 9},
        "dirichlet-7": {"kind": "dirichlet", "delta": 0.01, "seed": 7},
    }
    return params


def test_a_family_expands_to_seeded_orderings_and_explicit_ones_keep_working(image_root, tmp_path):
    path = write(tmp_path, family_params(image_root))
    assert True in yaml.safe_load(open(path))["orderings"]["separate"]  # YAML 1.1's `on`: the key true
    settings = load_settings(path)
    assert list(settings.orderings) == ["shuffle-0", "shuffle-1", "shuffle-2", "dirichlet0.1-0", "dirichlet0.1-1",
                                        "separate-0", "separate-1", "hard-0", "cyclic-0", "cyclic-1", "late-shuffle",
                                        "dirichlet-7"]
    d1 = settings.ordering("dirichlet0.1-1")
    assert (d1.kind, d1.family, d1.options, d1.as_dict()) == (
        "dirichlet", "dirichlet0.1", {"delta": 0.1, "seed": 1}, {"kind": "dirichlet", "delta": 0.1, "seed": 1})
    assert settings.ordering("late-shuffle").family == "shuffle"  # an explicit ordering joins its kind's family
    assert settings.ordering("dirichlet-7").family == "dirichlet0.01"
    assert settings.ordering("separate-0").on == "datasets" and settings.ordering("cyclic-0").on == "mixtures"
    plan = {(k.dataset, k.ordering) for k, g in expand_plan(settings) if g == "main" and k.method == "dynaprompt"}
    on = lambda ordering: sorted(d for d, o in plan if o == ordering)
    assert on("shuffle-0") == on("dirichlet0.1-1") == ["mix", "other", "toy"]
    assert on("separate-1") == ["other", "toy"] and on("hard-0") == ["toy"] and on("cyclic-1") == ["mix"]


def test_sweep_orderings_may_name_a_family(image_root):
    params = {**family_params(image_root), "sweep": {"orderings": ["dirichlet0.1", "late-shuffle"]}}
    plan = expand_plan(settings_from_params(params))
    assert {k.ordering for k, _ in plan} == {"dirichlet0.1-0", "dirichlet0.1-1", "late-shuffle"}
    with pytest.raises(ParamsError, match="ordering or family 'dirichlet0.2' is not defined"):
        settings_from_params({**family_params(image_root), "sweep": {"orderings": ["dirichlet0.2"]}})


@pytest.mark.parametrize("entry, key, message", [
    ({"kind": "dirichlet", "delta": 0.1, "seeds": 2, "concentration": 1}, "concentration",
     "orderings.bad.concentration: unknown option of ordering kind 'dirichlet'"),
    ({"kind": "dirichlet", "delta": 0.0, "seeds": 2}, "delta",
     "orderings.bad.delta: dirichlet: delta (the Dirichlet concentration) must be a number > 0, got 0.0"),
    ({"kind": "dirichlet", "delta": -1, "seed": 0}, "delta", "orderings.bad.delta: dirichlet: delta"),
    ({"kind": "shuffle", "seeds": 0}, "seeds", "orderings.bad.seeds: seeds (how many orderings of the family)"),
    ({"kind": "shuffle", "seeds": 2, "seed": 1}, "seed", "orderings.bad.seed: 'seed' has no place in a family"),
    ({"kind": "natural", "seeds": 2}, "seeds", "ordering kind 'natural' takes no seed"),
    ({"kind": "hardest_first", "bins": 0, "seeds": 2}, "bins", "orderings.bad.bins: hardest_first: bins must be"),
    ({"kind": "shuffle", "seeds": 2, "on": "everything"}, "on", "on must be one of ['all', 'datasets', 'mixtures']"),
    ({"kind": "shuffle", "seeds": 2, "on": ["toyy"]}, "on", "stream 'toyy' is not a dataset or mixture"),
    ({"kind": "cyclic", "seeds": 2, "on": "all"}, "on", "it needs a mixture's domains, so it runs on mixtures only"),
])
def test_ordering_errors_name_the_key_and_its_line(image_root, tmp_path, entry, key, message):
    params = family_params(image_root, shuffle={"kind": "shuffle", "seeds": 2}, bad=entry)
    path = write(tmp_path, params)
    with pytest.raises(ParamsError) as error:
        load_settings(path)
    text = str(error.value)
    assert message in text
    assert f"params.yaml:{line_of(path, f'    {key}:', after=line_of(path, '  bad:'))}: orderings.bad" in text, text


def test_a_familys_orderings_differ_in_their_seed_only(image_root, tmp_path):
    params = family_params(image_root, **{"dirichlet0.1": {"kind": "dirichlet", "delta": 0.1, "seeds": 2},
                                          "odd": {"kind": "dirichlet", "delta": 0.3, "seed": 5,
                                                  "family": "dirichlet0.1"}})
    path = write(tmp_path, params)
    with pytest.raises(ParamsError, match=r"params.yaml:\d+: orderings.odd: ordering 'odd' is in family "
                                          r"'dirichlet0.1' with 'dirichlet0.1-0', but their kind, options"):
        load_settings(path)
    twice = family_params(image_root, shuffle={"kind": "shuffle", "seeds": 2}, **{"shuffle-1": {"kind": "shuffle"}})
    with pytest.raises(ParamsError, match="ordering 'shuffle-1' is defined twice"):
        settings_from_params(twice)


def test_the_shipped_params_declare_the_issues_kinds():
    from .conftest import ROOT

    settings = load_settings(ROOT / "params.yaml")
    plan = expand_plan(settings)
    families = {}
    for key, group in plan:
        if group == "main":
            families.setdefault(key.dataset, set()).add(settings.ordering(key.ordering).family)
    for stream in settings.sweep.datasets:
        expected = ({"shuffle", "dirichlet0.1", "cyclic"} if stream in settings.mixtures else
                    {"shuffle", "dirichlet0.1", "dirichlet0.01", "class_blocked", "hardest_first", "easiest_first"})
        assert families[stream] == expected, stream
    paper = load_settings(ROOT / "configs" / "paper.yaml")
    on_001 = {k.dataset for k, _ in expand_plan(paper) if paper.ordering(k.ordering).family == "dirichlet0.001"}
    assert "imagenet_a" in on_001 and "dtd" in on_001 and "imagenet" not in on_001


# ---------------------------------------------------------------- difficulty, the plan's table, the runs


def toy_settings(image_root, tmp_path, **overrides):
    params = make_params(image_root, paths={"cache": str(tmp_path / "cache"), "features": str(tmp_path / "features"),
                                            "results": str(tmp_path / "results")})
    params["orderings"] = {"shuffle": {"kind": "shuffle", "seeds": 2},
                           "hardest_first": {"kind": "hardest_first", "bins": 3, "seeds": 2},
                           "easiest_first": {"kind": "easiest_first", "bins": 3, "seeds": 1}}
    params["sweep"] = {"methods": ["zero_shot", "online_tpt"]}
    params.update(overrides)
    return settings_from_params(params)


def test_difficulty_is_zero_shot_entropy_of_the_original_view_whatever_the_view_seed(image_root, tmp_path, clip):
    """What zero-shot CLIP (v0) says of each sample's original view, on the unperturbed features, whatever the view
    seed (its runs may see other views and perturbed features: the ordering must not move with them)."""
    from dynaprompt.difficulty import with_difficulty
    from dynaprompt.features import ImageViewSource, ViewEncoder
    from dynaprompt.methods import build_method
    from dynaprompt.objectives import TuningConfig
    from dynaprompt.runner import build_text_encoder, open_stream

    settings = toy_settings(image_root, tmp_path)
    data = open_stream(settings, "toy")
    manifest = with_difficulty(settings, data, clip)
    zero_shot = build_method("zero_shot", build_text_encoder(clip, data.classnames, settings), TuningConfig())
    views = ImageViewSource(data, ViewEncoder(clip, settings.views))  # all 16 views of a sample in one forward
    expected = [zero_shot(views(sample_id)).entropy_before for sample_id in manifest["sample_id"]]
    assert manifest["difficulty"].to_numpy() == pytest.approx(expected, abs=1e-6)
    other = toy_settings(image_root, tmp_path / "seed7", views={"n_views": 4, "view_seed": 7})
    assert with_difficulty(other, open_stream(other, "toy"), clip)["difficulty"].tolist() == manifest[
        "difficulty"].tolist()


def test_difficulty_is_computed_once_per_model_prompt_and_stream(image_root, tmp_path, clip, monkeypatch):
    from dynaprompt import difficulty
    from dynaprompt.runner import open_stream

    settings = toy_settings(image_root, tmp_path)
    first = difficulty.with_difficulty(settings, open_stream(settings, "toy"), clip)
    monkeypatch.setattr(difficulty, "compute_entropy", lambda *a: pytest.fail("recomputed"))
    again = difficulty.with_difficulty(settings, open_stream(settings, "toy"), clip)
    assert again["difficulty"].tolist() == first["difficulty"].tolist()
    assert len(list((tmp_path / "cache" / "difficulty").glob("*.parquet"))) == 1
    reworded = toy_settings(image_root, tmp_path, prompt={"n_ctx": 4, "ctx_init": "a blurry photo of"})
    with pytest.raises(pytest.fail.Exception, match="recomputed"):
        difficulty.with_difficulty(reworded, open_stream(reworded, "toy"), clip)


def test_plan_json_lists_every_stream_ordering_pair_with_its_family_and_label_correlation(image_root, tmp_path,
                                                                                          clip):
    from dynaprompt.difficulty import with_difficulty
    from dynaprompt.runner import open_stream

    settings = toy_settings(image_root, tmp_path)
    planned = expand_plan(settings)
    table = ordering_table(settings, planned, clip)
    assert [(r["dataset"], r["ordering"]) for r in table] == [("toy", o) for o in settings.orderings]
    layout = ResultsLayout(settings.path("results"))
    layout.write_plan(planned, table)
    frame = layout.read_plan_orderings()
    assert list(frame.columns) == PLAN_ORDERING_COLUMNS and len(frame) == 5
    row = frame.set_index("ordering").loc["hardest_first-1"]
    assert (row["kind"], row["family"], row["options"], row["seed"], row["n"]) == ("hardest_first", "hardest_first",
                                                                                    {"bins": 3}, 1, 12)
    manifest = with_difficulty(settings, open_stream(settings, "toy"), clip)
    for ordering, correlation in zip(frame["ordering"], frame["label_correlation"]):
        stream = order_samples(manifest, settings.ordering(ordering))
        assert correlation == pytest.approx(label_correlation(stream_labels(manifest, stream)))
    assert len(layout.read_plan()) == len(planned)


@pytest.mark.parametrize("method", ["zero_shot", "online_tpt"])  # reordered from the shared run / run in order
def test_a_run_follows_the_difficulty_order_and_records_its_family(image_root, tmp_path, clip, method):
    from dynaprompt.difficulty import with_difficulty
    from dynaprompt.resolve import resolve
    from dynaprompt.results import RunKey
    from dynaprompt.runner import open_stream, store_run

    settings = toy_settings(image_root, tmp_path)
    layout = ResultsLayout(settings.path("results"))
    summary, reused = store_run(resolve(settings, RunKey("toy", method, "hardest_first-1"), clip.weights), clip,
                                layout)
    manifest = with_difficulty(settings, open_stream(settings, "toy"), clip)
    expected = order_samples(manifest, settings.ordering("hardest_first-1"))
    records = layout.read_records(summary.key)
    assert not reused and records["sample_id"].tolist() == expected
    assert summary.ordering_kind == "hardest_first" and summary.ordering_family == "hardest_first"
    assert summary.label_correlation == pytest.approx(label_correlation(records["label"].to_numpy()))
    table = layout.write_runs_table(layout.summaries())
    assert table.loc[0, "ordering_family"] == "hardest_first"
    assert table.loc[0, "label_correlation"] == pytest.approx(summary.label_correlation)


def test_a_params_file_read_and_written_back_keeps_on_a_string_key_for_dvc(tmp_path):
    """PyYAML reads a bare `on:` as true; written back as `true:`, DVC's lock would hold a boolean key and its
    sort fails ('<' between bool and str: the rehearsal's sweep stage in CI). with_on_keys keeps it `on`."""
    from ruamel.yaml import YAML

    from dynaprompt.schema import with_on_keys

    source = "orderings:\n  class_blocked: {kind: class_blocked, seeds: 2, on: datasets}\n"
    params = with_on_keys(yaml.safe_load(source))
    assert params["orderings"]["class_blocked"]["on"] == "datasets"
    written = yaml.safe_dump(params, sort_keys=False)
    read_by_dvc = YAML(typ="safe").load(written)
    assert all(isinstance(key, str) for key in read_by_dvc["orderings"]["class_blocked"])
    assert yaml.safe_load(written) == params
    assert settings_from_params(params).orderings["class_blocked-1"] == settings_from_params(
        yaml.safe_load(source)).orderings["class_blocked-1"]
