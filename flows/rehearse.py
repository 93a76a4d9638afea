"""A dress rehearsal of the paper's configuration at ViT-B/16 size, before any GPU-hour is spent (`bin/rehearse`).

In a temporary folder it writes random ViT-B/16 weights as OpenAI's TorchScript checkpoint (or takes yours,
`--weights`), builds small synthetic trees in the real layouts -- ImageNet-A with all 200 wnid folders (a couple
of images in a few, one or none in the rest) and EuroSAT in CoOp's layout with its split_zhou_EuroSAT.json (10
classes) -- or takes your datasets (`--dataset`), and derives a params file from configs/paper.yaml by overrides
only: the roots, the weights, `model.device: cpu`, 8 views, 2 orderings, one view seed, and the one relaxed check,
the known test-split size (`validate.known_split_sizes: false`; the report says so). Then `dynaprompt check`, and
`dvc repro` in a copy of the project: prepare, validate, embed, testbed, sweep (every method of the config, both
DynaPrompt rules and every peer: `sweep.methods` as the config lists them) with MLflow lineage, and the report.

    bin/rehearse [--dir DIR] [--weights ViT-B-16.pt] [--dataset imagenet_a=/data/imagenet-a ...]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from dynaprompt.schema import with_on_keys

ROOT = Path(__file__).resolve().parent.parent
CODE = ("dynaprompt", "stages", "flows", "tasks", "analysis", "dvc.yaml", "configs")
EUROSAT = {  # CoOp's folders and class names (datasets/eurosat.py NEW_CNAMES)
    "AnnualCrop": "Annual Crop Land", "Forest": "Forest", "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road", "Industrial": "Industrial Buildings", "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land", "Residential": "Residential Buildings", "River": "River",
    "SeaLake": "Sea or Lake",
}


def image(rng: np.random.Generator, size: int, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(path, quality=90)


def imagenet_a_tree(root: Path, images: dict | None = None) -> Path:
    """All 200 wnid folders of ImageNet-A; `images` maps a folder's position to its image count (default: two
    images in the first folder, one in another, the rest empty)."""
    from dynaprompt.datasets.imagenet import synsets

    rng = np.random.default_rng(0)
    counts = images or {0: 2, 120: 1}
    for k, wnid in enumerate(synsets("imagenet_a")):
        (root / wnid).mkdir(parents=True, exist_ok=True)
        for i in range(counts.get(k, 0)):
            image(rng, 96, root / wnid / f"{wnid}_{i}.jpg")
    return root


def eurosat_tree(root: Path, per_class: int = 1, test_classes: int = 4) -> Path:
    """EuroSAT as CoOp lays it out: 2750/<Class>/<Class>_<i>.jpg and split_zhou_EuroSAT.json (test split: one image
    of each of the first `test_classes` classes; every class in train, so all 10 names are known)."""
    rng = np.random.default_rng(1)
    splits = {"train": [], "val": [], "test": []}
    for label, (folder, name) in enumerate(EUROSAT.items()):
        for i in range(per_class + 1):
            relative = f"{folder}/{folder}_{i}.jpg"
            image(rng, 64, root / "2750" / relative)
            split = "test" if i == 0 and label < test_classes else "train"
            splits[split].append([relative, label, name])
    (root / "split_zhou_EuroSAT.json").write_text(json.dumps(splits))
    return root


def write_openai_checkpoint(path: Path, arch: str = "ViT-B-16", seed: int = 0) -> Path:
    """Random `arch` weights (QuickGELU, fp16 values, as OpenAI's) as a TorchScript archive like OpenAI's own."""
    import open_clip
    import torch

    class Holder(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    torch.manual_seed(seed)
    model = open_clip.create_model(arch, pretrained=None, force_quick_gelu=True)
    holder = Holder()
    for key, value in model.state_dict().items():
        if key == "attn_mask":  # OpenAI's module keeps the mask as a plain attribute
            continue
        *parents, leaf = key.split(".")
        module = holder
        for part in parents:
            if not hasattr(module, part):
                module.add_module(part, Holder())
            module = getattr(module, part)
        module.register_buffer(leaf, value.detach().half().float().clone())
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(holder).save(str(path))
    return path


def rehearsal_params(workdir: Path, weights: Path, roots: dict) -> dict:
    """configs/paper.yaml with the rehearsal's overrides, and nothing else changed."""
    params = with_on_keys(yaml.safe_load((ROOT / "configs" / "paper.yaml").read_text()))  # `on` a string key
    params["model"] = {**params["model"], "pretrained": str(weights), "device": "cpu"}
    params["views"] = {**params["views"], "n_views": 8}
    params["run"] = {**params["run"], "threads": 1}
    params["datasets"] = {name: {**params["datasets"][name], "root": str(root)} for name, root in roots.items()}
    params["mixtures"] = {}  # the paper's mixture needs ImageNet, -V2 and -Sketch
    params["orderings"] = {family: {**params["orderings"][family], "seeds": 1} for family in ("shuffle",
                                                                                           "class_blocked")}
    # no ViT-L/14 weights offline: RLCF's reward CLIP is the rehearsed model itself (tta-vlm's choice)
    params["methods"]["rlcf"] = {**params["methods"]["rlcf"], "teacher": {"arch": None}}
    params["sweep"] = {**params["sweep"], "view_seeds": [0], "runner": "process", "workers": 2,  # its methods
                       "chaos": {"orderings": ["shuffle"], "replicates": 1}}
    params["testbed"] = {**params["testbed"], "streams": [n for n in params["testbed"]["streams"] if n in roots]}
    params["validate"] = {**params.get("validate", {}), "known_split_sizes": False}
    params["mlflow"] = {**params["mlflow"], "experiment": "rehearsal"}
    return params


def project_copy(workdir: Path) -> Path:
    """The code and dvc.yaml in a fresh git + DVC project (the stages run there, as in a clone)."""
    project = workdir / "project"
    project.mkdir(parents=True, exist_ok=True)
    for entry in CODE:
        source = ROOT / entry
        (shutil.copytree if source.is_dir() else shutil.copy)(source, project / entry)
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    dvc(project, "init", "-q")
    dvc(project, "config", "core.analytics", "false")
    return project


def dvc(project: Path, *args) -> subprocess.CompletedProcess:
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": path, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env, text=True)
    if done.returncode != 0:
        raise SystemExit(f"rehearse: dvc {' '.join(args)} failed (exit {done.returncode}); the project is {project}")
    return done


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bin/rehearse", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=None, help="work folder (default: a new temporary one)")
    parser.add_argument("--weights", default=None, help="your weights file (default: random ViT-B/16, TorchScript)")
    parser.add_argument("--dataset", action="append", default=[], metavar="NAME=ROOT",
                        help="rehearse on your dataset (a name of configs/paper.yaml) instead of the synthetic trees")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="rehearse-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.dataset:
        roots = dict(item.split("=", 1) for item in args.dataset)
    else:
        roots = {"imagenet_a": imagenet_a_tree(workdir / "data" / "imagenet-a"),
                 "eurosat": eurosat_tree(workdir / "data" / "eurosat")}
    weights = Path(args.weights) if args.weights else write_openai_checkpoint(workdir / "weights" / "ViT-B-16.pt")
    project = project_copy(workdir)
    (project / "params.yaml").write_text(yaml.safe_dump(rehearsal_params(workdir, weights, roots), sort_keys=False))
    checked = subprocess.run([sys.executable, "-m", "dynaprompt.cli", "check", "--params",
                              str(project / "params.yaml")], cwd=project)
    if checked.returncode != 0:
        print("rehearse: `dynaprompt check` found problems (above); nothing else was run", file=sys.stderr)
        return checked.returncode
    dvc(project, "repro")
    report = project / "reports" / "report.md"
    print(f"rehearse: done in {time.perf_counter() - started:.0f}s -> {report} (the work folder {workdir} is kept)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
