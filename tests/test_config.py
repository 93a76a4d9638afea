"""params checked as they load: unknown keys, kinds and names named with their line and the closest names."""
import subprocess
import sys
import time

import pytest
import yaml

from dynaprompt.config import load_settings, settings_from_params
from dynaprompt.resolve import resolve_run
from dynaprompt.schema import ParamsError

from .conftest import make_params


def write(tmp_path, params) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return str(path)


def line_of(path, text: str) -> int:
    return next(i for i, line in enumerate(open(path), start=1) if text in line)


def test_unknown_key_is_named_with_its_line_and_the_closest_valid_name(tmp_path, image_root):
    params = make_params(image_root)
    params["methods"]["dynaprompt"] = {"kind": "dynaprompt", "bufer_size": 3}
    path = write(tmp_path, params)
    with pytest.raises(ParamsError) as error:
        load_settings(path)
    message = str(error.value)
    assert f"params.yaml:{line_of(path, 'bufer_size')}: methods.dynaprompt.bufer_size" in message
    assert "did you mean 'buffer_size'" in message


@pytest.mark.parametrize("block, entry, expected", [
    ("methods", {"x": {"kind": "dynaprmpt"}}, "unknown method kind 'dynaprmpt' (did you mean 'dynaprompt'?)"),
    ("orderings", {"x": {"kind": "shufle", "seed": 0}}, "unknown ordering kind 'shufle' (did you mean 'shuffle'?)"),
    ("orderings", {"x": {"kind": "shuffle", "sed": 0}}, "orderings.x.sed: unknown option of ordering kind"),
    ("datasets", {"x": {"kind": "imagenet_a", "rot": "/data"}}, "did you mean 'root'?"),
    ("tuning", {"lr": 0.01, "confidence_ratio": 0.1}, "did you mean 'confident_ratio'?"),
    ("sweep", {"methods": ["tpt", "online_tp"]}, "method 'online_tp' is not defined (did you mean 'online_tpt'?)"),
    ("sweep", {"datasets": ["toys"]}, "dataset 'toys' is not defined (did you mean 'toy'?)"),
])
def test_unknown_kinds_options_and_names(image_root, block, entry, expected):
    params = make_params(image_root)
    params[block] = {**params.get(block, {}), **entry} if block in ("methods", "orderings", "datasets") else entry
    with pytest.raises(ParamsError, match=expected.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        settings_from_params(params)


def test_unknown_top_level_block(image_root):
    with pytest.raises(ParamsError, match="unknown top-level block 'ablation' \\(did you mean 'ablations'"):
        settings_from_params({**make_params(image_root), "ablation": {}})


def test_bad_values_are_named(image_root):
    params = make_params(image_root)
    params["methods"]["dynaprompt"] = {"kind": "dynaprompt", "selection": "papers"}
    with pytest.raises(ParamsError, match="methods.dynaprompt: dynaprompt.selection must be 'paper' or 'official'"):
        settings_from_params(params)
    params = make_params(image_root)
    params["tuning"] = {"lr": "fast"}
    with pytest.raises(ParamsError, match="tuning.lr: expected a number"):
        settings_from_params(params)


def test_resolver_precedence_global_dataset_method_per_dataset(image_root):
    params = make_params(image_root)
    params["tuning"] = {"lr": 0.1}
    params["views"] = {"n_views": 16, "augmix": False}
    params["datasets"]["toy"].update({"augmix": True, "tuning": {"lr": 0.2}})
    params["datasets"]["other"] = {"kind": "image_folder", "root": str(image_root)}
    params["methods"]["zero"] = {"kind": "zero", "views": {"augmix": False}}
    params["methods"]["tpt"] = {"kind": "tpt", "tuning": {"steps": 2},
                                "per_dataset": {"other": {"tuning": {"lr": 0.4}}}}
    settings = settings_from_params(params)
    assert resolve_run(settings, "toy", "online_tpt").tuning.lr == 0.2  # dataset over global
    assert resolve_run(settings, "toy", "online_tpt").views.augmix is True  # the dataset's AugMix
    assert resolve_run(settings, "toy", "zero").views.augmix is False  # the method's views over the dataset's
    tpt = resolve_run(settings, "toy", "tpt").tuning
    assert tpt.lr == 0.2 and tpt.steps == 2
    assert resolve_run(settings, "other", "tpt").tuning.lr == 0.4  # per-dataset override of the method
    assert resolve_run(settings, "other", "online_tpt").tuning.lr == 0.1  # the global default
    assert resolve_run(settings, "toy", "zero").options.confident_ratio == 0.3  # ZERO's authors' default


def test_views_augmix_in_params_means_something(image_root):
    params = make_params(image_root)
    params["views"] = {"n_views": 16, "augmix": True}
    assert resolve_run(settings_from_params(params), "toy", "tpt").views.augmix is True


def test_sweep_exits_non_zero_within_seconds_on_a_bad_params_file(tmp_path, image_root):
    params = make_params(image_root)
    params["methods"]["dynaprompt"] = {"kind": "dynaprompt", "bufer_size": 3}
    path = write(tmp_path, params)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "flows.sweep", "--params", path], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0
    assert "bufer_size" in done.stderr and "buffer_size" in done.stderr
    assert time.perf_counter() - start < 60  # before Prefect starts anything (a temporary server takes longer)
    assert "Starting temporary server" not in done.stdout + done.stderr
