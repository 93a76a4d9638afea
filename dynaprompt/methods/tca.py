"""TCA (Wang et al., ICCV 2025, "Is Less More? Exploring Token Condensation as Training-free Test-time
Adaptation"): its reservoir of confident *and* diverse samples per class, read as a cache.

Read from the authors' code, Jo-wang/TCA @ 0f846d6 (the only commit; the repository has no LICENSE file).
TCA has two halves, and only the second can run from the pipeline's cached view features:

- Token condensation inside the ViT (`clip/model.py:ResidualAttentionBlock_Ours`, `Transformer_drop`,
  `CLIP.update_cls_token`). At layers 3, 6 and 9, tokens are pruned and merged by class-token attention.
  That attention is steered by a "class token cache": per class, the mean of the reservoir entries' per-layer
  class tokens, refreshed at every update once every class holds more than one entry
  (`runner.py:update_reservoir_sim`, `--flag`). This changes the image features themselves and needs the image
  encoder's per-layer tokens. It is NOT reproduced here: the pipeline caches only final view features. Here
  the features are those of the unmodified encoder.
- The reservoir (`runner.py`), which this module implements:
  - Query (`utils.py:get_clip_logits`). The authors' loaders give one CLIP-preprocessed image on every set,
    so only view 0 is used. clip_logits = scale * f . T; the pseudo-label is their argmax. H is their softmax
    entropy in nats, *not* normalised (the normalised value is computed and discarded).
  - Logit scale: the authors write the literal 100 (`utils.py:229` in `get_clip_logits`,
    `clip_logits = 100. * image_features @ clip_weights`). `Config.logit_scale` "authors" (the default) uses it,
    "model" the model's own `logit_scale`; they are equal on OpenAI CLIP. The scale sets H, and so which entry
    the reservoir pops, and the balance of clip_logits against the reservoir read-out.
  - Text classifier (`utils.py:clip_classifier`): the normalised mean of normalised template embeddings.
    The authors use CLIP's per-dataset prompt lists (80 on the ImageNet family). Here it is
    `zero_shot.classifier(text, templates)`.
  - Update (`runner.py:update_reservoir_sim`, with --div True, the argparse default).
    The reservoir starts as an empty list for every class. The sample is always appended under its
    pseudo-label. If the class then holds more than `reservoir_size` entries, the entry with the largest
    score H_j + s_j is popped, the newcomer included.
    - s_j is the mean cosine similarity of entry j to the class's other entries (`utils.py:cls_feature_similarity`:
      row sum minus the diagonal, over n - 1). A low score means confident and unlike its classmates.
    - On a tie the first entry in list order goes (torch.argmax).
    - The list is then sorted by ascending H (stable), so the newcomer sits last when the scores are computed.
  - Read-out (`runner.py:compute_reservoir_logits`): final = clip_logits + lambd * sum over all entries j of
    exp(-(beta - beta * a_j)) onehot(class_j). The affinity a_j is a weighted sum, over the 12 layers, of the
    cosine similarities between the sample's per-layer class tokens and entry j's. The layer weights are
    exp(linspace(0, 1, 12) / scale), normalised.
  - Order (`runner.py:run_test_tca`): update first, then read, so the sample reads itself when it is kept.
    pred = argmax(final).

What stands in for the per-layer class tokens:
- Each entry's key is the unit-norm view-0 feature, and a_j is cos(f, k_j). That is the authors' 12-layer
  weighted sum with one "layer", the final one (after ln_post and the projection).
- With ImageNet-A's scale 0.01 the authors' weights put 0.9999 on the last layer, but on the class token
  *before* ln_post and the projection. So even there a_j is not the same number.
- The layer `scale` therefore has no counterpart and is not a Config field. The authors' values
  (configs/*.yaml) are: ImageNet 0.1, -A 0.01, -V2 0.1, -R 0.1, -Sketch 0.1, Caltech101 1, DTD 1, EuroSAT 5,
  Aircraft 0.02, Food101 0.01, Flowers102 0.01, Pets 5.5, Cars 0.1, SUN397 0.01, UCF101 0.01.
- s_j uses the same keys. That is exactly the authors' --token_sim False path; their default, True, averages
  each entry's 12 class tokens first.
- The --div False variant (H + int((max H - min H) / (max s' - min s')) * s', with s' = 1 - s) is not
  offered. It is not the default and divides by zero when the similarities tie.

Paper and tta-vlm:
- The paper's text was not available here.
- tta-vlm (TomSheng21/tta-vlm @ bcc735f) has no TCA (its online_method/ holds boostadapter, clipzs, dmn,
  dmn_weak, dpe, dynaprompt, ecalp, onzeta and tda), so there is nothing to compare.
- fp32 throughout. The authors run an fp16 CLIP and cast the affinities and values to fp16.
- Storage: per-class slots on the device: keys [C, R, E], entropies (+inf empty), ids (-1 empty). The update
  appends the newcomer as slot R of its class, scores the R + 1 entries when they overflow, drops the argmax
  and stable-sorts by H, all on the device. The read-out masks empty slots, with no one-hot matrix and no
  re-stacking. The only host reads per sample are the outcome's scalars, in one transfer at the end.

Records:
- Every entry kept in the reservoir gets the next integer id (a counter reset by `reset()`). A newcomer popped
  at once gets none.
- `appended`: the id kept at this sample. `deleted`: the id of a stored entry popped at this sample.
- `buffer_size`: the number of reservoir entries after the sample. `selected` is empty.
- `entropy_before`: H(softmax(clip_logits)) of view 0. `entropy_after`: H(softmax(final)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..objectives import TuningConfig, entropy
from ..records import Outcome
from ..text import PromptTextEncoder
from .zero_shot import LOGIT_SCALES, chosen_logit_scale, classifier

AUTHORS_LOGIT_SCALE = 100.0  # utils.py:229 (get_clip_logits) `clip_logits = 100. * image_features @ clip_weights`


@dataclass(frozen=True)
class Config:
    """TCA's reservoir constants at the authors' ImageNet-A setting (Jo-wang/TCA configs/imagenet_a.yaml)."""

    reservoir_size: int = 3  # entries per class (configs/imagenet_a.yaml reservoir_size)
    lambd: float = 3.0  # reservoir weight (configs/imagenet_a.yaml lambd)
    beta: float = 5.0  # reservoir sharpness, exp(-(beta - beta * a)) (configs/imagenet_a.yaml beta)
    logit_scale: str = "authors"  # authors: utils.py:229's literal 100 (AUTHORS_LOGIT_SCALE) | model: the model's own

    def __post_init__(self):
        if self.reservoir_size < 1:
            raise ValueError("reservoir_size must be >= 1")
        if self.logit_scale not in LOGIT_SCALES:
            raise ValueError(f"logit_scale must be one of {LOGIT_SCALES}, got {self.logit_scale!r}")


def diversity(keys: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Each entry's mean cosine similarity to the other valid entries of its class (utils.py:cls_feature_similarity).

    keys [R + 1, E], valid [R + 1]; 0 where fewer than two entries are valid (it is then not used).
    """
    unit = F.normalize(keys, dim=-1) * valid.unsqueeze(-1)
    similarity = unit @ unit.t()
    others = (valid.sum() - 1).clamp(min=1)
    return (similarity.sum(1) - similarity.diagonal()) / others


class TCA:
    """Per sample: append view 0 to its pseudo-class's reservoir, pop the worst (H + similarity), read the reservoir."""

    Config = Config
    order_independent = False
    uses_templates = True

    def __init__(self, text: PromptTextEncoder, tuning: TuningConfig, config: Config, templates=None):
        self.config = config
        self.text_features = classifier(text, templates)[0].float()
        self.scale = chosen_logit_scale(text, config.logit_scale, AUTHORS_LOGIT_SCALE, self.text_features.device)
        self.reset()

    @property
    def n_classes(self) -> int:
        return self.text_features.shape[0]

    def reset(self) -> None:
        """An empty reservoir for every class and a fresh id counter."""
        n_classes, dim = self.text_features.shape
        size, device = self.config.reservoir_size, self.text_features.device
        self.keys = torch.zeros(n_classes, size, dim, device=device)
        self.entropies = torch.full((n_classes, size), math.inf, device=device)
        self.ids = torch.full((n_classes, size), -1, dtype=torch.long, device=device)
        self.next_id = 0

    def state_dict(self) -> dict:
        return {"keys": self.keys.clone(), "entropies": self.entropies.clone(), "ids": self.ids.clone(),
                "next_id": self.next_id}

    def load_state_dict(self, state: dict) -> None:
        for name in ("keys", "entropies", "ids"):
            getattr(self, name).copy_(state[name])
        self.next_id = int(state["next_id"])

    def update(self, label: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """runner.py:update_reservoir_sim on class `label` (a one-element index tensor); the id popped, or -1.

        The id popped is the newcomer's when it is the one that goes.
        """
        size = self.config.reservoir_size
        new_id = torch.full((1,), self.next_id, dtype=torch.long, device=self.ids.device)
        keys = torch.cat([self.keys[label][0], key.unsqueeze(0)])  # the sorted list, then the newcomer
        entropies = torch.cat([self.entropies[label][0], value.reshape(1)])
        ids = torch.cat([self.ids[label][0], new_id])
        valid = ids >= 0
        overflow = valid.sum() > size
        score = torch.where(valid, entropies + diversity(keys, valid), -math.inf)
        popped = torch.where(overflow, score.argmax(), size + 1)  # size + 1: no slot
        keep = valid & (torch.arange(size + 1, device=ids.device) != popped)
        order = torch.sort(torch.where(keep, entropies, math.inf), stable=True).indices[:size]
        self.keys[label] = torch.where(keep.unsqueeze(-1), keys, 0.0)[order].unsqueeze(0)
        self.entropies[label] = torch.where(keep, entropies, math.inf)[order].unsqueeze(0)
        self.ids[label] = torch.where(keep, ids, -1)[order].unsqueeze(0)
        return torch.where(overflow, ids[popped.clamp(max=size).reshape(1)][0], -1)

    def reservoir_logits(self, query: torch.Tensor) -> torch.Tensor:
        """lambd * sum over each class's entries of exp(-(beta - beta * cos(f, k_j))) -> [C]."""
        config = self.config
        affinity = F.normalize(self.keys, dim=-1) @ F.normalize(query, dim=0)
        return config.lambd * (torch.exp(-(config.beta - config.beta * affinity)) * (self.ids >= 0)).sum(1)

    @torch.no_grad()
    def __call__(self, view_features: torch.Tensor) -> Outcome:
        query = view_features[0].float()
        logits = self.scale * self.text_features @ query
        before = entropy(logits)
        popped = self.update(logits.argmax().reshape(1), F.normalize(query, dim=0), before)
        final = logits + self.reservoir_logits(query)
        pred, before, after, popped, size = torch.stack([
            final.argmax().double(), before.double(), entropy(final).double(), popped.double(),
            (self.ids >= 0).sum().double()]).tolist()
        new_id, kept = self.next_id, int(popped) != self.next_id
        self.next_id += int(kept)
        return Outcome(pred=int(pred), entropy_before=before, entropy_after=after,
                       appended=[new_id] if kept else [], deleted=[int(popped)] if kept and popped >= 0 else [],
                       buffer_size=int(size))

    def snapshot(self) -> dict:
        """{class: [(id, entropy), ...]} in list order, read from the device (for inspection and tests)."""
        ids, entropies = self.ids.tolist(), self.entropies.tolist()
        return {label: [(i, e) for i, e in zip(ids[label], entropies[label]) if i >= 0]
                for label in range(self.n_classes) if ids[label][0] >= 0}
