"""What a run and the embed loader say about the slow paths they take: views made on the fly (which cache, what is
missing), and the loader's shared memory bounded against /dev/shm (with a faked statvfs)."""
import json
import os
from dataclasses import replace

import pytest
import torch

from dynaprompt import features
from dynaprompt.config import settings_from_params
from dynaprompt.datasets import build_dataset
from dynaprompt.features import FeatureStore, ImageViewSource, LoaderPlan, ViewEncoder, cache_identity, plan_loader
from dynaprompt.resolve import resolve, resolve_run
from dynaprompt.results import RunKey
from dynaprompt.runner import execute, feature_store, open_stream

from .conftest import make_params

MiB, GiB = 2**20, 2**30


@pytest.fixture
def settings(image_root, tmp_path):
    params = make_params(image_root)
    params["paths"] = {"features": str(tmp_path / "features"), "results": str(tmp_path / "results"),
                       "prepared": str(tmp_path / "prepared")}
    return settings_from_params(params)


def on_the_fly_lines(out: str) -> list:
    return [line for line in out.splitlines() if "making views on the fly" in line]


def test_a_run_without_its_cache_says_so_once_naming_the_cache(settings, clip, capsys):
    execute(resolve(settings, RunKey("toy", "online_tpt", "shuffle-0"), clip.weights), clip, limit=3)
    store = feature_store(settings, "toy", resolve_run(settings, "toy", "online_tpt").views)
    assert on_the_fly_lines(capsys.readouterr().out) == [
        f"toy: feature cache {store.folder} is missing: making views on the fly on cpu; run `dvc repro embed@toy` "
        "first"]


def test_an_incomplete_cache_is_named_with_what_it_holds_and_a_complete_one_is_silent(settings, clip, capsys):
    views = resolve_run(settings, "toy", "online_tpt").views
    store, data = feature_store(settings, "toy", views), open_stream(settings, "toy")
    store.build(data, ViewEncoder(clip, views), data.manifest["sample_id"].tolist(),
                cache_identity(clip, settings.model.arch, views), chunk_size=5)
    run = resolve(settings, RunKey("toy", "online_tpt", "shuffle-0"), clip.weights)
    capsys.readouterr()
    execute(run, clip, limit=2)
    assert on_the_fly_lines(capsys.readouterr().out) == []
    meta = store.read_meta()
    store.write_meta({**meta, "chunks_done": [0, 2], "complete": False})  # as an embed killed mid-way leaves it
    execute(run, clip, limit=2)
    assert on_the_fly_lines(capsys.readouterr().out) == [
        f"toy: feature cache {store.folder} is incomplete (7 of 12 samples): making views on the fly on cpu; run "
        "`dvc repro embed@toy` first"]


def test_the_loader_plan_fits_the_batches_in_flight_into_shared_memory():
    batch = 617 * MiB  # 16 samples x 64 views of 224 px in fp32: the paper's embed batch
    assert plan_loader(8, 4, batch, 64 * GiB, 0.5) == LoaderPlan(8, 4)  # 19.3 GiB fit into half of 64 GiB
    lowered = plan_loader(8, 4, batch, 24 * GiB, 0.5)  # 12 GiB: 19 batches, 2 per worker
    assert (lowered.workers, lowered.prefetch) == (8, 2)
    assert lowered.note == ("8 loader workers x prefetch 4 x 617 MiB per batch = 19.28 GiB of shared memory, but "
                            "/dev/shm has 24.00 GiB free (at most 50% used): prefetch lowered to 2")
    fewer = plan_loader(8, 4, batch, 4 * GiB, 0.5)  # 2 GiB: 3 batches
    assert (fewer.workers, fewer.prefetch) == (3, 1) and fewer.note.endswith("3 loader worker(s) with prefetch 1")
    none = plan_loader(8, 4, batch, 64 * MiB, 0.5)  # a container's default /dev/shm
    assert none.workers == 0 and "no loader workers: the main process makes the views" in none.note
    assert plan_loader(0, 4, batch, 0, 0.5) == LoaderPlan(0, 4)  # no workers, no shared memory


def test_the_embed_loader_bounds_its_shared_memory_and_keeps_the_features(tmp_path, image_root, clip, monkeypatch,
                                                                          capsys):
    class TinyShm:  # 1 MiB of /dev/shm: not even one batch of features fits
        f_bavail, f_frsize = 256, 4096

    monkeypatch.setattr(features.os, "statvfs", lambda path: TinyShm if path == "/dev/shm" else os.statvfs(path))
    monkeypatch.setattr(features.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    toy = build_dataset("toy", "image_folder", {"root": str(image_root)})
    views = resolve_run(settings_from_params(make_params(image_root)), "toy", "tpt").views
    views = replace(views, n_views=512)  # 8 samples x 512 views x 128 x 4 B = 2 MiB a batch
    store = FeatureStore.for_views(tmp_path / "f", views)
    ids = toy.manifest["sample_id"].tolist()
    store.build(toy, ViewEncoder(clip, views), ids, cache_identity(clip, "tiny-clip", views), workers=2)
    out = capsys.readouterr().out
    assert (f"embed {store.folder}: 2 loader workers x prefetch 4 x 2 MiB per batch = 0.02 GiB of shared memory, "
            "but /dev/shm has 0.00 GiB free (at most 50% used): no loader workers") in out
    serial = ImageViewSource(toy, ViewEncoder(clip, views))
    cached = store.open("cpu", cache_identity(clip, "tiny-clip", views))
    assert torch.equal(cached(ids[3]), serial(ids[3]))
    assert json.loads(store.meta_file.read_text())["complete"]
