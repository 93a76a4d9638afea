"""Shared fixtures: a tiny random-weight CLIP, a handful of images on disk, settings that point at them, and
Prefect servers for the sweep tests."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dynaprompt.config import settings_from_params
from dynaprompt.model import ModelSpec, load_clip
from dynaprompt.text import PromptTextEncoder

CLASSNAMES = ["t-shirt", "trouser", "ankle_boot"]
ROOT = Path(__file__).resolve().parent.parent


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


def three_sample_stream(method):
    """`method` over three fake samples of the tiny CLIP's width (labels 0, 1, 2), through run_stream: the records."""
    from dynaprompt.runner import run_stream

    samples = dict(zip("abc", random_view_features(3, n_views=10, dim=128, seed=0)))
    return run_stream(method, list(samples), {"a": 0, "b": 1, "c": 2}, samples.__getitem__)


def follow_memory(method, samples, stored=lambda snapshot: snapshot) -> list:
    """Each outcome's appended / deleted ids against the memory the method holds (`stored(snapshot)`: class ->
    [(id, ...)]) and its buffer_size; the outcomes, for what a test asks beyond that."""
    held: set[int] = set()
    outcomes = []
    for sample in samples:
        o = method(sample)
        assert set(o.deleted) <= held and not set(o.appended) & held
        held = (held - set(o.deleted)) | set(o.appended)
        assert {i for entries in stored(method.snapshot()).values() for i, *_ in entries} == held
        assert o.buffer_size == len(held)
        outcomes.append(o)
    return outcomes


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


def sweep_params(image_root, tmp_path, **sweep_overrides):
    """A params file for sweeps over two toy datasets and their mixture, results and MLflow under tmp_path."""
    params = make_params(image_root)
    params["views"] = {"n_views": 8, "view_seed": 0}
    params["datasets"] = {"toy-a": {"kind": "image_folder", "root": str(image_root)},
                          "toy-b": {"kind": "image_folder", "root": str(image_root)}}
    params["mixtures"] = {"toy-mix": {"members": ["toy-a", "toy-b"]}}
    params["methods"] = {"zero_shot": {"kind": "zero_shot"}, "tpt": {"kind": "tpt"},
                         "online_tpt": {"kind": "online_tpt"}, "dynaprompt": {"kind": "dynaprompt", "buffer_size": 3}}
    params["orderings"] = {"shuffle-0": {"kind": "shuffle", "seed": 0, "on": "datasets"},
                           "shuffle-1": {"kind": "shuffle", "seed": 1, "on": "datasets"},
                           "cyclic-0": {"kind": "cyclic", "block": 2, "seed": 0}}
    params["paths"] = {"results": str(tmp_path / "results"), "prepared": str(tmp_path / "prepared"),
                       "features": str(tmp_path / "features")}
    params["mlflow"] = {"db": str(tmp_path / "mlflow.db"), "artifacts": str(tmp_path / "mlartifacts"),
                        "experiment": "test"}
    params["sweep"] = {"runner": "thread", "workers": 2,
                       "schedule": {"name": "nightly", "cron": "15 2 * * *", "add_orderings": 1,
                                    "target_half_width": 0.0001}, **sweep_overrides}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def real_prefect_server(tmp_path_factory):
    """`prefect server start` on a free loopback port: Dask workers reach it instead of starting their own."""
    port = free_port()
    home = tmp_path_factory.mktemp("prefect-home")
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": ""}
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + 90
    import urllib.request

    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            time.sleep(1)
    else:
        os.killpg(server.pid, signal.SIGTERM)
        pytest.fail("prefect server did not start")
    yield url
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)


def run_cli(args, env_extra, timeout=600):
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


