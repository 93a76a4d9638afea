"""Honest fingerprints: what changes a run's records is in its identity, what does not stays out.

In: the device type and precision (cpu/fp32, cuda/fp16-autocast, cpu/bf16-autocast), the CPU thread count on the
CPU, the text encoder's token budget (a chunked gradient pass gives other last bits). Out: the checkpoint interval,
the thread count on a GPU, the GPU's index, where weights are looked for (dynaprompt.provenance's docstring)."""
from dataclasses import replace

import pandas as pd
import pytest
import torch

from dynaprompt.checkpoint import RunCheckpoint
from dynaprompt.config import settings_from_params
from dynaprompt.methods import build_method
from dynaprompt.methods.dynaprompt import Config as DynaPromptConfig
from dynaprompt.objectives import TuningConfig
from dynaprompt.resolve import device_type, resolve
from dynaprompt.results import RunKey
from dynaprompt.runner import RunFailed, execute, run_stream
from dynaprompt.text import PromptTextEncoder

from .conftest import make_params, random_view_features

KEY = RunKey("toy", "dynaprompt", "shuffle-0")
WEIGHTS = "random(seed=0)"


def settings_with(image_root, model=None, **blocks):
    params = make_params(image_root)
    params["model"] = {**params["model"], **(model or {})}
    for name, values in blocks.items():
        params[name] = {**params.get(name, {}), **values}
    return settings_from_params(params)


def fingerprint(settings, key=KEY) -> str:
    return resolve(settings, key, WEIGHTS).fingerprint


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch sees a GPU: `model.device: auto` resolves to cuda (nothing touches the device when a run resolves)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def records_equal(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    return a.drop(columns="seconds").equals(b.drop(columns="seconds"))


# ---------------------------------------------------------------- out: what only changes memory or bookkeeping


def test_the_checkpoint_interval_stays_out_and_saving_changes_no_record(image_root, tmp_path, text):
    base = settings_with(image_root, run={"checkpoint_every": 500})
    assert fingerprint(base) == fingerprint(settings_with(image_root, run={"checkpoint_every": 2}))
    samples = dict(zip([f"s{i}" for i in range(7)], random_view_features(7, seed=3)))
    ids, labels = list(samples), {s: i % 3 for i, s in enumerate(samples)}
    config = DynaPromptConfig(buffer_size=3)
    plain = run_stream(build_method("dynaprompt", text, TuningConfig(lr=0.05), config), ids, labels,
                       samples.__getitem__)
    saving = run_stream(build_method("dynaprompt", text, TuningConfig(lr=0.05), config), ids, labels,
                        samples.__getitem__, checkpoint=RunCheckpoint(tmp_path / "c", "fp", every=2))
    assert records_equal(plain, saving)  # (a resumed run's records: tests/test_checkpoint.py)


def test_where_weights_are_looked_for_stays_out(image_root):
    base = settings_with(image_root)
    assert fingerprint(base) == fingerprint(settings_with(image_root, model={"cache_dir": "/elsewhere/hub",
                                                                            "allow_download": True}))
    assert fingerprint(base) != fingerprint(settings_with(image_root, model={"init_seed": 1}))  # what: in


def test_on_a_gpu_its_index_and_the_cpu_thread_count_stay_out(image_root, fake_gpu):
    auto = settings_with(image_root, model={"device": "auto"})
    assert device_type("auto") == "cuda" and device_type("cuda:3") == "cuda" and device_type("cpu") == "cpu"
    assert fingerprint(auto) == fingerprint(settings_with(image_root, model={"device": "cuda:1"}))
    assert fingerprint(auto) == fingerprint(settings_with(image_root, model={"device": "auto"}, run={"threads": 4}))
    assert "run.threads" in resolve(auto, KEY, WEIGHTS).run.describe()  # still recorded, only not identity


# ---------------------------------------------------------------- in: what can change the records


def test_on_the_cpu_the_thread_count_stays_in(image_root):
    """At ViT-B/16 over 200 classes, TPT's and DynaPrompt's entropies differ in their last bits between 1 and 2
    threads even under the CPU-kernel pins (reductions split by thread): the count is part of a CPU run."""
    assert fingerprint(settings_with(image_root)) != fingerprint(settings_with(image_root, run={"threads": 2}))


def test_the_device_type_and_precision_are_the_runs_identity(image_root, monkeypatch):
    cpu = resolve(settings_with(image_root, model={"device": "auto"}), KEY, WEIGHTS)
    bf16 = resolve(settings_with(image_root, model={"device": "cpu"}, tuning={"amp_on_cpu": True}), KEY, WEIGHTS)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = resolve(settings_with(image_root, model={"device": "auto"}), KEY, WEIGHTS)
    gpu_fp32 = resolve(settings_with(image_root, model={"device": "auto"}, tuning={"amp": False}), KEY, WEIGHTS)
    found = {(r.run.describe()["run.device"], r.run.describe()["run.precision"]) for r in (cpu, bf16, gpu, gpu_fp32)}
    assert found == {("cpu", "fp32"), ("cpu", "bf16-autocast"), ("cuda", "fp16-autocast"), ("cuda", "fp32")}
    assert len({r.fingerprint for r in (cpu, bf16, gpu, gpu_fp32)}) == 4  # a GPU result is never reused on a CPU


def test_a_run_resolved_for_one_device_does_not_run_on_another(image_root, clip, fake_gpu):
    on_gpu = resolve(settings_with(image_root, model={"device": "auto"}), KEY, clip.weights)
    with pytest.raises(RunFailed, match="resolved for cuda but the model is on cpu"):
        execute(on_gpu, clip)


def test_the_summary_says_where_and_in_what_precision_it_ran(image_root, clip):
    settings = settings_with(image_root)
    result = execute(resolve(settings, RunKey("toy", "tpt", "shuffle-0"), clip.weights), clip, limit=2)
    assert result.summary.settings["run.device"] == "cpu" and result.summary.settings["run.precision"] == "fp32"


def test_the_token_budget_stays_in_because_a_chunked_step_gives_other_last_bits(clip, image_root):
    """Budgets that never chunk give the same records bit for bit; a budget that chunks the gradient pass gives the
    same predictions but other last bits: its backward runs over fewer sequences at a time (the forward is
    bit-identical) and sums each prompt's gradient over the chunks. Should this test fail because chunked records
    became bit-identical, `run.max_text_tokens` can leave the fingerprint (dynaprompt.provenance)."""
    names = [f"class {i} thing" for i in range(40)]
    samples = dict(zip([f"s{i}" for i in range(8)], random_view_features(8, seed=6)))
    ids, labels = list(samples), {s: i % 40 for i, s in enumerate(samples)}
    length = PromptTextEncoder(clip.model, clip.tokenizer, names).sequence_length

    def records(kind, config, budget):
        text = PromptTextEncoder(clip.model, clip.tokenizer, names, max_tokens=budget)
        return run_stream(build_method(kind, text, TuningConfig(lr=0.05), config), ids, labels, samples.__getitem__)

    for kind, config in (("tpt", None), ("online_tpt", None), ("dynaprompt", DynaPromptConfig(buffer_size=3))):
        unbounded, roomy, chunked = (records(kind, config, budget) for budget in (0, 8192, 9 * length))
        assert records_equal(unbounded, roomy), kind  # 40 classes x 3 prompts fit 8192 tokens: one pass
        assert (chunked["pred"] == unbounded["pred"]).all(), kind
        assert not records_equal(chunked, unbounded), kind
    whole, chunks = (PromptTextEncoder(clip.model, clip.tokenizer, names, max_tokens=b) for b in (0, 9 * length))
    with torch.no_grad():  # the forward alone is bit-identical, chunked or not
        contexts = whole.init_context.expand(3, -1, -1)
        assert torch.equal(whole.encode(contexts), chunks.encode(contexts))
    settings = settings_with(image_root)
    assert fingerprint(settings) != fingerprint(replace(settings, run=replace(settings.run, max_text_tokens=64)))
