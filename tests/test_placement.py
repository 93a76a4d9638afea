"""One GPU per worker, tested without a GPU: the node's device count is faked through CUDA_VISIBLE_DEVICES (which
dask-cuda's counting and torch both honour), and the wiring is checked where it is decided."""
import multiprocessing
import os
import time

import pytest
import torch
from prefect import task

from dynaprompt import devices
from dynaprompt.devices import describe_device, device_line, visible_devices
from dynaprompt.specs import ModelSpec, SweepConfig
from tasks import gpu
from tasks.gpu import dask_runner, device_of_slot, node_gpu_count, pin_worker, process_runner, worker_slot


@pytest.fixture
def four_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")


def test_slots_fill_each_gpu_in_turn(four_gpus):
    assert node_gpu_count() == 4
    assert [device_of_slot(s, 2, 4) for s in range(8)] == ["0", "0", "1", "1", "2", "2", "3", "3"]
    assert [device_of_slot(s, 1, 4) for s in range(4)] == ["0", "1", "2", "3"]


def test_slots_name_the_nodes_own_identifiers(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")  # a scheduler gave this job GPUs 5 and 7 of the node
    assert [device_of_slot(s, 1, 2) for s in range(2)] == ["5", "7"]


def test_the_worker_initializer_claims_the_next_slot(four_gpus, monkeypatch):
    counter = multiprocessing.get_context("spawn").Value("i", 0)
    seen = []
    monkeypatch.setattr(devices, "_pinned", None)
    monkeypatch.setattr(gpu, "_slot", None)
    for _ in range(8):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")  # each worker starts with the node's list
        pin_worker(counter, 2, 4)
        seen.append((worker_slot(), os.environ["CUDA_VISIBLE_DEVICES"], devices.visible_devices()))
    assert seen == [(s, str(s // 2), [str(s // 2)]) for s in range(8)]


def test_the_process_runner_starts_gpus_times_workers_per_gpu_pinned_workers(four_gpus):
    runner = process_runner(SweepConfig(workers=2, workers_per_gpu=3), ModelSpec(device="auto"))
    assert runner._max_workers == 12 and runner._initializer is pin_worker
    assert runner._initargs[1:] == (3, 4)


@pytest.mark.parametrize("device", ["cpu", "cuda:1"])
def test_cpu_or_one_named_device_is_not_spread(four_gpus, device):
    runner = process_runner(SweepConfig(workers=2, workers_per_gpu=3), ModelSpec(device=device))
    assert runner._max_workers == 2 and runner._initializer is None


def test_without_gpus_the_process_runner_is_the_cpu_pool(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert node_gpu_count() in (0, 1)  # an empty list: dask-cuda counts one empty entry
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    if torch.cuda.is_available():
        pytest.skip("a real GPU is visible")
    runner = process_runner(SweepConfig(workers=2), ModelSpec(device="auto"))
    assert runner._max_workers == 2 and runner._initializer is None


def test_dask_on_a_gpu_node_is_dask_cudas_local_cluster(four_gpus):
    from dask_cuda import LocalCUDACluster

    runner = dask_runner(SweepConfig(workers_per_gpu=2), ModelSpec(device="auto"))
    assert runner.resolved_cluster_class is LocalCUDACluster
    assert runner.cluster_kwargs["threads_per_worker"] == 2
    assert "n_workers" not in runner.cluster_kwargs  # dask-cuda starts one worker per visible GPU itself


def test_dask_with_an_address_joins_that_cluster_and_on_cpu_is_a_local_cluster(four_gpus):
    assert dask_runner(SweepConfig(), ModelSpec(device="auto"), "tcp://head:8786").address == "tcp://head:8786"
    local = dask_runner(SweepConfig(workers=3), ModelSpec(device="cpu"))
    assert local.cluster_class is None and local.cluster_kwargs["n_workers"] == 3


def test_a_cpu_run_describes_its_device():
    info = describe_device(torch.device("cpu"))
    assert info["type"] == "cpu" and info["threads"] == torch.get_num_threads() and info["capability"]
    assert device_line(info).startswith("on cpu (")


def test_visible_devices_follow_the_environment(four_gpus, monkeypatch):
    monkeypatch.setattr(devices, "_pinned", None)
    assert visible_devices() == ["0", "1", "2", "3"]


@task
def where_am_i() -> tuple:
    time.sleep(6)  # long enough that the pool's other workers start and take the rest
    return worker_slot(), devices.pinned_device(), os.getpid()


@pytest.mark.slow
def test_each_worker_process_sees_only_its_own_gpu(prefect_server, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    runner = process_runner(SweepConfig(workers_per_gpu=2), ModelSpec(device="auto"))
    with runner:
        found = [future.result() for future in [runner.submit(where_am_i, {}) for _ in range(4)]]
    slot_of = {pid: slot for slot, _, pid in found}
    assert len(slot_of) >= 3 and len(set(slot_of.values())) == len(slot_of)  # one slot per worker process
    assert all(gpu == {0: "3", 1: "3", 2: "5", 3: "5"}[slot] for slot, gpu, _ in found)
