"""The one-run command, offline, on a tiny random-weight config and a handful of images; `dynaprompt ui`'s parts."""
import http.client
import sqlite3
import sys

import pandas as pd
import pytest
import yaml

from dynaprompt.cli import main
from dynaprompt.records import RECORD_COLUMNS
from dynaprompt.ui import MlflowUi, experiment_id

from .conftest import make_params


def write_params(tmp_path, image_root):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(make_params(image_root)))
    return path


def test_run_prints_a_summary_and_writes_records(tmp_path, image_root, capsys):
    params = write_params(tmp_path, image_root)
    out = tmp_path / "runs" / "dp.parquet"
    code = main(["run", "--params", str(params), "--dataset", "toy", "--method", "dynaprompt",
                 "--ordering", "shuffle-0", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0
    assert "toy/dynaprompt/shuffle-0: n=12 accuracy=" in captured.out
    assert "sample" in captured.err  # the progress bar
    records = pd.read_parquet(out)
    assert list(records.columns) == RECORD_COLUMNS
    assert len(records) == 12
    assert out.with_suffix(".json").is_file()


def test_unknown_names_give_one_clear_error(tmp_path, image_root, capsys):
    params = write_params(tmp_path, image_root)
    code = main(["run", "--params", str(params), "--dataset", "toy", "--method", "tpt", "--ordering", "sorted"])
    assert code == 2
    err = capsys.readouterr().err
    assert "ordering 'sorted' is not defined" in err and "shuffle-0" in err


def test_missing_weights_give_one_clear_error(tmp_path, image_root, capsys):
    params = make_params(image_root)
    params["model"] = {"arch": "ViT-B-16", "pretrained": "openai", "cache_dir": str(tmp_path), "device": "cpu"}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    code = main(["run", "--params", str(path), "--dataset", "toy", "--method", "tpt", "--ordering", "natural"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No weights for model.arch='ViT-B-16'" in err


# ---------------------------------------------------------------- `dynaprompt ui` (the browser test drives it whole)


def mlflow_db(path, experiments):
    """A file with MLflow's `experiments` table, as far as `dynaprompt ui` reads it (no mlflow needed)."""
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE experiments (experiment_id INTEGER PRIMARY KEY, name TEXT, lifecycle_stage TEXT)")
        db.executemany("INSERT INTO experiments VALUES (?, ?, ?)", experiments)
    return path


def test_ui_finds_the_experiment_id_in_the_sqlite_file(tmp_path):
    db = mlflow_db(tmp_path / "mlflow.db", [(0, "Default", "active"), (3, "dynaprompt", "deleted"),
                                            (7, "dynaprompt", "active")])
    assert experiment_id(db, "dynaprompt") == "7"
    with pytest.raises(ValueError, match="no experiment 'other'"):
        experiment_id(db, "other")
    with pytest.raises(FileNotFoundError, match="no MLflow database"):
        experiment_id(tmp_path / "missing.db", "dynaprompt")


def test_ui_without_a_database_gives_one_clear_error(tmp_path, image_root, capsys):
    params = write_params(tmp_path, image_root)
    code = main(["ui", "--params", str(params), "--port", "0"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no MLflow database at" in err and "dvc repro" in err


def fake_mlflow(site):
    """A stand-in for `mlflow ui`: python's file server on the given port, serving index.html and /health."""
    return lambda db, artifacts, port: [sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                                        "--directory", str(site), str(port)]


def test_ui_front_lands_the_root_page_on_the_runs_and_passes_the_rest_through(tmp_path):
    db = mlflow_db(tmp_path / "mlflow.db", [(0, "Default", "active"), (4, "dynaprompt", "active")])
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text('<!doctype html><html><head><meta charset="utf-8"></head><body></body></html>')
    (site / "health").write_text("OK")
    server = MlflowUi(db, tmp_path / "mlartifacts", "dynaprompt", port=0, command=fake_mlflow(site),
                      log_dir=tmp_path)
    try:
        url = server.start(timeout=60)
        assert url == f"http://127.0.0.1:{server.port}/#/experiments/4/runs?workflowType=machine_learning"

        def request(method, path):
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            connection.request(method, path, body=b"{}" if method == "POST" else None)
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()

        status, headers, body = request("GET", "/")
        assert status == 200 and headers["Cache-Control"] == "no-store"
        # the route after '#' never reaches the server: a script in <head>, before the app's, sets it when absent
        assert body.startswith(b'<!doctype html><html><head><script>') and b'<meta charset="utf-8">' in body
        assert b'"#/experiments/4/runs?workflowType=machine_learning"' in body and b'h==="#/"' in body
        assert int(headers["Content-Length"]) == len(body)
        assert request("GET", "/health")[::2] == (200, b"OK")  # everything else as the server answered it
        assert request("GET", "/missing")[0] == 404
        assert request("POST", "/health")[0] == 501  # python's file server has no POST: its answer, passed on
        assert request("HEAD", "/health")[::2] == (200, b"")
    finally:
        server.close()
    assert server.process is None and server.front is None and not list(tmp_path.glob("dynaprompt-ui-*.log"))


def test_ui_reports_a_server_that_does_not_start(tmp_path):
    db = mlflow_db(tmp_path / "mlflow.db", [(1, "dynaprompt", "active")])
    crash = lambda db, artifacts, port: [sys.executable, "-c", "import sys; print('no such option'); sys.exit(3)"]
    server = MlflowUi(db, tmp_path, "dynaprompt", port=0, command=crash, log_dir=tmp_path)
    with pytest.raises(RuntimeError, match="exited with code 3: no such option"):
        server.start(timeout=60)
    server.close()
