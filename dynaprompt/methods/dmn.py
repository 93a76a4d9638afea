"""DMN-ZS (Zhang et al., CVPR 2024, "Dual Memory Networks"): the training-free dynamic memory, zero-shot variant.

Read from the authors' code, YBZh/DMN @ c6c218c (MIT). The zero-shot run is scripts/run.sh with
n_shot 0, memory_size 50, beta 5.5, selection_p 0.1 and `-b 32`. With n_shot 0, every learnable projection of
`DualMem` is a zero tensor that is never trained, so the method is the memory alone:

- Zero-shot prediction (`dmn_main.py:DualMem.get_text_prediction`, `direct_inference`):
  p_zs = softmax(scale * f0 . T) on view 0 only.
  - T is the normalised mean of normalised prompt embeddings (`clip/fix_clip.py:get_text_features`); here that
    is `zero_shot.classifier(text, templates)`.
  - The scale is the model's logit_scale, which is 100 on CLIP.
- Views: the authors use 32 views (1 original + 31). `n_views` keeps only the first n_views rows (0 = all).
- Pseudo-label (`dmn_main.py:select_confident_samples`, `direct_inference`):
  - Rank the views by -sum p log(p + 1e-6) and keep the int(0.1 * n_views) lowest, view 0 included.
  - Average their *probabilities* (not logits) into q. The pseudo-label is y = argmax q.
  - The sample's entropy is H = -sum q log(q + 1e-8) (`DualMem.update_memory_bank`).
- Memory update (`dmn_main.py:DualMem.update_memory_bank`):
  - Per class there are 50 slots holding the normalised view-0 feature and H.
  - A class that is not full takes the sample in its next free slot.
  - A full class replaces its highest-entropy slot, but only if H is lower than at least one stored entropy;
    otherwise the sample is dropped.
  - The slot is the last of an ascending `torch.sort`. Here that is the highest slot index among tied maxima
    (a stable sort); the authors' unstable sort leaves ties unspecified.
- Read-out (`dmn_main.py:DualMem.get_image_pred`, branch 'similarity_weighted'):
  - Each class has its stored features plus its text feature as one extra slot. The authors L2-normalise
    the slots at every read-out; here a feature is normalised once, when it is stored, which gives the same
    values.
  - Slot weight a = exp(-beta * (1 - f0 . slot)), with beta 5.5.
  - The prototype is normalise(sum_j a_j slot_j); empty slots contribute nothing.
  - p_mem = softmax(scale * f0 . prototypes).
- Order (`dmn_main.py:direct_inference`): the memory is updated BEFORE the read-out of the same sample.
- Fusion (`direct_inference`): final = p_zs + fusion_weight * p_mem, probabilities.
  - The authors pick fusion_weight per dataset *on the test labels*, after the stream, from a 13-value grid
    (weight_search); the update does not depend on it.
  - The default 3.0 is the value their log (camera_ready_dmn_tf_shift_0.txt:L26) shows for ImageNet-A.
    Their other values: I 1, V 1, R 0.3, K 1, Flowers 10, DTD 10, Pets 1, Cars 0.3, UCF 0.3, Caltech 0.3,
    Food 0.3, SUN 3, Aircraft 1, EuroSAT 0.3. tta-vlm uses 1.0 everywhere.

Paper and code: the text-feature slot, storing view 0 while labelling from the confident views, and the
test-label search of the fusion weight are code facts; the paper text could not be checked.

tta-vlm (online_method/dmn.py) differs from the authors. Those differences are not followed:
- it uses 64 views;
- it averages logits for the pseudo-label;
- it always replaces the highest-entropy slot of a full class.

Records:
- Every feature put into memory gets the next integer id, reset by `reset()`.
- `appended`: the id stored at this sample. `deleted`: the id it replaced.
- `buffer_size`: the number of filled slots over all classes.
- `entropy_before`: the entropy of p_zs. `entropy_after`: the entropy of final / (1 + fusion_weight), the
  fused vector renormalised to a distribution.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..objectives import TuningConfig, entropy, n_confident
from ..records import Outcome
from ..text import PromptTextEncoder
from .zero_shot import classifier


@dataclass(frozen=True)
class Config:
    """DMN-ZS's constants at the authors' ImageNet-A setting (YBZh/DMN scripts/run.sh, camera-ready logs)."""

    memory_length: int = 50  # slots per class (run.sh --memory_size 50)
    beta: float = 5.5  # read-out sharpness, exp(-beta (1 - sim)) (run.sh --beta 5.5)
    fusion_weight: float = 3.0  # p_zs + w p_mem; ImageNet-A's searched value, chosen on test labels by the authors
    n_views: int = 32  # views used: the first n_views rows (run.sh -b 32); 0 = all
    confident_ratio: float = 0.1  # int(0.1 * n_views) views label the sample (run.sh --selection_p 0.1)
    selection_eps: float = 1e-6  # view ranking entropy -sum p log(p + eps) (dmn_main.py:select_confident_samples)
    memory_eps: float = 1e-8  # stored entropy -sum q log(q + eps) (dmn_main.py:DualMem.update_memory_bank)

    def __post_init__(self):
        if self.memory_length < 1 or self.n_views < 0:
            raise ValueError("memory_length must be >= 1 and n_views >= 0")


def eps_entropy(probs: torch.Tensor, eps: float) -> torch.Tensor:
    """-sum p log(p + eps) along the last axis, the authors' form."""
    return -(probs * torch.log(probs + eps)).sum(-1)


def pseudo_label_probs(probs: torch.Tensor, ratio: float, eps: float) -> torch.Tensor:
    """Mean probability [C] of the n_confident(V, ratio) views of lowest -sum p log(p + eps)."""
    keep = torch.argsort(eps_entropy(probs, eps), stable=True)[: n_confident(probs.shape[0], ratio)]
    return probs[keep].mean(0)


def slot_to_replace(entropies: torch.Tensor, new_entropy: float) -> int | None:
    """In a full class: the highest-entropy slot (the last one among ties), or None if nothing stored is worse."""
    if not bool((new_entropy < entropies).any()):
        return None
    return int(torch.argsort(entropies, stable=True)[-1])


def memory_prototypes(query: torch.Tensor, memory: torch.Tensor, filled: torch.Tensor, text_features: torch.Tensor,
                      beta: float) -> torch.Tensor:
    """Per class, normalise(sum over stored slots and the text slot of exp(-beta (1 - q.s)) s) -> [C, E].

    memory [C, L, E] of unit-norm features (empty slots zero), filled [C, L] bool, text_features [C, E].
    """
    weights = torch.exp(-beta * (1 - memory @ query)) * filled
    text_keys = F.normalize(text_features, dim=-1)
    text_weights = torch.exp(-beta * (1 - text_keys @ query))
    summed = torch.einsum("cl,cle->ce", weights, memory) + text_weights.unsqueeze(-1) * text_keys
    return F.normalize(summed, dim=-1)


class DMN:
    """Per sample: label it from its confident views, store view 0 in that class's memory, read the memory."""

    Config = Config
    order_independent = False
    uses_templates = True

    def __init__(self, text: PromptTextEncoder, tuning: TuningConfig, config: Config, templates=None):
        self.config = config
        self.text_features = classifier(text, templates)[0].float()
        self.scale = text.logit_scale().detach().float()
        self.reset()

    def reset(self) -> None:
        """Empty memory and fresh ids, at the start of a stream."""
        n_classes, dim = self.text_features.shape
        length = self.config.memory_length
        device = self.text_features.device
        self.memory = torch.zeros(n_classes, length, dim, device=device)
        self.entropies = torch.zeros(n_classes, length, device=device)
        self.ids = torch.full((n_classes, length), -1, dtype=torch.long, device=device)
        self.counts = [0] * n_classes
        self.next_id = 0

    def state_dict(self) -> dict:
        return {"memory": self.memory.clone(), "entropies": self.entropies.clone(), "ids": self.ids.clone(),
                "counts": list(self.counts), "next_id": self.next_id}

    def load_state_dict(self, state: dict) -> None:
        self.memory.copy_(state["memory"])
        self.entropies.copy_(state["entropies"])
        self.ids.copy_(state["ids"])
        self.counts = [int(c) for c in state["counts"]]
        self.next_id = int(state["next_id"])

    def store(self, label: int, feature: torch.Tensor, value: float) -> tuple[list[int], list[int]]:
        """Insert into class `label`'s memory by the authors' rule; (appended ids, deleted ids)."""
        if self.counts[label] < self.config.memory_length:
            slot = self.counts[label]
            self.counts[label] += 1
            deleted = []
        else:
            slot = slot_to_replace(self.entropies[label], value)
            if slot is None:
                return [], []
            deleted = [int(self.ids[label, slot])]
        self.memory[label, slot] = feature
        self.entropies[label, slot] = value
        self.ids[label, slot] = self.next_id
        self.next_id += 1
        return [int(self.ids[label, slot])], deleted

    @torch.no_grad()
    def __call__(self, view_features: torch.Tensor) -> Outcome:
        config = self.config
        used = view_features[: config.n_views] if config.n_views else view_features
        logits = self.scale * used.float() @ self.text_features.t()
        probs = logits.softmax(-1)
        mean_prob = pseudo_label_probs(probs, config.confident_ratio, config.selection_eps)
        label = int(mean_prob.argmax())
        query = F.normalize(used[0].float(), dim=-1)
        appended, deleted = self.store(label, query, float(eps_entropy(mean_prob, config.memory_eps)))
        used_slots = max(self.counts)  # slots past every class's count are empty and add nothing
        filled = self.ids[:, :used_slots] >= 0
        prototypes = memory_prototypes(query, self.memory[:, :used_slots], filled, self.text_features, config.beta)
        memory_probs = (self.scale * prototypes @ query).softmax(-1)
        final = probs[0] + config.fusion_weight * memory_probs
        distribution = final / (1 + config.fusion_weight)
        return Outcome(
            pred=int(final.argmax()), entropy_before=float(entropy(logits[0])),
            entropy_after=float(-(torch.special.xlogy(distribution, distribution)).sum()),
            appended=appended, deleted=deleted, buffer_size=sum(self.counts),
        )

    def snapshot(self) -> dict:
        """The memory as {class: [(id, entropy), ...]} over filled slots, in slot order."""
        return {label: [(int(self.ids[label, slot]), float(self.entropies[label, slot])) for slot in range(count)]
                for label, count in enumerate(self.counts) if count}
