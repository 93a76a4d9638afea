"""The paper's configuration is a params file away: it parses, plans, and fails clearly without weights."""
import socket
from pathlib import Path

import pytest

from dynaprompt.config import load_settings
from dynaprompt.datasets import ADAPTERS, EXPECTED
from dynaprompt.model import WeightsNotFoundError, load_clip
from dynaprompt.plan import expand_plan
from dynaprompt.runner import tuning_for

PAPER = Path(__file__).resolve().parent.parent / "configs" / "paper.yaml"


def test_paper_config_names_the_15_datasets_and_their_learning_rates():
    settings = load_settings(PAPER)
    kinds = {spec["kind"] for spec in settings.datasets.values()}
    assert kinds == set(EXPECTED) and kinds <= set(ADAPTERS)
    assert tuning_for(settings, "imagenet_a").lr == 5e-3
    assert tuning_for(settings, "dtd").lr == 3e-3
    assert settings.model.arch == "ViT-B-16" and settings.model.pretrained == "openai"
    plan = expand_plan(settings)
    assert {key.dataset for key in plan} == set(settings.datasets) | set(settings.mixtures)


def test_paper_config_without_weights_fails_at_once(monkeypatch, tmp_path):
    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: pytest.fail("network"))
    settings = load_settings(PAPER)
    settings.model.cache_dir = str(tmp_path)
    settings.model.device = "cpu"
    with pytest.raises(WeightsNotFoundError, match="ViT-B-16"):
        load_clip(settings.model)
