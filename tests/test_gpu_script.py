"""benchmarks/gpu.sh: the carried wheels' bootstrap, each part guarded under its budget, and every part at the tiny
size on this CPU (what a GPU owner runs, with `--device cpu --quick`)."""
import importlib.metadata
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from benchmarks import gpu, memory

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHON": sys.executable}

FAKE_PYTHON = """#!/usr/bin/env bash
# a python where open_clip imports only once the wheels are installed; it logs how gpu.sh calls it
echo "$* | PYTHONPATH=${PYTHONPATH:-}" >> "$LOG"
case "$*" in
  "-c import open_clip") [ -f "$INSTALLED" ] ;;
  "-m pip install"*) touch "$INSTALLED" ;;
  *) exit 0 ;;
esac
"""


def run_script(args, env, **kwargs):
    return subprocess.run(["bash", "benchmarks/gpu.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          **kwargs)


@pytest.fixture
def fake_python(tmp_path):
    path = tmp_path / "python"
    path.write_text(FAKE_PYTHON)
    path.chmod(0o755)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name in ("open_clip_torch-3.3.0-py3-none-any.whl", "ftfy-6.3.1-py3-none-any.whl"):
        (wheels / name).write_bytes(b"")
    env = {**ENV, "PYTHON": str(path), "LOG": str(tmp_path / "calls.log"), "INSTALLED": str(tmp_path / "installed")}
    return env, wheels, tmp_path / "calls.log"


def test_where_open_clip_is_missing_the_wheels_go_into_the_target_without_their_deps(fake_python, tmp_path):
    env, wheels, log = fake_python
    target = tmp_path / "site"
    done = run_script(["--target", str(target), "--wheels", str(wheels), "--device", "cpu", "--quick"], env)
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    install = next(c for c in calls if c.startswith("-m pip install"))
    for flag in ("--no-index", "--no-deps", f"--target {target}"):
        assert flag in install
    assert f"{wheels}/ftfy-6.3.1-py3-none-any.whl" in install and "torch" not in install.replace("open_clip_torch", "")
    benchmark = calls[-1]  # the benchmark itself, with the target first on its path and the script's own flags gone
    assert benchmark.startswith("-m benchmarks.gpu --device cpu --quick |") and "--target" not in benchmark
    assert benchmark.split("PYTHONPATH=")[1].split(":")[0] == str(target)
    assert "2 wheels from" in done.stdout


def test_where_open_clip_imports_nothing_is_installed(fake_python, tmp_path):
    env, wheels, log = fake_python
    Path(env["INSTALLED"]).touch()
    done = run_script(["--target", str(tmp_path / "site"), "--wheels", str(wheels), "--device", "cpu"], env)
    assert done.returncode == 0, done.stderr
    assert not any(c.startswith("-m pip") for c in log.read_text().splitlines())


def test_without_open_clip_or_wheels_the_script_says_where_to_get_them(fake_python, tmp_path):
    env, _, _ = fake_python
    (tmp_path / "empty").mkdir()
    done = run_script(["--wheels", str(tmp_path / "empty"), "--device", "cpu"], env)
    assert done.returncode == 2
    assert "bin/device-wheels" in done.stderr and str(tmp_path / "empty") in done.stderr


def repack(distribution: str, folder: Path) -> Path:
    """An installed distribution made a wheel again (its files and its dist-info): wheels without a registry."""
    dist = importlib.metadata.distribution(distribution)
    root = Path(dist.locate_file("")).resolve()
    name = dist.metadata["Name"].replace("-", "_")
    wheel = folder / f"{name}-{dist.version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for entry in dist.files:
            path = root / entry
            if not str(entry).startswith("..") and "__pycache__" not in str(entry) and path.is_file():
                archive.write(path, str(entry))
    return wheel


@pytest.mark.slow
def test_the_bootstrap_installs_real_wheels_and_the_benchmark_runs_on_them_with_this_torch(tmp_path):
    """GPU_SH_WHEELS=always takes the path a lent machine takes, with a fake --target, on this venv's torch."""
    wheels, target, out = tmp_path / "wheels", tmp_path / "site", tmp_path / "out"
    wheels.mkdir()
    for distribution in ("open_clip_torch", "ftfy", "wcwidth"):
        repack(distribution, wheels)
    done = run_script(["--target", str(target), "--wheels", str(wheels), "--device", "cpu", "--quick", "--parts",
                       "environment", "--out", str(out)], {**ENV, "GPU_SH_WHEELS": "always"}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"3 wheels from {wheels} installed into {target}" in done.stdout
    environment = json.loads((out / "environment.json").read_text())
    for module in ("open_clip", "ftfy", "wcwidth"):
        assert Path(environment["modules"][module]["file"]).is_relative_to(target), module
    assert not Path(environment["modules"]["torch"]["file"]).is_relative_to(target)  # never installs torch
    assert not (target / "torch").exists()
    index = json.loads((out / "index.json").read_text())
    assert [(p["part"], p["status"]) for p in index["parts"]] == [("environment", "ok")]


# ----------------------------------------------------------------------------------------------- guards


def running(pid: int) -> bool:
    """Whether a process is alive (a zombie waiting to be reaped is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_part_past_its_budget_is_killed_with_all_it_started_and_keeps_what_it_wrote(tmp_path):
    part_file, pid_file = tmp_path / "part.json", tmp_path / "child.pid"
    script = (f"import pathlib, subprocess, sys, time\n"
              f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
              f"pathlib.Path({str(pid_file)!r}).write_text(str(child.pid))\n"
              f"pathlib.Path({str(part_file)!r}).write_text('{{\"rows\": [1]}}')\n"
              f"print('first rows written', flush=True)\n"
              f"time.sleep(600)\n")
    with open(tmp_path / "log.txt", "w") as log:
        row = gpu.run_part("slow", [sys.executable, "-c", script], 8, log)
    assert row["status"] == "timed out" and row["returncode"] is None and 8 <= row["seconds"] < 60
    assert "first rows written" in row["error"] and "first rows written" in (tmp_path / "log.txt").read_text()
    assert json.loads(part_file.read_text()) == {"rows": [1]}
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while running(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not running(child)


def test_a_failing_part_is_recorded_with_its_error(tmp_path):
    with open(tmp_path / "log.txt", "w") as log:
        row = gpu.run_part("broken", [sys.executable, "-c", "raise SystemExit('no open_clip here')"], 60, log)
    assert row["status"] == "failed" and row["returncode"] == 1
    assert "no open_clip here" in row["error"]


def test_parts_go_on_after_a_failure_and_stop_when_the_overall_budget_is_spent(tmp_path, monkeypatch):
    """The index is rewritten after each part; a part with too little time left is skipped, not started."""
    behaviour = {"environment": "write", "coverage": "fail", "step": "slow", "resume": "write"}
    seen_indexes = []

    def command(part, size, device, out, budget_s):
        act = behaviour[part.name]
        index = out.parent / "index.json"
        seen_indexes.append(json.loads(index.read_text()) if index.is_file() else None)
        code = {"write": f"open({str(out)!r}, 'w').write('{{}}')",
                "fail": f"open({str(out)!r}, 'w').write('{{\"rows\": []}}'); raise SystemExit('out of memory')",
                "slow": f"import time; open({str(out)!r}, 'w').write('[]'); time.sleep({budget_s - 1.2})"}[act]
        return [sys.executable, "-c", code]

    monkeypatch.setattr(gpu, "part_command", command)
    monkeypatch.setattr(gpu, "MIN_PART_S", 1.5)
    index = gpu.run("cpu", True, tmp_path / "out", list(behaviour), overall_s=6.0)  # step ends 1.2 s before it
    rows = {p["part"]: p for p in index["parts"]}
    assert list(rows) == list(behaviour)
    assert rows["environment"]["status"] == "ok" and rows["environment"]["file"] == "environment.json"
    assert rows["coverage"]["status"] == "failed" and "out of memory" in rows["coverage"]["error"]
    assert rows["coverage"]["problems"] and rows["coverage"]["file"] == "coverage.json"  # what it wrote stays
    assert rows["step"]["status"] == "ok"
    assert rows["resume"]["status"] == "skipped" and "overall" in rows["resume"]["error"]
    assert [len(i["parts"]) if i else 0 for i in seen_indexes] == [0, 1, 2]  # written after every part
    on_disk = json.loads((tmp_path / "out" / "index.json").read_text())
    assert on_disk["finished"] and [p["status"] for p in on_disk["parts"]] == ["ok", "failed", "ok", "skipped"]
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| coverage | failed |" in summary and "| resume | skipped |" in summary


def test_a_failed_memory_case_is_recorded_and_the_others_are_measured(monkeypatch):
    figures = {"peak_mib": 2000.0, "model_mib": 1000.0, "step_mib": 1000.0, "seconds": 0.5, "device": "cpu"}

    def measure(arch, classes, method, prompts, chunked, *args):
        return {"error": "exit 1: CUDA out of memory"} if (prompts, chunked) == (1, False) else dict(figures)

    monkeypatch.setattr(memory, "measure", measure)
    saved = []
    rows = memory.rows_for("tiny-clip", 20, "cpu", 128, 1, budget_gib=1e9, save=lambda rows: saved.append(len(rows)))
    assert [(r["prompts"], r["chunked"], r["measured"]) for r in rows] == [
        (1, False, False), (10, False, False), (1, True, True), (10, True, True)]
    assert "out of memory" in rows[0]["error"] and "U = 1 case failed" in rows[1]["note"] and saved == [1, 2, 3, 4]
    assert "| failed |" in memory.table(rows)
    late = memory.rows_for("tiny-clip", 20, "cpu", 128, 1, budget_gib=1e9, deadline=time.monotonic() - 1)
    assert all(not r["measured"] and "budget" in r["note"] for r in late)


# ----------------------------------------------------------------------------------------------- the whole script


@pytest.mark.slow
def test_the_gpu_script_runs_every_part_on_cpu_at_the_tiny_size(tmp_path):
    """benchmarks/gpu.sh --device cpu --quick: what a GPU owner runs, at the tiny size on this machine."""
    from dynaprompt.methods import METHODS

    out = tmp_path / "benchmark-gpu"
    done = run_script(["--device", "cpu", "--quick", "--out", str(out)], ENV, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    index = json.loads((out / "index.json").read_text())
    errors = {p["part"]: p["error"] or p["problems"] for p in index["parts"] if p["error"] or p["problems"]}
    assert [(p["part"], p["status"]) for p in index["parts"]] == [(p.name, "ok") for p in gpu.PARTS], errors
    assert not errors
    load = lambda name: json.loads((out / f"{name}.json").read_text())  # noqa: E731
    coverage = load("coverage")
    assert [r["method"] for r in coverage["rows"]] == list(METHODS)  # every kind, new ones included
    assert all(r["ms_per_sample"] > 0 and r["mean_selected"] >= 0 for r in coverage["rows"])
    assert {r["method"]: r["mean_selected"] for r in coverage["rows"]}["dynaprompt"] >= 1
    assert coverage["tflops"]["chunked"] and coverage["tflops"]["tflops_per_second"] > 0
    assert {(r["prompts"], r["chunked"]) for r in load("step") if r["measured"]} == {(1, True), (10, True)}
    resume = load("resume")
    assert [r["method"] for r in resume["rows"]] == [k for k, c in METHODS.items() if not c.order_independent]
    assert all(r["resumed_at"] == r["expected_resume"] > 0 for r in resume["rows"])
    assert load("pinning")["ok"] and len(load("pinning")["workers"]) == 2
    embed = load("embed")[-1]
    assert embed["identical_features"] and embed["shm"]["batch_bytes"] == 2 * 8 * 128 * 4  # features on a CPU
    assert load("share")["ratio"] > 0
    assert {r["method"] for r in load("lockstep")["lockstep"]} == {"tpt", "dynaprompt"}
    summary = (out / "summary.md").read_text()
    assert "check.tflops_per_second" in summary and summary.strip() in done.stdout
