"""The paper's configuration is a params file away: it parses, plans, and fails clearly without weights."""
import socket
from dataclasses import replace
from pathlib import Path

import pytest

from dynaprompt.config import load_params, load_settings
from dynaprompt.datasets import ADAPTERS, EXPECTED
from dynaprompt.model import WeightsNotFoundError, load_clip
from dynaprompt.plan import expand_plan
from dynaprompt.resolve import resolve_run

PAPER = Path(__file__).resolve().parent.parent / "configs" / "paper.yaml"


IMAGENET_FAMILY = ("imagenet", "imagenet_a", "imagenet_v2", "imagenet_r", "imagenet_sketch")
FINE_GRAINED = ("caltech101", "oxford_pets", "stanford_cars", "flowers102", "food101", "fgvc_aircraft", "sun397",
                "dtd", "eurosat", "ucf101")
SHIFTS = ("imagenet_a", "imagenet_v2", "imagenet_r", "imagenet_sketch")


def expected(method: str, dataset: str) -> dict:
    """Every (method, dataset) setting of configs/paper.yaml that a run resolves to, and where it comes from."""
    fine = dataset in FINE_GRAINED
    lr = {  # TPT's --lr default everywhere; DynaPrompt's paper: 5e-3 on ImageNet, 3e-3 cross-dataset
        "tpt": 5e-3, "online_tpt": 5e-3, "ctpt": 5e-3, "rtpt": 5e-3,
        "dynaprompt": 3e-3 if fine else 5e-3, "dynaprompt_official": 3e-3 if fine else 5e-3,
        "dynaprompt_authors_script": 5e-3,  # run_dynap.sh: lr=0.005 everywhere
        "histpt": 5e-3,  # TTABC main.py --lr default (the authors' code is segmentation only)
    }.get(method)
    augmix = {  # TPT's code: AugMix on the fine-grained sets (len(set_id) > 1)
        "zero": False, "boostadapter": False, "mta": False,  # crop + flip on every set (their authors)
        "dpe": True,  # DPE: AugMix on every set (utils.py:get_preprocess)
        "ctpt": fine or dataset in SHIFTS,  # --I_augmix on the shifts
        "tda": fine or dataset in SHIFTS,  # TDA's loader: 63 AugMix views on A/V2/R/Sketch (utils.py:L103)
        "dota": fine or dataset in SHIFTS,  # DOTA's loader (TDA's): 63 AugMix views on A/V2/R/Sketch
    }.get(method, fine)
    options = {
        "dynaprompt": {"selection": "paper", "buffer_size": 10},
        "dynaprompt_official": {"selection": "official", "buffer_size": 10},
        "dynaprompt_authors_script": {"selection": "official", "buffer_size": 12},
        "zero": {"confident_ratio": 0.3},
        "ctpt": {"lambda_term": 20.0 if dataset in SHIFTS else 50.0},
        "rtpt": {"neighbours": 20, "temperature": 0.01},
        "mta": {"lambda_y": 0.2, "lambda_q": 4.0},
        "tda": {"query": "confident" if dataset in SHIFTS else "original"},
        "boostadapter": {"query": "confident" if dataset in SHIFTS else "original"},
        "dota": {"query": "confident" if dataset in SHIFTS else "original", "logit_scale": "authors"},
        "dpe": {"query": "confident" if dataset in IMAGENET_FAMILY and dataset != "imagenet" or dataset == "imagenet"
                else "original", "inference_query": "confident" if dataset == "imagenet_a" else "original"},
    }.get(method, {})
    return {"lr": lr, "augmix": augmix, "options": options, "amp": method != "rtpt"}


def test_every_method_on_every_dataset_resolves_to_its_source():
    settings = load_settings(PAPER)
    assert {spec.kind for spec in settings.datasets.values()} == set(EXPECTED) <= set(ADAPTERS)
    methods = [m for m, spec in settings.methods.items() if spec.derived_from is None]
    assert set(settings.sweep.methods) < set(methods)
    for method in methods:
        for dataset in settings.datasets:
            run, want = resolve_run(settings, dataset, method), expected(method, dataset)
            where = f"{method} on {dataset}"
            if want["lr"] is not None:
                assert run.tuning.lr == want["lr"], where
            assert run.views.augmix == want["augmix"], where
            assert run.tuning.amp == want["amp"], where
            for option, value in want["options"].items():
                assert getattr(run.options, option) == value, f"{where}: {option}"
    assert settings.model.arch == "ViT-B-16" and settings.model.pretrained == "openai"
    assert settings.model.device == "cuda"
    plan = expand_plan(settings)
    assert {key.dataset for key, _ in plan} == set(settings.datasets) | set(settings.mixtures)
    assert {key.seed for key, _ in plan} == {None, 1, 2}


def test_every_value_of_the_paper_config_names_its_source():
    """No dangling reference to a file that does not exist; every method entry carries a comment."""
    import re

    text = PAPER.read_text()
    for name in re.findall(r"configs/[\w.-]+\.ya?ml", text):
        assert (PAPER.parent.parent / name).is_file(), name
    assert "paper-ablations" not in text


def test_paper_config_without_weights_fails_at_once(monkeypatch, tmp_path):
    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: pytest.fail("network"))
    settings = load_settings(PAPER)
    with pytest.raises(WeightsNotFoundError, match="ViT-B-16"):
        load_clip(replace(settings.model, cache_dir=str(tmp_path), device="cpu"))


EXPERIMENTS = PAPER.parent / "experiments.yaml"


def apply_overrides(params: dict, overrides: dict) -> dict:
    """What `dvc exp run -S key=value` does to params.yaml, for dotted keys (and mapping values)."""
    import copy

    out = copy.deepcopy(params)
    for dotted, value in overrides.items():
        node = out
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = merged(node.get(leaf), value)
    return out


def merged(old, new):
    """A mapping value merges into the mapping it sets, as Hydra's override does; anything else replaces."""
    if isinstance(old, dict) and isinstance(new, dict):
        return {**old, **{key: merged(old.get(key), value) for key, value in new.items()}}
    return new


def dvc_command(name: str, recipe: dict) -> str:
    """The README's command for a recipe."""
    import json

    text = lambda v: json.dumps(v, separators=(",", ":")) if isinstance(v, (list, bool)) else v  # noqa: E731
    sets = " ".join(f"-S '{k}={text(v)}'" for k, v in recipe["set"].items())
    return f"dvc exp run --temp -n {name} {sets}"


@pytest.mark.parametrize("name", ["ablations-imagenet-a", "order-imagenet-a", "authors-script"])
def test_named_experiments_apply_to_the_paper_config_and_plan(name, tmp_path):
    import yaml

    from dynaprompt.config import settings_from_params

    recipe = yaml.safe_load(EXPERIMENTS.read_text())[name]
    assert "base" not in recipe
    params = apply_overrides(load_params(PAPER), recipe["set"])
    settings = settings_from_params(params)
    assert settings.model.arch == "ViT-B-16"
    planned = expand_plan(settings)
    if name != "authors-script":
        assert {key.dataset for key, group in planned if group == "main"} == {"imagenet_a"}
    if name.startswith("ablations"):
        ablation = {key.method for key, group in planned if group == "ablation"}
        assert {"dynaprompt~M1", "dynaprompt~M20", "dynaprompt~entropy_only", "dynaprompt~no_append",
                "dynaprompt~tau_h0.1-tau_d0.1"} <= ablation
    readme = (PAPER.parent.parent / "README.md").read_text()
    assert dvc_command(name, recipe) in readme


def dvc_set(params_file: Path, overrides: list[str]) -> dict:
    """DVC's own `-S` applied to a copy of a params file (Hydra's grammar: a family named dirichlet0.1 is reached
    through a mapping value, since a dotted path would split its name)."""
    from dvc.utils.hydra import apply_overrides as dvc_apply

    copy = params_file.parent / "copy.yaml"
    copy.write_text(params_file.read_text())
    dvc_apply(copy, overrides)
    return load_params(copy)


@pytest.mark.parametrize("name", ["full-field", "full-grid"])
def test_named_experiments_of_the_bundled_default_apply_through_dvc_and_widen_its_plan(name, tmp_path):
    import shlex

    import yaml

    from dynaprompt.config import settings_from_params
    from dynaprompt.methods import METHODS

    recipe = yaml.safe_load(EXPERIMENTS.read_text())[name]
    assert recipe["base"] == "params.yaml"
    readme = (PAPER.parent.parent / "README.md").read_text()
    command = next(line for line in readme.splitlines() if line.startswith(f"dvc exp run --temp -n {name} "))
    words = shlex.split(command)
    overrides = [words[i + 1] for i, word in enumerate(words) if word == "-S"]
    default_file = tmp_path / "params.yaml"
    default_file.write_text((PAPER.parent.parent / "params.yaml").read_text())
    default = settings_from_params(load_params(default_file))
    widened = dvc_set(default_file, overrides)
    assert widened == apply_overrides(load_params(default_file), recipe["set"])  # the README's command is the recipe
    settings = settings_from_params(widened)
    before = {key for key, group in expand_plan(default) if group == "main"}
    after = {key for key, group in expand_plan(settings) if group == "main"}
    assert before < after  # the default's grid within (full-field reuses its runs; full-grid its g3 runs)
    if name == "full-field":
        kinds = {settings.methods[m].kind for m in settings.sweep.methods}
        assert len(settings.sweep.methods) == 24 and {"ttl", "rlcf"} <= kinds and kinds <= set(METHODS)
    else:
        families = {spec.family for spec in settings.orderings.values()}
        assert all(sum(spec.family == f for spec in settings.orderings.values()) == 5 for f in families)
        assert "fmnist-pixelate-5" in settings.sweep.datasets
