"""pretrain: train the bundled tiny CLIP on Fashion-MNIST (skipped when params name other weights).

Runs only when `model.pretrained` is the file this stage writes (`pretrain.output`); with real weights
(an open_clip tag or another file) it writes a metrics file saying it was skipped and trains nothing.
It reads only its own training data (`pretrain.source`); how the model responds to prompts on the test
streams is the testbed stage's to measure.
"""
from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch

from dynaprompt.datasets.fashion_mnist import CLASSNAMES, load_split, stratified_subset, to_rgb
from dynaprompt.model import load_clip, located
from dynaprompt.pretrain import eval_templates, image_features, pretrain, template_accuracies

from .common import settings, write_json


def main() -> None:
    config = settings()
    training = config.pretrain
    output = located(training.output, config.base_dir)
    metrics_file = config.path("reports") / "pretrain.json"
    if not trains_bundled_model(config):
        output.parent.mkdir(parents=True, exist_ok=True)
        (output.parent / "SKIPPED").write_text(f"model.pretrained is {config.model.pretrained!r}\n")
        write_json(metrics_file, {"skipped": True, "reason": f"model.pretrained is {config.model.pretrained!r}"})
        print(f"pretrain skipped: model.pretrained names other weights ({config.model.pretrained!r})")
        return
    torch.set_num_threads(training.threads)
    clip = load_clip(replace(config.model, pretrained=None, device="cpu"), config.base_dir)
    source = located(training.source, config.base_dir)
    start = time.perf_counter()
    train_images, train_labels = load_split(source, "train")
    curve = pretrain(clip, to_rgb(train_images, clip.image_size), train_labels, CLASSNAMES, training)
    seconds = time.perf_counter() - start
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(clip.model.state_dict(), output)

    test_images, test_labels = load_split(source, "test")
    chosen = stratified_subset(test_labels, training.eval_samples, training.seed)
    features = image_features(clip, to_rgb(test_images[chosen], clip.image_size))  # once, for every template
    per_template = template_accuracies(clip, features, test_labels[chosen], CLASSNAMES, eval_templates(training))
    values = 100 * np.array(list(per_template.values()))
    write_json(metrics_file, {
        "skipped": False, "train_seconds": round(seconds, 1), "final_loss": curve[-1]["loss"],
        "logit_scale": float(clip.model.logit_scale.exp()), "clean_zero_shot": per_template["a photo of a {}."],
        "clean_template_std_points": float(values.std()), "clean_template_range_points": float(np.ptp(values)),
        "loss_curve": curve,
    })
    print(f"pretrained {output} in {seconds:.0f}s: clean zero-shot {per_template['a photo of a {}.']:.3f}, "
          f"template std {values.std():.2f} points on clean test images")


def trains_bundled_model(config) -> bool:
    """Whether `model.pretrained` names the file this stage writes (both taken from the params file's folder)."""
    pretrained = config.model.pretrained
    return bool(pretrained) and (located(pretrained, config.base_dir).resolve()
                                 == located(config.pretrain.output, config.base_dir).resolve())


if __name__ == "__main__":
    main()
