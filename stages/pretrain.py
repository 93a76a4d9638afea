"""pretrain: train the bundled tiny CLIP on Fashion-MNIST (skipped when params name other weights).

Runs only when `model.pretrained` is the file this stage writes (`pretrain.output`); with real weights
(an open_clip tag or another file) it writes a metrics file saying it was skipped and trains nothing.
Metrics: clean and per-stream zero-shot accuracy, and template sensitivity (reports/pretrain.json).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from dynaprompt.config import dataclass_from
from dynaprompt.datasets import load_prepared
from dynaprompt.datasets.fashion_mnist import CLASSNAMES, load_split, stratified_subset, to_rgb
from dynaprompt.model import ModelSpec, load_clip
from dynaprompt.pretrain import EVAL_TEMPLATES, PretrainConfig, pretrain, zero_shot_accuracy

from .common import PARAMS_FILE, params, path, write_json


def stream_accuracies(clip, streams: list[str]) -> dict:
    """Zero-shot accuracy ("a photo of a {}.") on each prepared stream."""
    accuracies = {}
    for name in streams:
        dataset = load_prepared(name, path("prepared") / name)
        labels = dataset.manifest["label"].to_numpy()
        pixels = np.asarray(dataset.pixels)[dataset.manifest["index"].to_numpy()]
        accuracies[name] = zero_shot_accuracy(clip, pixels, labels, CLASSNAMES)
    return accuracies


def main() -> None:
    config = params()
    block = dict(config.get("pretrain") or {})
    output = Path(block.pop("output", "data/models/tiny-clip-fmnist.pt"))
    source = block.pop("source", "/usr/share/datasets/fashion-mnist")
    streams = block.pop("streams", [])
    pretrain_config = dataclass_from(PretrainConfig, block, "pretrain")
    model = dict(config.get("model") or {})
    metrics_file = path("reports") / "pretrain.json"
    if str(model.get("pretrained")) != str(output):
        output.parent.mkdir(parents=True, exist_ok=True)
        (output.parent / "SKIPPED").write_text(f"model.pretrained is {model.get('pretrained')!r}\n")
        write_json(metrics_file, {"skipped": True, "reason": f"model.pretrained is {model.get('pretrained')!r}"})
        write_json(path("reports") / "pretrain_templates.json", {})
        print(f"pretrain skipped: model.pretrained names other weights ({model.get('pretrained')!r})")
        return
    torch.set_num_threads(pretrain_config.threads)
    spec = dataclass_from(ModelSpec, {**model, "pretrained": None, "device": "cpu"}, "model")
    clip = load_clip(spec)
    start = time.perf_counter()
    train_images, train_labels = load_split(PARAMS_FILE.resolve().parent / source, "train")
    curve = pretrain(clip, to_rgb(train_images, clip.image_size), train_labels, CLASSNAMES, pretrain_config)
    seconds = time.perf_counter() - start
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(clip.model.state_dict(), output)

    test_images, test_labels = load_split(PARAMS_FILE.resolve().parent / source, "test")
    chosen = stratified_subset(test_labels, pretrain_config.eval_samples, pretrain_config.seed)
    clean = to_rgb(test_images[chosen], clip.image_size)
    per_template = {t: zero_shot_accuracy(clip, clean, test_labels[chosen], CLASSNAMES, t) for t in EVAL_TEMPLATES}
    values = np.array(list(per_template.values()))
    metrics = {
        "skipped": False,
        "train_seconds": round(seconds, 1),
        "final_loss": curve[-1]["loss"],
        "logit_scale": float(clip.model.logit_scale.exp()),
        "clean_zero_shot": per_template["a photo of a {}."],
        "template_accuracy_std": float(values.std()),
        "template_accuracy_min": float(values.min()),
        "template_accuracy_max": float(values.max()),
        "stream_zero_shot": stream_accuracies(clip, streams),
    }
    write_json(metrics_file, metrics)
    write_json(path("reports") / "pretrain_templates.json", per_template)
    print(f"pretrained {output} in {seconds:.0f}s: clean zero-shot {metrics['clean_zero_shot']:.3f}, "
          f"template std {metrics['template_accuracy_std']:.4f}, streams {metrics['stream_zero_shot']}")


if __name__ == "__main__":
    main()
