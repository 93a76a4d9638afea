"""The one-run command, offline, on a tiny random-weight config and a handful of images."""
import pandas as pd
import yaml

from dynaprompt.cli import main
from dynaprompt.records import RECORD_COLUMNS

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
