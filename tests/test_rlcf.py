"""RLCF on hand-made samples: the CLIP reward, its baseline and the REINFORCE step, worked out with plain `math`.

The text side is a stub whose class features are normalise(e_c + ctx) in R^4, so that the one context token [1, 4]
gets a gradient; the policy's own features are the teacher's (tta-vlm's choice) unless a second CLIP is given. A
first AdamW step from v0 = 0 moves each coordinate by about -lr * sign(g); g is taken here by central differences of
a plain-Python loss in which, as in the authors' code, the sampled classes and their rewards are fixed.
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
import yaml

from dynaprompt.config import load_settings, settings_from_params
from dynaprompt.methods import METHODS, build_method
from dynaprompt.methods.rlcf import RLCF, Config, Teacher, clip_rewards
from dynaprompt.model import ModelSpec, load_clip
from dynaprompt.objectives import TuningConfig
from dynaprompt.resolve import resolve, resolve_run
from dynaprompt.results import RunKey
from dynaprompt.runner import RunFailed, execute, run_stream

from .conftest import ROOT, make_params, random_view_features
from .test_peers import dot, softmax, towards, vec

SCALE = 10.0
TUNING = TuningConfig(lr=0.1, confident_ratio=0.3, steps=1)  # 3 of 10 views
K2 = Config(sample_k=2)


class ShiftText:
    """Class features normalise(e_c + ctx) for C classes in R^4; v0 = 0, so they start at e_c."""

    def __init__(self, n_classes: int = 4, scale: float = SCALE):
        self.base = torch.eye(4)[:n_classes]
        self.init_context = torch.zeros(1, 4)
        self.n_classes = n_classes
        self.scale = scale

    def encode(self, contexts: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.base.unsqueeze(0) + contexts[:, :1, :], dim=-1)

    def encode_templates(self, templates) -> torch.Tensor:
        return F.normalize(self.base + 0.5 * torch.ones(4), dim=-1).unsqueeze(0)

    def logit_scale(self) -> torch.Tensor:
        return torch.tensor(self.scale)


def norm(u) -> list[float]:
    n = math.sqrt(dot(u, u))
    return [x / n for x in u]


# views: a mild view 0 on class 0; three sharp views between classes 1 and 2 (the confident ones); blurry others
BLUR = [0.5, 0.5, 0.5, 0.5]
SAMPLE = [towards(40), norm(vec(0, 1, 0.3)), norm(vec(0, 1, 0.6)), BLUR, norm(vec(0, 0.4, 1)), BLUR, BLUR, BLUR,
          BLUR, BLUR]


def views(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def policy_logits(view, ctx) -> list[float]:
    return [SCALE * dot(view, norm([e + c for e, c in zip(vec(*([0] * k + [1])), ctx)])) for k in range(4)]


def entropy(probs) -> float:
    return -sum(p * math.log(p) for p in probs if p > 0)


def confident(rows, k: int = 3):
    return sorted(rows, key=lambda v: entropy(softmax(policy_logits(v, [0.0] * 4))))[:k]


def rewards_by_hand(view, classes, weight: float = 2.5) -> list[float]:
    """2.5 max(cos(e_k, v), 0) for the sampled classes, less their mean (the teacher's text is v0 = e_k)."""
    raw = [max(weight * view[k] / math.sqrt(dot(view, view)), 0.0) for k in classes]
    return [r - sum(raw) / len(raw) for r in raw]


def top(values, k: int) -> list[int]:
    return sorted(range(len(values)), key=lambda c: -values[c])[:k]


def loss_by_hand(rows, ctx, k: int) -> float:
    """mean over views x K of reward * CE, with the classes and rewards of ctx = 0."""
    total, n = 0.0, 0
    for view in rows:
        classes = top(policy_logits(view, [0.0] * 4), k)
        for c, r in zip(classes, rewards_by_hand(view, classes)):
            total += r * -math.log(softmax(policy_logits(view, ctx))[c])
            n += 1
    return total / n


def test_clip_rewards_and_baselines_by_hand():
    text = torch.eye(4)
    images = F.normalize(torch.tensor([[3.0, 1.0, -1.0, 0.0], [0.0, 2.0, 1.0, 0.0]]), dim=-1)
    sampled = torch.tensor([[0, 1, 2], [1, 2, 3]])
    cos = [[3 / math.sqrt(11), 1 / math.sqrt(11), -1 / math.sqrt(11)], [2 / math.sqrt(5), 1 / math.sqrt(5), 0.0]]
    raw = [[max(2.5 * c, 0.0) for c in row] for row in cos]  # the negative cosine clamps to 0
    per_view = [r - sum(row) / 3 for row in raw for r in row]
    assert clip_rewards(text, images, sampled, Config()).tolist() == pytest.approx(per_view, abs=1e-6)
    flat = [r for row in raw for r in row]
    batch = [r - sum(flat) / 6 for r in flat]
    assert clip_rewards(text, images, sampled, Config(process_batch=True)).tolist() == pytest.approx(batch, abs=1e-6)
    assert clip_rewards(text, images, sampled, Config(reward_process=False)).tolist() == pytest.approx(flat, abs=1e-6)
    std = [math.sqrt(sum((r - sum(row) / 3) ** 2 for r in row) / 2) + 1e-5 for row in raw]  # torch.std: unbiased
    amplified = [(r - sum(row) / 3) / s for row, s in zip(raw, std) for r in row]
    assert clip_rewards(text, images, sampled, Config(reward_amplify=True)).tolist() == pytest.approx(amplified,
                                                                                                        abs=1e-5)


def test_one_reinforce_step_by_hand():
    method = RLCF(ShiftText(), TUNING, K2)
    chosen, h = confident(SAMPLE), 1e-6
    assert BLUR not in chosen and SAMPLE[0] not in chosen

    def g(j):
        up, down = [0.0] * 4, [0.0] * 4
        up[j], down[j] = h, -h
        return (loss_by_hand(chosen, up, 2) - loss_by_hand(chosen, down, 2)) / (2 * h)

    expected = [0.0 if abs(g(j)) < 1e-9 else -0.1 * math.copysign(1.0, g(j)) for j in range(4)]
    assert any(expected)
    tuned = method.tune(views(SAMPLE), None)[0, 0]
    assert tuned.tolist() == pytest.approx(expected, abs=1e-5)
    o = method(views(SAMPLE))
    before, after = policy_logits(SAMPLE[0], [0.0] * 4), policy_logits(SAMPLE[0], expected)
    assert o.pred == top(after, 1)[0]
    assert o.entropy_before == pytest.approx(entropy(softmax(before)), rel=1e-5)
    assert o.entropy_after == pytest.approx(entropy(softmax(after)), rel=1e-4)
    assert (o.selected, o.appended, o.deleted, o.buffer_size) == ([0], [], [], 1)


def test_with_v0_as_the_teacher_the_first_rewards_rank_as_the_policy_does():
    for view in confident(SAMPLE):
        classes = top(policy_logits(view, [0.0] * 4), 3)
        rewards = rewards_by_hand(view, classes)
        assert rewards == sorted(rewards, reverse=True)  # the top class gets the largest reward, and so on


def test_only_the_confident_views_reach_the_reward():
    method = RLCF(ShiftText(), TUNING, K2)
    base = method.tune(views(SAMPLE), None)
    other = list(SAMPLE)
    other[5] = norm(vec(0.6, 0.5, 0.5))  # still blurrier than the three sharp views
    assert torch.equal(method.tune(views(other), None), base)
    other[5] = norm(vec(0, 0, 1))  # sharper: it takes a place among the confident views
    assert not torch.equal(method.tune(views(other), None), base)


def test_the_views_are_chosen_once_and_the_teacher_reads_them_once():
    method = RLCF(ShiftText(), replace(TUNING, steps=3), K2)
    calls = []
    original = method.teacher_image_features
    method.teacher_image_features = lambda *a: calls.append(a[2].tolist()) or original(*a)
    method.tune(views(SAMPLE), None)
    assert len(calls) == 1 and sorted(calls[0]) == [1, 2, 4]


def test_templates_are_the_self_teachers_text():
    method = RLCF(ShiftText(), TUNING, K2, templates=["a {}."])
    assert torch.allclose(method.teacher_text, F.normalize(torch.eye(4) + 0.5, dim=-1))
    assert torch.allclose(RLCF(ShiftText(), TUNING, K2).teacher_text, torch.eye(4))


def stream_records(method, samples, order):
    ids = [f"s{i}" for i in order]
    source = {f"s{i}": samples[i] for i in order}
    return run_stream(method, ids, {i: 0 for i in ids}, source.__getitem__).drop(columns=["seconds", "position"])


def test_orderings_and_repeats_change_nothing(text):
    samples = random_view_features(5, n_views=20, dim=128, seed=3)
    method = RLCF(text, TuningConfig(lr=0.05, steps=3), Config())
    forward = stream_records(method, samples, [0, 1, 2, 3, 4]).set_index("sample_id")
    backward = stream_records(method, samples, [4, 3, 2, 1, 0]).set_index("sample_id").loc[forward.index]
    assert forward.equals(backward)
    assert method(samples[2]) == method(samples[2])
    assert METHODS["rlcf"].order_independent and METHODS["rlcf"].uses_templates


@pytest.mark.parametrize("amp_on_cpu", [False, True])
def test_state_dict_resumes_a_stream_bit_for_bit(text, amp_on_cpu):
    tuning = TuningConfig(lr=0.05, steps=3, amp_on_cpu=amp_on_cpu)
    samples = random_view_features(6, n_views=20, dim=128, seed=5)
    whole = RLCF(text, tuning, Config())
    [whole(s) for s in samples[:3]]
    buffer = io.BytesIO()
    torch.save(whole.state_dict(), buffer)
    buffer.seek(0)
    resumed = RLCF(text, tuning, Config())
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert [resumed(s) for s in samples[3:]] == [whole(s) for s in samples[3:]]
    assert bool(whole.state_dict()["scaler"]) == amp_on_cpu


def test_runs_on_the_tiny_clip_and_moves_the_prompt(text):
    samples = random_view_features(4, n_views=20, dim=128, seed=0)
    method = build_method("rlcf", text, TuningConfig(lr=0.05, steps=3), templates=["a photo of a {}.", "a {}."])
    records = run_stream(method, list("abcd"), {c: 0 for c in "abcd"}, dict(zip("abcd", samples)).__getitem__)
    assert (records["entropy_after"] != records["entropy_before"]).all() and (records["buffer_size"] == 1).all()


def larger_teacher(tmp_path, image_size: int = 48):
    """A random-weight CLIP wider and at another resolution than the tiny policy, as a JSON model config."""
    config = {"embed_dim": 96, "vision_cfg": {"image_size": image_size, "layers": 2, "width": 192, "head_width": 32,
                                              "mlp_ratio": 2, "patch_size": 16},
              "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 96, "heads": 3, "layers": 2}}
    path = tmp_path / "teacher.json"
    path.write_text(json.dumps(config))
    return path


def test_a_second_clip_reads_the_selected_views_pixels(text, clip, tmp_path):
    teacher = load_clip(ModelSpec(arch=str(larger_teacher(tmp_path)), pretrained=None, init_seed=1, device="cpu"))
    tuning = TuningConfig(lr=0.05, steps=2, confident_ratio=0.25)
    config = Config(teacher=Teacher(arch="teacher.json"))
    method = RLCF(text, tuning, config, teacher=teacher)
    assert method.reads_images
    prompts = clip.tokenizer([f"a photo of a {name}." for name in text.classnames])
    want = F.normalize(teacher.model.encode_text(prompts), dim=-1)  # the teacher reads the policy's prompts
    assert torch.allclose(method.teacher_text, want, atol=1e-6)
    pixels = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    features = method.view_features(pixels)  # the policy's own view features, as the embed stage rounds them
    assert torch.equal(features, clip.model.encode_image(pixels, normalize=True).to(torch.float16).float())
    keep = torch.tensor([1, 4])
    resized = F.interpolate(pixels[keep], size=48, mode="bicubic", align_corners=True)
    assert torch.allclose(method.teacher_image_features(features, pixels, keep),
                          F.normalize(teacher.model.encode_image(resized), dim=-1), atol=1e-6)
    o = method(pixels)
    assert o.entropy_after != o.entropy_before
    with pytest.raises(ValueError, match="teacher.arch is 'teacher.json' but no teacher CLIP was given"):
        RLCF(text, tuning, config)


def runner_params(tmp_path, image_root, teacher: dict) -> dict:
    params = make_params(image_root)
    params["paths"] = {"results": str(tmp_path / "results"), "features": str(tmp_path / "features"),
                       "prepared": str(tmp_path / "prepared")}
    params["views"] = {"n_views": 8, "view_seed": 0}
    params["methods"] = {"rlcf": {"kind": "rlcf", "teacher": teacher, "tuning": {"steps": 2}}}
    return params


def test_the_runner_loads_the_teacher_from_the_params_folder(tmp_path, image_root, clip, monkeypatch):
    larger_teacher(tmp_path)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(runner_params(tmp_path, image_root, {"arch": "teacher.json", "init_seed": 1})))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a relative teacher path is the params file's, not the working directory's
    settings = load_settings(path)
    result = execute(resolve(settings, RunKey("toy", "rlcf", "natural"), clip.weights), clip)
    assert len(result.records) == 12 and result.records["pred"].between(0, 2).all()
    assert result.summary.settings["method.teacher.arch"] == "teacher.json"


def test_a_teacher_that_normalises_otherwise_is_one_clear_error(tmp_path, image_root, clip, monkeypatch):
    larger_teacher(tmp_path)
    settings = settings_from_params(runner_params(tmp_path, image_root, {"arch": str(tmp_path / "teacher.json")}))
    import dynaprompt.runner as runner

    loaded = runner.load_clip
    monkeypatch.setattr(runner, "load_clip", lambda spec, base: replace(loaded(spec, base), image_mean=(0.5,) * 3))
    with pytest.raises(RunFailed, match=r"toy/rlcf/natural: methods.rlcf.teacher .* normalises images with mean"):
        execute(resolve(settings, RunKey("toy", "rlcf", "natural"), clip.weights), clip)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="sample_k 5 exceeds the 4 classes"):
        RLCF(ShiftText(), TUNING, Config(sample_k=5))
    with pytest.raises(ValueError, match="teacher.pretrained is set but teacher.arch is null"):
        Teacher(pretrained="openai")


def test_params_and_the_paper_config_at_the_authors_constants():
    settings = load_settings(ROOT / "params.yaml")
    run = resolve_run(settings, "fmnist-gaussian_noise-3", "rlcf")
    assert (run.options.sample_k, run.options.clipscore_weight, run.options.teacher.arch) == (3, 2.5, None)
    assert (run.tuning.steps, run.tuning.weight_decay, run.tuning.lr) == (3, 5e-4, settings.tuning.lr)
    paper = load_settings(ROOT / "configs" / "paper.yaml")
    for dataset, steps in (("imagenet_a", 3), ("imagenet", 3), ("caltech101", 5)):
        run = resolve_run(paper, dataset, "rlcf")
        assert (run.tuning.lr, run.tuning.weight_decay, run.tuning.steps) == (7e-3, 5e-4, steps), dataset
        assert (run.options.teacher.arch, run.options.teacher.pretrained) == ("ViT-L-14", "openai")
        assert run.templates is None and run.views.augmix == (dataset == "caltech101")
