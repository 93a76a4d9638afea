"""TTL: LoRA adapters in a private copy of the image tower, one weighted-entropy step over all views, per sample.

The loss is checked by hand on chosen logits; the step by central differences of a plain-Python loss through the
adapted tower (a first AdamW step from B = 0 moves each B coordinate by about -lr * sign(g), and A, which gets no
gradient while B = 0, only by the weight decay); the untuned tower against the embed stage's cache, bit for bit.
"""
from __future__ import annotations

import io
import math

import pytest
import torch
import yaml

from dynaprompt.checkpoint import RunCheckpoint
from dynaprompt.config import load_settings, settings_from_params
from dynaprompt.features import ViewEncoder, ViewPixelSource, cache_identity
from dynaprompt.methods import METHODS, build_method
from dynaprompt.methods.ttl import TTL, Config, weighted_entropy_loss
from dynaprompt.objectives import TuningConfig
from dynaprompt.resolve import resolve, resolve_run
from dynaprompt.results import RunKey
from dynaprompt.runner import build_text_encoder, execute, feature_store, open_stream, run_stream
from dynaprompt.views import ViewConfig, ViewGenerator

from .conftest import ROOT, make_params

LAYERS = Config(layers=(1, 2, 3))  # the tiny tower's last three blocks, as 9-11 are ViT-B/16's


def pixel_samples(n: int, n_views: int = 8, seed: int = 0) -> list[torch.Tensor]:
    """Normalised-looking view tensors [n_views, 3, 32, 32]: a per-sample pattern plus per-view noise."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        base = torch.randn(3, 32, 32, generator=generator)
        out.append(base + 0.5 * torch.randn(n_views, 3, 32, 32, generator=generator))
    return out


def entropy_of(row) -> float:
    top = max(row)
    e = [math.exp(x - top) for x in row]
    return -sum(x / sum(e) * math.log(x / sum(e)) for x in e)


def test_weighted_entropy_by_hand():
    rows = [[2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, -1.0]]
    h = [entropy_of(r) for r in rows]
    logits = torch.tensor(rows, requires_grad=True)
    loss = weighted_entropy_loss(logits, 0.4, math.log(1000))
    assert loss.item() == pytest.approx(sum(x / math.exp(x - 0.4) for x in h) / 3, rel=1e-6)
    # the weight is detached: d loss / d z_vj = coeff_v / n * dH_v/dz_vj, with dH/dz_j = -p_j (log p_j + H)
    loss.backward()
    for v, row in enumerate(rows):
        p = [math.exp(x) / sum(math.exp(y) for y in row) for x in row]
        want = [math.exp(0.4 - h[v]) / 3 * -p[j] * (math.log(p[j]) + h[v]) for j in range(3)]
        assert logits.grad[v].tolist() == pytest.approx(want, abs=1e-6)
    # views above the entropy bound are dropped (deyo.py:L107); none left: no step
    kept = weighted_entropy_loss(torch.tensor(rows), 0.4, math.log(3) - 1e-3)
    assert float(kept) == pytest.approx((h[0] / math.exp(h[0] - 0.4) + h[2] / math.exp(h[2] - 0.4)) / 2, rel=1e-6)
    assert weighted_entropy_loss(torch.tensor(rows), 0.4, 0.1) is None


def test_the_update_is_lora_on_query_and_value_rows(text):
    method = TTL(text, TuningConfig(), Config(layers=(2,), rank=4, alpha=8.0))
    attn = method.visual.transformer.resblocks[2].attn
    adapter = method.adapters[0]
    with torch.no_grad():
        adapter.b_q.normal_()
        adapter.b_v.normal_()
    width = attn.in_proj_weight.shape[1]
    original = text.model.visual.transformer.resblocks[2].attn.in_proj_weight
    x = torch.randn(5, width)
    out = torch.nn.functional.linear(x, attn.in_proj_weight)
    base = torch.nn.functional.linear(x, original)
    # x W^T + (alpha / r) (x A) B on the query and value rows; the key rows untouched
    assert torch.allclose(out[:, :width], base[:, :width] + 2.0 * (x @ adapter.a_q) @ adapter.b_q, atol=1e-4)
    assert torch.equal(out[:, width : 2 * width], base[:, width : 2 * width])
    assert torch.allclose(out[:, 2 * width :], base[:, 2 * width :] + 2.0 * (x @ adapter.a_v) @ adapter.b_v, atol=1e-4)
    # A ~ Xavier normal: std sqrt(2 / (width + r)); B starts at zero, and reset() restores both
    assert adapter.a_q_init.std().item() == pytest.approx(math.sqrt(2 / (width + 4)), rel=0.15)
    adapter.reset()
    assert torch.equal(adapter.b_q, torch.zeros_like(adapter.b_q)) and torch.equal(adapter.a_q, adapter.a_q_init)
    assert not any(hasattr(b.attn, "parametrizations") for b in text.model.visual.transformer.resblocks)


def test_one_step_by_central_differences(text):
    lr = 1e-3
    method = TTL(text, TuningConfig(lr=lr), LAYERS)
    pixels = pixel_samples(1, n_views=6, seed=1)[0]
    def logits() -> list[list[float]]:
        with torch.no_grad():
            features = torch.nn.functional.normalize(method.visual(pixels), dim=-1)
            return (method.scale * features @ method.text_features[0].t()).tolist()

    coeff = [math.exp(0.4 - entropy_of(row)) for row in logits()]  # the detached weights, at B = 0

    def loss_at(adapter, name, i, j, delta) -> float:
        matrix = getattr(adapter, name)
        with torch.no_grad():
            matrix[i, j] += delta
        rows = logits()
        with torch.no_grad():
            matrix[i, j] -= delta
        return sum(c * entropy_of(r) for c, r in zip(coeff, rows)) / len(rows)

    coordinates = [(a, name, i, j) for a in range(3) for name in ("b_q", "b_v") for i, j in ((0, 5), (3, 77), (9, 120))]
    gradients = {}
    for a, name, i, j in coordinates:
        adapter, h = method.adapters[a], 1e-2
        gradients[(a, name, i, j)] = (loss_at(adapter, name, i, j, h) - loss_at(adapter, name, i, j, -h)) / (2 * h)
    a_before = [adapter.a_q.detach().clone() for adapter in method.adapters]
    method.adapt(pixels)
    clear = {k: g for k, g in gradients.items() if abs(g) > 1e-4}
    assert len(clear) >= 6
    for (a, name, i, j), g in clear.items():
        assert getattr(method.adapters[a], name)[i, j].item() == pytest.approx(-lr * math.copysign(1, g), rel=1e-3)
    for adapter, before in zip(method.adapters, a_before):  # no gradient reaches A while B = 0: only the decay
        assert torch.equal(adapter.a_q.detach(), before * (1 - lr * 0.01))


def test_squared_steps_as_the_authors_loops_do(text):
    pixels = pixel_samples(1, seed=2)[0]
    counts = {}
    for squared, steps in ((True, 2), (False, 2), (True, 1)):
        method = TTL(text, TuningConfig(lr=1e-3, steps=steps), Config(layers=(3,), squared_steps=squared))
        calls = []
        method.scaler.step = lambda optimizer, calls=calls: calls.append(1) or optimizer.step()
        method.adapt(pixels)
        counts[(squared, steps)] = len(calls)
    assert counts == {(True, 2): 4, (False, 2): 2, (True, 1): 1}


def cache_params(tmp_path, image_root, methods) -> dict:
    params = make_params(image_root)
    params["paths"] = {"results": str(tmp_path / "results"), "features": str(tmp_path / "features"),
                       "prepared": str(tmp_path / "prepared")}
    params["methods"] = methods
    return params


def test_untuned_the_features_are_the_cache_rows_and_the_records_zero_shots(tmp_path, image_root, clip):
    params = cache_params(tmp_path, image_root, {"zero_shot": {"kind": "zero_shot"},
                                                 "ttl": {"kind": "ttl", "layers": [1, 2, 3], "tuning": {"lr": 0.0}}})
    params["run"] = {"block_size": 4, "last_bit": False}  # zero-shot reads the cache as it is (no seed control)
    settings = settings_from_params(params)
    data = open_stream(settings, "toy")
    views = resolve_run(settings, "toy", "ttl").views
    store = feature_store(settings, "toy", views)
    store.build(data, ViewEncoder(clip, views), data.manifest["sample_id"].tolist(),
                cache_identity(clip, settings.model.arch, views))
    cached = store.open("cpu")
    run = resolve_run(settings, "toy", "ttl")
    method = build_method("ttl", build_text_encoder(clip, data.classnames, settings), run.tuning, run.options)
    pixels = ViewPixelSource(data, ViewGenerator(views, clip.image_size, clip.image_mean, clip.image_std))
    for sample_id in data.manifest["sample_id"]:
        method(pixels(sample_id))  # a zero step: the adapters stay at B = 0
        assert torch.equal(method.encode(pixels(sample_id)), cached(sample_id))
    ttl = execute(resolve(settings, RunKey("toy", "ttl", "natural"), clip.weights), clip).records
    zero_shot = execute(resolve(settings, RunKey("toy", "zero_shot", "natural"), clip.weights), clip).records
    columns = ["sample_id", "pred", "entropy_before", "entropy_after"]
    assert ttl[columns].equals(zero_shot[columns])
    assert resolve_run(settings, "toy", "ttl").options.feature_dtype == settings.embed.dtype


def test_a_step_changes_the_prediction_and_leaves_the_shared_model_alone(text):
    pixels = pixel_samples(6, seed=3)
    before = [text.model.encode_image(p, normalize=True) for p in pixels]
    method = TTL(text, TuningConfig(lr=0.5), LAYERS)
    outcomes = [method(p) for p in pixels]
    assert any(o.entropy_after != o.entropy_before for o in outcomes)
    assert all((o.selected, o.appended, o.deleted, o.buffer_size) == ([], [], [], 0) for o in outcomes)
    assert all(torch.equal(text.model.encode_image(p, normalize=True), b) for p, b in zip(pixels, before))


def stream_records(method, samples, order):
    ids = [f"s{i}" for i in order]
    source = {f"s{i}": samples[i] for i in order}
    return run_stream(method, ids, {i: 0 for i in ids}, source.__getitem__).drop(columns=["seconds", "position"])


def test_orderings_and_repeats_change_nothing(text):
    samples = pixel_samples(4, seed=4)
    method = TTL(text, TuningConfig(lr=0.2), LAYERS)
    forward = stream_records(method, samples, [0, 1, 2, 3]).set_index("sample_id")
    backward = stream_records(method, samples, [3, 2, 1, 0]).set_index("sample_id").loc[forward.index]
    assert forward.equals(backward)
    assert method(samples[1]) == method(samples[1])  # the adapters are reset: a repeat is the same sample
    assert METHODS["ttl"].order_independent and METHODS["ttl"].reads_images and not METHODS["ttl"].uses_templates


@pytest.mark.parametrize("amp_on_cpu", [False, True])
def test_state_dict_resumes_a_stream_bit_for_bit(text, amp_on_cpu):
    tuning = TuningConfig(lr=0.2, amp_on_cpu=amp_on_cpu)
    samples = pixel_samples(5, seed=5)
    whole = TTL(text, tuning, LAYERS)
    [whole(s) for s in samples[:2]]
    buffer = io.BytesIO()
    torch.save(whole.state_dict(), buffer)
    buffer.seek(0)
    resumed = TTL(text, tuning, LAYERS)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert [resumed(s) for s in samples[2:]] == [whole(s) for s in samples[2:]]


def test_a_run_killed_between_checkpoints_resumes_with_identical_records(text, tmp_path):
    samples = dict(zip([f"s{i}" for i in range(7)], pixel_samples(7, seed=6)))
    ids, labels = list(samples), {s: i % 3 for i, s in enumerate(samples)}
    whole = run_stream(TTL(text, TuningConfig(lr=0.2), LAYERS), ids, labels, samples.__getitem__)

    def dies_after(limit):
        seen = []

        def source(sample_id):
            if len(seen) == limit:
                raise KeyboardInterrupt
            seen.append(sample_id)
            return samples[sample_id]
        return source

    with pytest.raises(KeyboardInterrupt):
        run_stream(TTL(text, TuningConfig(lr=0.2), LAYERS), ids, labels, dies_after(5),
                   checkpoint=RunCheckpoint(tmp_path / "c", "fp", every=3))
    resumed = run_stream(TTL(text, TuningConfig(lr=0.2), LAYERS), ids, labels, samples.__getitem__,
                         checkpoint=RunCheckpoint(tmp_path / "c", "fp", every=3))
    assert resumed.drop(columns="seconds").equals(whole.drop(columns="seconds"))


def test_blocks_the_tower_lacks_are_one_clear_error(text):
    with pytest.raises(ValueError, match=r"ttl layers \[9, 10, 11\]: the image tower has blocks 0..3"):
        TTL(text, TuningConfig(), Config())


def test_params_run_it_on_the_bundled_tower_at_the_authors_step():
    settings = load_settings(ROOT / "params.yaml")
    run = resolve_run(settings, "fmnist-gaussian_noise-3", "ttl")
    assert run.options.layers == (1, 2, 3) and run.options.rank == 16 and run.options.alpha == 32.0
    assert run.tuning.lr == 5e-3 and run.tuning.steps == 1 and run.options.feature_dtype == "float16"
    paper = load_settings(ROOT / "configs" / "paper.yaml")
    for dataset in ("imagenet_a", "caltech101"):
        run = resolve_run(paper, dataset, "ttl")
        assert run.options.layers == (9, 10, 11) and run.tuning.lr == 5e-3
        assert run.views.augmix == (dataset == "caltech101")
    assert yaml.safe_load((ROOT / "params.yaml").read_text())["methods"]["ttl"]["kind"] == "ttl"


def test_views_for_images_come_from_the_caches_generator(image_root, clip, tmp_path):
    settings = settings_from_params(cache_params(tmp_path, image_root, {"ttl": {"kind": "ttl", "layers": [3]}}))
    data = open_stream(settings, "toy")
    views = ViewConfig(n_views=4, view_seed=2)
    pixels = ViewPixelSource(data, ViewGenerator(views, clip.image_size, clip.image_mean, clip.image_std))
    encoder = ViewEncoder(clip, views)
    first = data.manifest["sample_id"].iloc[0]
    assert torch.equal(encoder.encode(pixels(first)), encoder(data.load(first), first))
