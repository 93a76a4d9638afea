"""The paper's configuration is a params file away: it parses, plans, and fails clearly without weights."""
import socket
from dataclasses import replace
from pathlib import Path

import pytest

from dynaprompt.config import load_settings, resolve_run
from dynaprompt.datasets import ADAPTERS, EXPECTED
from dynaprompt.model import WeightsNotFoundError, load_clip
from dynaprompt.plan import expand_plan

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
