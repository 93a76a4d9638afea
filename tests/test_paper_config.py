"""The paper's configuration is a params file away: it parses, plans, and fails clearly without weights."""
import socket
from dataclasses import replace
from pathlib import Path

import pytest

from dynaprompt.config import load_settings
from dynaprompt.datasets import ADAPTERS, EXPECTED
from dynaprompt.model import WeightsNotFoundError, load_clip
from dynaprompt.plan import expand_plan
from dynaprompt.resolve import resolve_run

PAPER = Path(__file__).resolve().parent.parent / "configs" / "paper.yaml"


def test_paper_config_names_the_15_datasets_and_their_learning_rates():
    settings = load_settings(PAPER)
    kinds = {spec.kind for spec in settings.datasets.values()}
    assert kinds == set(EXPECTED) and kinds <= set(ADAPTERS)
    assert resolve_run(settings, "imagenet_a", "tpt").tuning.lr == 5e-3
    assert resolve_run(settings, "dtd", "tpt").tuning.lr == 3e-3
    assert resolve_run(settings, "dtd", "tpt").views.augmix and not resolve_run(settings, "dtd", "zero").views.augmix
    assert settings.model.arch == "ViT-B-16" and settings.model.pretrained == "openai"
    plan = expand_plan(settings)
    assert {key.dataset for key, _ in plan} == set(settings.datasets) | set(settings.mixtures)


def test_paper_config_states_the_fine_grained_lr_once():
    text = PAPER.read_text()
    assert text.count("lr: 3.0e-3") == 1


def test_paper_config_without_weights_fails_at_once(monkeypatch, tmp_path):
    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: pytest.fail("network"))
    settings = load_settings(PAPER)
    with pytest.raises(WeightsNotFoundError, match="ViT-B-16"):
        load_clip(replace(settings.model, cache_dir=str(tmp_path), device="cpu"))


EXPERIMENTS = PAPER.parent / "experiments.yaml"


def apply_overrides(params: dict, overrides: dict) -> dict:
    """What `dvc exp run -S key=value` does to params.yaml, for dotted keys."""
    import copy

    out = copy.deepcopy(params)
    for dotted, value in overrides.items():
        node = out
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def dvc_command(name: str, recipe: dict) -> str:
    """The README's command for a recipe."""
    import json

    text = lambda v: json.dumps(v, separators=(",", ":")) if isinstance(v, (list, bool)) else v  # noqa: E731
    sets = " ".join(f"-S '{k}={text(v)}'" for k, v in recipe["set"].items())
    return f"dvc exp run --temp -n {name} {sets}"


@pytest.mark.parametrize("name", ["ablations-imagenet-a", "order-imagenet-a"])
def test_named_experiments_apply_to_the_paper_config_and_plan(name, tmp_path):
    import yaml

    from dynaprompt.config import settings_from_params

    recipe = yaml.safe_load(EXPERIMENTS.read_text())[name]
    params = apply_overrides(yaml.safe_load(PAPER.read_text()), recipe["set"])
    settings = settings_from_params(params)
    assert settings.model.arch == "ViT-B-16"
    planned = expand_plan(settings)
    assert {key.dataset for key, group in planned if group == "main"} == {"imagenet_a"}
    if name.startswith("ablations"):
        ablation = {key.method for key, group in planned if group == "ablation"}
        assert {"dynaprompt~M1", "dynaprompt~M20", "dynaprompt~entropy_only", "dynaprompt~no_append",
                "dynaprompt~tau_h0.1-tau_d0.1"} <= ablation
    readme = (PAPER.parent.parent / "README.md").read_text()
    assert dvc_command(name, recipe) in readme
