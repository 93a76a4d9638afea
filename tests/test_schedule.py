"""Scheduled robustness sweeps add new orderings until the intervals are tight, and log only what they compute."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from dynaprompt.config import load_settings
from dynaprompt.registry import OrderingRegistry, with_registered
from dynaprompt.results import ResultsLayout, RunKey

from .conftest import ROOT, sweep_params

ORDER_DEPENDENT = ["online_tpt", "dynaprompt"]


def scheduled_params(image_root, tmp_path, target=0.0001, **overrides):
    return sweep_params(image_root, tmp_path, datasets=["toy-a", "toy-mix"], methods=["zero_shot", *ORDER_DEPENDENT],
                        schedule={"name": "nightly", "cron": "15 2 * * *", "add_orderings": 1,
                                  "target_half_width": target, "max_orderings": 10}, **overrides)


def registry(tmp_path):
    return OrderingRegistry(ResultsLayout(tmp_path / "results").orderings_registry).entries()


def child_runs(tmp_path, db="mlflow.db"):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / db}")
    found = mlflow.search_runs(experiment_names=["test"], output_format="pandas")
    return found[found["tags.mlflow.parentRunId"].notna()], found[found["tags.mlflow.parentRunId"].isna()]


@pytest.mark.slow
def test_two_scheduled_runs_add_2k_distinct_orderings_and_log_each_result_once(prefect_server, image_root, tmp_path):
    from flows.sweep import run_sweep

    params = scheduled_params(image_root, tmp_path)
    run_sweep(str(params))  # the fixed plan first, as `dvc repro` runs it
    children_before, _ = child_runs(tmp_path)
    first = run_sweep(str(params), add_orderings=1)
    second = run_sweep(str(params), add_orderings=1)
    # K = 1 per order-dependent family of the plan whose pairs are off target: first a shuffle (toy-a and toy-mix)
    # and a cyclic one (toy-mix); then only the families still off target (a pair whose orderings score alike is
    # on target: toy-mix's DynaPrompt scores 0.375 on both cyclic orderings of these 12-sample streams)
    assert sorted(name.rsplit("-", 1)[0] for name in first["added"]) == ["cyclic", "shuffle"]
    assert 1 <= len(second["added"]) <= 2
    entries = registry(tmp_path)
    names = [e.name for e in entries]
    assert len(names) == len(set(names)) == len(first["added"]) + len(second["added"])
    assert set(first["added"]).isdisjoint(second["added"])
    assert {e.family for e in entries} == {"cyclic", "shuffle"}
    assert all(e.status == "complete" for e in entries)
    seeds = {(e.kind, e.seed) for e in entries}
    settings = load_settings(params)
    assert seeds.isdisjoint({(o.kind, o.seed) for o in settings.orderings.values()})  # never a params seed
    # only the order-dependent methods ran the new orderings
    assert {"dynaprompt"} <= {m for e in entries for _, m in e.runs} <= set(ORDER_DEPENDENT)  # a pair on target
    #   (Online TPT scores alike under every ordering of these 12-sample streams) gets none
    runs = pd.read_parquet(tmp_path / "results" / "runs.parquet")
    assert not runs.duplicated(["dataset", "method", "ordering"]).any()
    assert set(names) <= set(runs["ordering"])
    children, parents = child_runs(tmp_path)
    assert len(children) == len(children_before) + first["computed"] + second["computed"]
    assert not children["tags.fingerprint"].duplicated().any()
    scheduled = parents[parents["params.added_orderings"] != "none"]
    assert len(scheduled) == 2 and set(scheduled["params.added_orderings"]) == {",".join(first["added"]),
                                                                                 ",".join(second["added"])}
    # the report reads the registry: the accumulated orderings are covered
    from stages.reporting.results import load_results

    loaded = load_results(ResultsLayout(tmp_path / "results"), settings)
    assert set(names) <= set(loaded.runs["ordering"])


@pytest.mark.slow
def test_target_met_at_once_adds_nothing(prefect_server, image_root, tmp_path, capsys):
    from flows.sweep import run_sweep

    params = scheduled_params(image_root, tmp_path, target=1.0)  # a +-100 point interval: met by any two orderings
    config = yaml.safe_load(params.read_text())
    config["orderings"]["cyclic-1"] = {"kind": "cyclic", "block": 2, "seed": 1}  # two on the mixture too
    params.write_text(yaml.safe_dump(config))
    run_sweep(str(params))
    outcome = run_sweep(str(params), add_orderings=2)
    assert outcome == {"runs": 0, "computed": 0, "reused": 0, "added": []}
    assert registry(tmp_path) == []
    assert "nothing to add" in capsys.readouterr().out


@pytest.mark.slow
def test_a_killed_scheduled_run_resumes_without_reusing_a_half_written_seed(real_prefect_server, image_root, tmp_path):
    params = scheduled_params(image_root, tmp_path, workers=1)
    env = {**os.environ, "PREFECT_API_URL": real_prefect_server}
    first = subprocess.run([sys.executable, "-m", "flows.sweep", "--params", str(params)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    process = subprocess.Popen([sys.executable, "-m", "flows.sweep", "--params", str(params), "--add-orderings",
                                "1"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    registry_file = ResultsLayout(tmp_path / "results").orderings_registry
    deadline = time.time() + 300
    while time.time() < deadline and not (registry_file.is_file() and len(json.loads(registry_file.read_text())
                                                                           ["orderings"]) == 2):
        time.sleep(0.1)
    new_names = [e.name for e in registry(tmp_path)]
    runs = tmp_path / "results" / "runs"
    while time.time() < deadline and not any(runs.glob(f"*/*/{name}*.json") for name in new_names):
        time.sleep(0.05)  # the first run of a new ordering has finished: kill -9 mid-sweep
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed = registry(tmp_path)
    # a small ordering (the mixture's) may have finished whole before the kill; the other may not
    assert len(killed) == 2 and any(e.status == "pending" for e in killed), killed
    done = subprocess.run([sys.executable, "-m", "flows.sweep", "--params", str(params), "--add-orderings", "1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    entries = registry(tmp_path)
    assert [e.name for e in entries[:2]] == [e.name for e in killed]  # resumed, not redrawn
    assert all(e.status == "complete" for e in entries) and len(entries) in (3, 4)  # a second draw for the families
    #   still off target: the shuffle (and the cyclic family, where its two orderings still differ)
    seeds = [(e.kind, e.seed) for e in entries]
    assert len(seeds) == len(set(seeds))
    assert not list((tmp_path / "results").rglob("*.partial"))


def test_next_seed_is_above_every_seed_in_use(tmp_path, image_root):
    params = yaml.safe_load(scheduled_params(image_root, tmp_path).read_text())
    params["orderings"]["shuffle-7"] = {**params["orderings"]["shuffle-0"], "seed": 7}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    settings = load_settings(path)
    reg = OrderingRegistry(tmp_path / "orderings.json")
    shuffle, cyclic = settings.ordering("shuffle-0"), settings.ordering("cyclic-0")
    entry = reg.draw(settings, shuffle, [["toy-a", "online_tpt"]], "s1")
    assert entry.seed == 8 and entry.name == "shuffle-8" and entry.status == "pending" and entry.family == "shuffle"
    assert reg.draw(settings, shuffle, [["toy-a", "online_tpt"]], "s1").seed == 9
    drawn = reg.draw(settings, cyclic, [["toy-mix", "online_tpt"]], "s1")
    assert drawn.name == "cyclic-1" and drawn.options == {"block": 2} and drawn.spec.on == "mixtures"


@pytest.mark.slow
def test_a_scheduled_run_adds_cells_under_every_seed_of_the_grid(prefect_server, image_root, tmp_path):
    """With sweep.view_seeds, a new ordering runs under each seed; the registry records the seeds."""
    from flows.sweep import run_sweep

    params = sweep_params(image_root, tmp_path, datasets=["toy-a"], methods=["zero_shot", "online_tpt"],
                          view_seeds=[0, 3], schedule={"name": "nightly", "cron": "15 2 * * *", "add_orderings": 1,
                                                       "target_half_width": 0.0001, "max_orderings": 10})
    run_sweep(str(params))
    layout = ResultsLayout(tmp_path / "results")
    base = {(s.method, s.ordering, s.view_seed) for s in layout.summaries()}
    assert {seed for _, _, seed in base} == {0, 3}  # the fixed plan is crossed with the seeds
    added = run_sweep(str(params), add_orderings=1)["added"]
    entries = registry(tmp_path)
    assert [e.name for e in entries] == added and all(e.seeds == [0, 3] for e in entries)
    cells = {(s.method, s.ordering, s.view_seed) for s in layout.summaries()} - base
    assert cells == {("online_tpt", name, seed) for name in added for seed in (0, 3)}
    assert all((layout.root / "runs" / "toy-a" / "online_tpt" / f"{name}~seed3.parquet").is_file() for name in added)


def test_a_scheduled_sweep_extends_every_order_dependent_family_with_its_own_options(tmp_path, image_root,
                                                                                   monkeypatch):
    """Per family (not per kind): the family's kind and options, its next seed, `<family>-<seed>`, its streams."""
    from tasks import evidence

    params = yaml.safe_load(scheduled_params(image_root, tmp_path).read_text())
    params["orderings"] = {"natural": {"kind": "natural"}, "shuffle": {"kind": "shuffle", "seeds": 2},
                           "dirichlet0.1": {"kind": "dirichlet", "delta": 0.1, "seeds": 2},
                           "dirichlet0.01": {"kind": "dirichlet", "delta": 0.01, "seeds": 1, "on": "datasets"},
                           "blocked": {"kind": "class_blocked", "seeds": 1, "on": ["toy-a"]},
                           "cyclic": {"kind": "cyclic", "block": 2, "seeds": 1}}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    settings = load_settings(path)
    layout = ResultsLayout(tmp_path / "results")
    above = {(d, m): (1.0, None) for d in ("toy-a", "toy-mix") for m in ORDER_DEPENDENT}
    monkeypatch.setattr(evidence, "pairs_above_target", lambda layout, settings: above)
    drawn = {e.name: e for e in evidence.draw_orderings(settings, layout, 1, "s1")}
    assert sorted(drawn) == ["blocked-1", "cyclic-1", "dirichlet0.01-1", "dirichlet0.1-2", "shuffle-2"]  # no natural
    assert drawn["dirichlet0.1-2"].options == {"delta": 0.1} and drawn["dirichlet0.1-2"].family == "dirichlet0.1"
    streams = lambda name: sorted({d for d, _ in drawn[name].runs})
    assert streams("dirichlet0.1-2") == streams("shuffle-2") == ["toy-a", "toy-mix"]
    assert streams("dirichlet0.01-1") == streams("blocked-1") == ["toy-a"] and streams("cyclic-1") == ["toy-mix"]
    again = {e.name for e in evidence.draw_orderings(settings, layout, 1, "s1")}
    assert "dirichlet0.1-3" in again and "dirichlet0.01-2" in again  # the next seeds, per family
    registered = with_registered(settings, OrderingRegistry(layout.orderings_registry).entries())
    spec = registered.ordering("dirichlet0.01-2")
    assert (spec.kind, spec.family, spec.as_dict(), spec.on) == (
        "dirichlet", "dirichlet0.01", {"kind": "dirichlet", "delta": 0.01, "seed": 2}, "datasets")
    assert registered.ordering("blocked-1").on == ("toy-a",)


def test_an_older_registry_without_families_reads_as_the_kinds_families(tmp_path, image_root):
    settings = load_settings(scheduled_params(image_root, tmp_path))
    file = tmp_path / "orderings.json"
    file.write_text(json.dumps({"orderings": [{"name": "shuffle-5", "kind": "shuffle", "seed": 5, "options": {},
                                               "added_at": "", "sweep_id": "old", "status": "complete"}]}))
    reg = OrderingRegistry(file)
    assert reg.entries()[0].spec.family == "shuffle" and reg.next_seed(settings, "shuffle") == 6



def test_a_live_sweeps_pending_orderings_are_left_to_it_and_a_dead_ones_taken_over(tmp_path, image_root):
    settings = load_settings(scheduled_params(image_root, tmp_path))
    layout = ResultsLayout(tmp_path / "results")
    reg = OrderingRegistry(layout.orderings_registry)
    alive = lambda sweep_id: layout.sweep_lock(sweep_id).held()  # what a scheduled sweep asks
    # "dead": a sweep process that held its lock and was killed -9 (the kernel drops its lock, the file stays)
    dead_lock = layout.sweep_lock("dead")
    dead_lock.path.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                               str(dead_lock.path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    assert alive("dead")
    live = layout.sweep_lock("live")
    live.acquire()  # "live": this process, still running its sweep
    drawn = {owner: reg.draw(settings, settings.ordering("shuffle-0"), [["toy-a", "online_tpt"]], owner).name
             for owner in ("live", "dead", "gone")}  # "gone": ended with a failed run (its lock released)
    holder.kill()
    holder.wait()
    assert not alive("dead") and dead_lock.path.exists() is False  # the stale lock file is removed when probed
    new = layout.sweep_lock("new")
    with new:
        claimed = reg.claim_pending("new", alive)
        assert sorted(e.name for e in claimed) == sorted([drawn["dead"], drawn["gone"]])
        entries = {e.name: e for e in reg.entries()}
        assert entries[drawn["live"]].owner == "live" and entries[drawn["live"]].status == "pending"
        assert all(entries[drawn[o]].owner == "new" and entries[drawn[o]].sweep_id == o for o in ("dead", "gone"))
        assert entries[drawn["dead"]].pid == os.getpid() and entries[drawn["dead"]].host
        # a second sweep now finds them owned by a live sweep ("new") and leaves them, as it leaves "live"'s
        assert reg.claim_pending("other", alive) == []
    live.release()
    assert [e.name for e in reg.claim_pending("other", alive)] == list(drawn.values())  # both ended: taken over
    assert not list(layout.root.rglob("*.lock"))


def test_a_run_being_computed_is_waited_for(tmp_path):
    """The per-run lock: a second holder waits until the first releases it (across threads as across processes)."""
    import threading

    layout = ResultsLayout(tmp_path / "results")
    key = RunKey("toy-a", "online_tpt", "shuffle-0")
    first, events = layout.lock(key), []
    first.acquire()
    assert not layout.lock(key).acquire(blocking=False) and layout.lock(key).held()

    def second():
        with layout.lock(key):
            events.append("second")

    waiter = threading.Thread(target=second)
    waiter.start()
    time.sleep(0.3)
    events.append("first done")
    first.release()
    waiter.join(timeout=10)
    assert events == ["first done", "second"] and not layout.lock(key).path.exists()


COMPUTED = re.compile(r"^\[\d+/\d+\] (\S+) accuracy=\S+ \((?!reused\))", re.MULTILINE)


def start_sweep(params, env, log_dir, extra):
    """`python -m flows.sweep --params P <extra>` in the background, its output to a file."""
    log = log_dir / f"sweep-{time.time_ns()}.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "flows.sweep", "--params", str(params), *extra], cwd=ROOT,
                                   env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return process, log


def finish(process, log, timeout=600) -> str:
    process.wait(timeout=timeout)
    text = log.read_text()
    assert process.returncode == 0, text[-3000:]
    return text


def sweeps_at_once(params, env, log_dir, *arguments) -> list[str]:
    """One sweep per argument list, all started together; their outputs once all exited 0."""
    started = [start_sweep(params, env, log_dir, extra) for extra in arguments]
    return [finish(*one) for one in started]


def wait_until(condition, what, timeout=300):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def a_sweep_waiting_on_a_run_while_another_starts(params, env, tmp_path) -> list[str]:
    """Scheduled sweep A draws its orderings and is held up on one of its runs (the test holds that run's lock, as
    a third sweep computing it would); scheduled sweep B starts and ends meanwhile. B must leave A's pending
    orderings to A; A then finishes them."""
    from tasks.evidence import pairs_above_target

    settings, layout = load_settings(params), ResultsLayout(tmp_path / "results")
    reg = OrderingRegistry(layout.orderings_registry)
    shuffle = f"shuffle-{reg.next_seed(settings, 'shuffle')}"  # the name A will give its shuffle
    held = [layout.lock(RunKey(d, m, shuffle)) for d, m in pairs_above_target(layout, settings)]
    assert held and all(lock.acquire(blocking=False) for lock in held)
    before = len(reg.entries())
    a = start_sweep(params, env, tmp_path, ["--add-orderings", "1"])
    wait_until(lambda: "waiting for it" in a[1].read_text(), "sweep A to wait on its held run")
    mine = reg.entries()[before:]
    assert mine and all(e.status == "pending" for e in mine)
    b_output = finish(*start_sweep(params, env, tmp_path, ["--add-orderings", "1"]))
    assert a[0].poll() is None and "which is still running; left to it" in b_output
    entries = {e.name: e for e in reg.entries()}
    assert all(entries[e.name].status == "pending" and entries[e.name].owner == e.sweep_id for e in mine)
    for lock in held:
        lock.release()
    return [finish(*a), b_output]


@pytest.mark.slow
@pytest.mark.parametrize("mlflow_db", ["fresh", "existing"])
def test_overlapping_sweeps_compute_and_log_each_run_once(real_prefect_server, image_root, tmp_path, mlflow_db):
    """Sweeps overlapping on one results folder (two plain, two scheduled at once, a scheduled one started while
    another waits on a run, a plain one next to a scheduled one): all exit 0, no sweep takes over another's pending
    orderings, every run is computed once and logged once, on a new MLflow database each time or on one."""
    params = sweep_params(image_root, tmp_path, datasets=["toy-a"], methods=["zero_shot", *ORDER_DEPENDENT],
                          schedule={"name": "nightly", "cron": "15 2 * * *", "add_orderings": 1,
                                    "target_half_width": 0.0001, "max_orderings": 10})
    env = {**os.environ, "PREFECT_API_URL": real_prefect_server}
    layout, db = ResultsLayout(tmp_path / "results"), "mlflow.db"
    scheduled = ["--add-orderings", "1"]
    stages = [lambda: sweeps_at_once(params, env, tmp_path, [], []),  # the fixed plan, twice at once
              lambda: sweeps_at_once(params, env, tmp_path, scheduled, scheduled),
              lambda: a_sweep_waiting_on_a_run_while_another_starts(params, env, tmp_path),
              lambda: sweeps_at_once(params, env, tmp_path, [], scheduled)]
    if mlflow_db == "fresh":
        del stages[2]  # its sweeps do not open the database at the same moment
    for index, stage in enumerate(stages):
        if mlflow_db == "fresh":  # the stage's sweeps open a new database (MLflow creates its schema) at once
            config, db = yaml.safe_load(params.read_text()), f"mlflow-{index}.db"
            config["mlflow"]["db"] = str(tmp_path / db)
            params.write_text(yaml.safe_dump(config))
        computed = [label for output in stage() for label in COMPUTED.findall(output)]
        assert len(computed) == len(set(computed))  # no run computed by both sweeps of the stage
        children, parents = child_runs(tmp_path, db)
        assert not children["tags.fingerprint"].duplicated().any()
        # every computed result logged once (a run computed twice under one fingerprint would count twice here),
        # next to the finished results a sweep found missing in the store (a fresh one), logged from their files
        recovered = children.get("tags.recovered", pd.Series("", index=children.index)) == "true"
        assert parents["metrics.computed"].sum() == (~recovered).sum()
        assert parents.get("metrics.recovered", pd.Series(0.0)).fillna(0).sum() == recovered.sum()
        logged, summaries = set(children["tags.fingerprint"]), layout.summaries()
        if mlflow_db == "fresh":
            assert {layout.read_summary(RunKey.from_cell(*label.split("/"))).fingerprint
                    for label in computed} <= logged <= {s.fingerprint for s in summaries}
        else:  # (a code change by hand between stages recomputes runs: their earlier results stay logged)
            assert {s.fingerprint for s in summaries} <= logged
        # a scheduled sweep's parent names exactly the orderings it drew, and holds runs of those only
        entries = registry(tmp_path)
        for sweep_id, added in zip(parents["tags.sweep_id"], parents["params.added_orderings"]):
            assert added == "none" or set(added.split(",")) == {e.name for e in entries if e.sweep_id == sweep_id}
        added_by = dict(zip(parents["run_id"], parents["params.added_orderings"]))
        for ordering, parent in zip(children.loc[~recovered, "tags.ordering"],
                                    children.loc[~recovered, "tags.mlflow.parentRunId"]):
            assert added_by[parent] == "none" or ordering in added_by[parent].split(",")
    entries = registry(tmp_path)
    n_scheduled = 5 if mlflow_db == "existing" else 3
    assert len({e.sweep_id for e in entries}) == n_scheduled  # each drew one ordering per family of the plan
    assert [e.family for e in entries] == ["shuffle"] * n_scheduled  # toy-a's only family (cyclic: the mixture's)
    assert len({e.name for e in entries}) == len({(e.kind, e.seed) for e in entries}) == len(entries)
    assert all(e.status == "complete" and e.owner == e.sweep_id for e in entries)  # completed by who drew it
    runs = pd.read_parquet(tmp_path / "results" / "runs.parquet")
    assert not runs.duplicated(["dataset", "method", "ordering", "view_seed"]).any()
    assert len(runs) == len(layout.summaries()) and {e.name for e in entries} <= set(runs["ordering"])
    assert not list(tmp_path.rglob("*.lock")) and not list(tmp_path.rglob("*.partial"))
