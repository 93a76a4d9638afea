"""`dynaprompt check`: the datasets table, one line per missing root and a non-zero exit, the estimate on what is
found, and a missing paper dataset projected at its known test split (so a grid's cost reads before any copy)."""
from pathlib import Path

import yaml

from dynaprompt import check
from dynaprompt.cli import main as cli_main
from dynaprompt.config import settings_from_params
from dynaprompt.datasets import EXPECTED
from flows.rehearse import eurosat_tree, imagenet_a_tree

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "configs" / "paper.yaml"


def paper_params(tmp_path: Path, roots: dict) -> Path:
    """configs/paper.yaml with every dataset root under tmp_path (missing unless `roots` names a real tree)."""
    params = yaml.safe_load(PAPER.read_text())
    for name, spec in params["datasets"].items():
        spec["root"] = str(roots.get(name, tmp_path / "absent" / name))
    params["paths"] = {key: str(tmp_path / key) for key in params["paths"]}
    params["validate"] = {**params.get("validate", {}), "known_split_sizes": False}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def test_without_any_data_every_dataset_is_missing_and_the_grid_is_projected(tmp_path, capsys):
    code = cli_main(["check", "--params", str(paper_params(tmp_path, {})), "--top", "3"])
    out, err = capsys.readouterr()
    assert code == 1
    missing = [line for line in err.splitlines() if line.startswith("dynaprompt check: missing: ")]
    assert len(missing) == 15 and all(str(tmp_path / "absent") in line for line in missing)
    rows = [line for line in out.splitlines() if "| MISSING |" in line]
    assert len(rows) == 15
    assert "| imagenet_a | imagenet_a | MISSING | projected at 7500 | 200 |" in out
    summary = next(line for line in out.splitlines() if line.startswith("estimated "))
    assert "15 missing dataset(s) projected at their known test-split size" in summary
    assert "most expensive: " in summary


def test_the_projection_is_the_arithmetic_of_the_known_split(tmp_path):
    settings = settings_from_params(yaml.safe_load(paper_params(tmp_path, {}).read_text()),
                                    base_dir=tmp_path)
    reports = check.check_datasets(settings, ["imagenet_a", "eurosat"])
    assert all(r.projected and not r.found for r in reports)
    assert [(r.samples, r.classes) for r in reports] == [EXPECTED["imagenet_a"], EXPECTED["eurosat"]]
    work = check.estimate(settings, reports)
    tpt = next(r for r in work["runs"] if r["dataset"] == "imagenet_a" and r["method"] == "tpt")
    shapes = check.model_shapes(settings.model.arch)
    length = check.sequence_length(settings, check.known_classnames("imagenet_a"))
    per_sample = (3 * 1 + 1) * 200 * length * shapes["text_layers"] * check.layer_flops(shapes["text_width"], length)
    assert tpt["runs"] == len(settings.sweep.view_seeds)  # order-independent: one run per seed
    assert abs(tpt["tflops"] - tpt["runs"] * 7500 * per_sample / 1e12) < 1e-9 * tpt["tflops"]
    assert work["projected"] == ["eurosat", "imagenet_a"]


def test_on_real_trees_the_estimate_uses_what_is_found(tmp_path, capsys):
    roots = {"imagenet_a": imagenet_a_tree(tmp_path / "imagenet-a"), "eurosat": eurosat_tree(tmp_path / "eurosat")}
    code = cli_main(["check", "--params", str(paper_params(tmp_path, roots)), "--top", "1000"])
    out, err = capsys.readouterr()
    assert code == 1 and len(err.strip().splitlines()) == 13  # the other 13 roots are missing
    assert "| imagenet_a | imagenet_a | yes | 3 / 7500 (differs) (not checked) | 200 |" in out
    assert "| eurosat | eurosat | yes | 4 / 8100 (differs) (not checked) | 10 |" in out
    assert "| imagenet_a | tpt | 3 | 3 |" in out  # 3 seeds x the 3 samples found, not 7500


def test_a_missing_dataset_of_unknown_size_is_not_estimated(tmp_path, image_root, capsys):
    from .conftest import make_params

    params = make_params(image_root)
    params["datasets"]["lost"] = {"kind": "image_folder", "root": str(tmp_path / "nowhere")}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    code = cli_main(["check", "--params", str(path)])
    out, err = capsys.readouterr()
    assert code == 1 and "lost" in err and str(tmp_path / "nowhere") in err
    assert "| lost | image_folder | MISSING | – | – | – |" in out
    assert "| lost |" not in out.split("| dataset | method |")[-1]  # no estimate row for it
