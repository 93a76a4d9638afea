"""Shared fixtures: a tiny random-weight CLIP, a handful of images on disk, settings that point at them."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dynaprompt.config import settings_from_params
from dynaprompt.model import ModelSpec, load_clip
from dynaprompt.text import PromptTextEncoder

CLASSNAMES = ["t-shirt", "trouser", "ankle_boot"]


@pytest.fixture(autouse=True)
def _single_thread():
    """Tests are small: one thread avoids oversubscription on 2-core CI machines."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def clip():
    return load_clip(ModelSpec(arch="tiny-clip", pretrained=None, init_seed=0, device="cpu"))


@pytest.fixture(scope="session")
def text(clip):
    return PromptTextEncoder(clip.model, clip.tokenizer, CLASSNAMES)


def random_view_features(n_samples: int, n_views: int = 16, dim: int = 128, seed: int = 0) -> list[torch.Tensor]:
    """Unit-norm fake image features, one [n_views, dim] tensor per sample."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_samples):
        base = torch.randn(1, dim, generator=generator)
        views = base + 0.7 * torch.randn(n_views, dim, generator=generator)
        out.append(torch.nn.functional.normalize(views, dim=-1))
    return out


@pytest.fixture(scope="session")
def image_root(tmp_path_factory):
    """3 classes x 4 images of 40x40 px with a class-dependent pattern."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for label, name in enumerate(CLASSNAMES):
        folder = root / name
        folder.mkdir()
        for k in range(4):
            pixels = rng.integers(0, 60, size=(40, 40, 3), dtype=np.uint8)
            pixels[:, label * 12 : label * 12 + 10] += 180
            Image.fromarray(pixels).save(folder / f"img{k}.png")
    return root


def make_params(image_root, **overrides) -> dict:
    params = {
        "model": {"arch": "tiny-clip", "pretrained": None, "device": "cpu"},
        "prompt": {"n_ctx": 4, "ctx_init": "a photo of a"},
        "views": {"n_views": 16, "view_seed": 0},
        "tuning": {"lr": 0.05},
        "run": {"block_size": 4},
        "datasets": {"toy": {"kind": "image_folder", "root": str(image_root)}},
        "methods": {
            "zero_shot": {"kind": "zero_shot"},
            "zero_shot_ensemble": {"kind": "zero_shot", "templates": "openai_imagenet"},
            "tpt": {"kind": "tpt"},
            "online_tpt": {"kind": "online_tpt"},
            "dynaprompt": {"kind": "dynaprompt", "buffer_size": 3},
            "dynaprompt_official": {"kind": "dynaprompt", "selection": "official", "buffer_size": 3},
            "zero": {"kind": "zero"},
        },
        "orderings": {
            "natural": {"kind": "natural"},
            "shuffle-0": {"kind": "shuffle", "seed": 0},
            "shuffle-1": {"kind": "shuffle", "seed": 1},
            "class_blocked-0": {"kind": "class_blocked", "seed": 0},
        },
    }
    for key, value in overrides.items():
        params[key] = value
    return params


@pytest.fixture
def settings(image_root):
    return settings_from_params(make_params(image_root))
