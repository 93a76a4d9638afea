"""One list of the code that changes results: the fingerprint hashes it, dvc.yaml's sweep depends on it."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dynaprompt import provenance
from dynaprompt.provenance import RESULT_CODE, SWEEP_CODE, code_files, code_fingerprint

ROOT = Path(__file__).resolve().parent.parent
DATA_DEPS = ("data/models", "data/inputs.json")


def sweep_deps() -> list[str]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["sweep"]["deps"]


def test_dvc_sweep_depends_on_exactly_the_listed_code():
    code = [d for d in sweep_deps() if d not in DATA_DEPS]
    assert sorted(code) == sorted(RESULT_CODE + SWEEP_CODE)
    assert all((ROOT / entry).exists() for entry in RESULT_CODE + SWEEP_CODE)


def test_every_result_file_changes_the_fingerprint(tmp_path):
    copy = tmp_path / "repo"
    for entry in RESULT_CODE:
        target = copy / entry
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if (ROOT / entry).is_dir() else shutil.copy)(ROOT / entry, target)
    before = code_fingerprint(copy)
    assert before == code_fingerprint(ROOT)
    for file in code_files(RESULT_CODE, copy):
        original = file.read_text()
        file.write_text(original + "\n# edited\n")
        assert code_fingerprint(copy) != before, file
        file.write_text(original)
    assert code_fingerprint(copy) == before


@pytest.mark.slow
def test_editing_any_listed_file_makes_dvc_call_the_sweep_changed(tmp_path):
    """A DVC project with the real sweep stage's dependencies: after `dvc repro`, each edit shows in `dvc status`."""
    project = tmp_path / "project"
    for entry in RESULT_CODE + SWEEP_CODE:
        target = project / entry
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if (ROOT / entry).is_dir() else shutil.copy)(ROOT / entry, target)
    (project / "data" / "models").mkdir(parents=True)
    (project / "data" / "models" / "weights.pt").write_text("w")
    (project / "data" / "inputs.json").write_text("{}")
    stage = {"cmd": "echo done > out.txt", "deps": sweep_deps(), "outs": ["out.txt"]}
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"sweep": stage}}))
    dvc = [sys.executable, "-m", "dvc"]
    run = lambda *args: subprocess.run([*dvc, *args], cwd=project, capture_output=True, text=True, timeout=120)
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    assert run("init", "-q").returncode == 0
    assert run("repro", "-q").returncode == 0, run("repro").stderr
    assert "up to date" in run("status").stdout
    for file in code_files(RESULT_CODE + SWEEP_CODE, project):
        original = file.read_text()
        file.write_text(original + "\n# edited\n")
        status = run("status", "sweep").stdout
        assert "sweep:" in status and "modified" in status, (file, status)
        file.write_text(original)


def test_fingerprint_reads_the_package_it_lives_in():
    assert provenance.PACKAGE_ROOT == ROOT
