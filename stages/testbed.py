"""testbed: how strongly the model responds to prompts on the test streams -> reports/testbed.json.

For each `testbed.streams` entry: zero-shot accuracy (original view, encoded here from the prepared images) under
every template of `testbed.templates`, its spread (std and best minus worst, in points) and the best template. Also
the size of the prompt v0 that test-time tuning moves (RMS of its context coordinates) and the logit scale: the
step AdamW takes is about `lr` per coordinate, so `lr / RMS(v0)` is the step that transfers between models.
"""
from __future__ import annotations

import numpy as np
import torch

from dynaprompt.features import ViewEncoder
from dynaprompt.model import load_model
from dynaprompt.pretrain import template_accuracies
from dynaprompt.resolve import template_set
from dynaprompt.runner import build_text_encoder, open_stream, template_cache
from dynaprompt.views import ViewConfig

from .common import settings, write_json


def main() -> None:
    config = settings()
    clip = load_model(config)
    templates = template_set(config, config.testbed.templates)
    streams = {}
    for name in config.testbed.streams:
        data = open_stream(config, name)
        original = ViewEncoder(clip, ViewConfig(n_views=1), amp=config.tuning.amp,  # view 0: resize + centre crop
                               dtype=config.embed.dtype)
        features = torch.stack([original(data.load(s), s)[0].cpu() for s in data.manifest["sample_id"]])
        fractions = template_accuracies(clip, features, data.manifest["label"].to_numpy(), data.classnames, templates,
                                        cache=template_cache(clip, config))
        accuracy = {template: round(100 * value, 4) for template, value in fractions.items()}  # float32 means
        values = np.array(list(accuracy.values()))
        best, worst = max(accuracy, key=accuracy.get), min(accuracy, key=accuracy.get)
        v0 = accuracy.get("a photo of a {}.")
        streams[name] = {"v0": v0, "template_std": float(values.std()),
                         "template_range": float(np.ptp(values)), "best_template": best, "best": accuracy[best],
                         "worst_template": worst, "worst": accuracy[worst], "per_template": accuracy}
        v0_text = "not in the template set" if v0 is None else f"{v0:.1f}"
        print(f"testbed {name}: v0 {v0_text}, template std {values.std():.2f}, "
              f"range {np.ptp(values):.1f} points (best {best!r})")
    text = build_text_encoder(clip, ["thing"], config)
    write_json(config.path("reports") / "testbed.json", {
        "templates": config.testbed.templates, "n_templates": len(templates),
        "v0_context_rms": float(text.init_context.pow(2).mean().sqrt()),
        "logit_scale": float(clip.model.logit_scale.exp()), "streams": streams,
    })


if __name__ == "__main__":
    main()
