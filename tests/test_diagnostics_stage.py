"""The diagnostics stage on a toy sweep with a random tiny CLIP: which streams and methods it diagnoses, with the
settings their runs resolve to (templates, k_text, lambda, tuning), on a seeded subset for C-TPT."""
from __future__ import annotations

import json

import pytest
import torch

import stages.diagnostics as stage
from dynaprompt.config import settings_from_params
from dynaprompt.diagnostics import ctpt_gradients, ecalp_text_edges
from dynaprompt.methods.ecalp import ECALP
from dynaprompt.methods.zero_shot import classifier
from dynaprompt.model import load_model
from dynaprompt.resolve import resolve
from dynaprompt.results import SHARED_ORDERING, RunKey
from dynaprompt.runner import build_text_encoder, open_stream, view_source_for

from .conftest import make_params


def toy_params(image_root, tmp_path, methods: dict, samples: int = 5) -> dict:
    params = make_params(image_root)
    params["views"] = {"n_views": 8, "view_seed": 0}
    params["datasets"] = {"toy-a": {"kind": "image_folder", "root": str(image_root)},
                          "toy-b": {"kind": "image_folder", "root": str(image_root)}}
    params["mixtures"] = {"toy-mix": {"members": ["toy-a", "toy-b"]}}
    params["methods"] = {"zero_shot": {"kind": "zero_shot"}, **methods}
    params["orderings"] = {"shuffle-0": {"kind": "shuffle", "seed": 0}}
    params["paths"] = {"reports": str(tmp_path / "reports"), "prepared": str(tmp_path / "prepared"),
                       "features": str(tmp_path / "features"), "cache": str(tmp_path / "cache")}
    params["sweep"] = {"datasets": ["toy-a", "toy-mix"], "methods": list(params["methods"])}
    params["report"] = {"diagnostic_samples": samples, "seed": 3}
    return params


def run_stage(monkeypatch, params) -> dict:
    settings = settings_from_params(params)
    monkeypatch.setattr(stage, "settings", lambda: settings)
    stage.main()
    return json.loads((settings.path("reports") / "diagnostics.json").read_text())


def test_every_swept_stream_gets_the_diagnostics_of_its_ecalp_and_ctpt_methods(monkeypatch, image_root, tmp_path):
    methods = {"graph": {"kind": "ecalp", "k_text": 2, "templates": ["a photo of a {}.", "a drawing of a {}."]},
               "calibrated": {"kind": "ctpt", "lambda_term": 5.0, "tuning": {"lr": 0.02}}}
    params = toy_params(image_root, tmp_path, methods)
    found = run_stage(monkeypatch, params)
    assert set(found["streams"]) == {"toy-a", "toy-mix"}
    assert found["diagnostic_samples"] == 5 and found["seed"] == 3
    settings = settings_from_params(params)
    clip = load_model(settings)
    for stream, n in (("toy-a", 12), ("toy-mix", 24)):
        entry = found["streams"][stream]
        assert entry["n_samples"] == n and set(entry["ecalp"]) == {"graph"} and set(entry["ctpt"]) == {"calibrated"}
        data = open_stream(settings, stream)
        ids = list(data.manifest["sample_id"])
        text = build_text_encoder(clip, data.classnames, settings)
        # ECALP: k_text 2 of its run, on its two-template classifier, over every sample's original view
        run = resolve(settings, RunKey(stream, "graph", SHARED_ORDERING), clip.weights)
        source = view_source_for(run, data, clip)
        views = torch.stack([source(s) for s in ids])
        with torch.no_grad():
            expected = ecalp_text_edges(views, classifier(text, tuple(methods["graph"]["templates"]))[0].float(),
                                        ECALP.Config(k_text=2))
        assert entry["ecalp"]["graph"] == expected and expected["text_edges"] == 2 * n
        # C-TPT: lambda 5 and lr 0.02 of its run, on 5 samples drawn with seed 3
        run = resolve(settings, RunKey(stream, "calibrated", SHARED_ORDERING), clip.weights)
        source = view_source_for(run, data, clip)
        chosen = stage.sample_subset(ids, 5, 3)
        assert len(chosen) == 5 and chosen == sorted(chosen, key=ids.index)
        assert run.run.tuning.lr == 0.02 and run.run.options.lambda_term == 5.0
        expected = ctpt_gradients(text, [source(s) for s in chosen], run.run.tuning, 5.0)
        assert entry["ctpt"]["calibrated"] == pytest.approx(expected)
        other = ctpt_gradients(text, [source(s) for s in chosen], run.run.tuning, 20.0)
        assert other["gradient_ratio_median"] > expected["gradient_ratio_median"]  # lambda reaches the result


def test_a_sweep_without_diagnosed_methods_loads_no_model(monkeypatch, image_root, tmp_path):
    def no_model(_):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("dynaprompt.model.load_model", no_model)
    found = run_stage(monkeypatch, toy_params(image_root, tmp_path, {"tpt": {"kind": "tpt"}}))
    assert found["streams"] == {}


def test_the_ctpt_subset_is_seeded_and_never_longer_than_the_stream():
    ids = [f"s{i}" for i in range(10)]
    assert stage.sample_subset(ids, 4, 0) == stage.sample_subset(ids, 4, 0) != stage.sample_subset(ids, 4, 1)
    assert stage.sample_subset(ids, 50, 0) == ids and stage.sample_subset(ids, 0, 0) == []
