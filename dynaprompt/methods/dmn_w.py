"""DMN-W: DMN's zero-shot memory (Zhang et al., CVPR 2024) on the weakly augmented image alone, as tta-vlm runs it.

"DMN-W" is TomSheng21/tta-vlm's name (its `--algorithm dmn_weak`). Read from tta-vlm @ bcc735f:
`online_method/dmn_weak.py` (`MemoryBank`, `Entropy`, `DMN_WEAK.adaptation_process`) and `online_tta.py`. The DMN
authors' repository (YBZh/DMN @ c6c218c, read for `dmn.py`) has no such variant: DMN-W is tta-vlm's own reading
of DMN-ZS with TDA's input, one resized and centre-cropped image and no augmented views.

- Input (`online_tta.py:L132-L146`): `dmn_weak` is in the 'base' group with TDA, ECALP, OnZeta and zero-shot: one
  resized, centre-cropped image per sample, `-b 1`. Here that is view 0 of the cached views; the other views are not
  read, so the augmentation seed does not reach the method.
- Text classifier (`online_tta.py:L191-L192`, `get_coop`; `clip/custom_clip.py:get_text_features`): the CoOp
  prompt learner at `--ctx_init a_photo_of_a`, one prompt per class, unit norm. Here that is v0 (no `templates`);
  a `templates:` set swaps in an ensemble (DMN's authors ensemble Tip's templates and CuPL's descriptions).
- Logits (`dmn_weak.py:L92-L94`): logit_scale * f . T with the model's own scale (`forward_features` returns
  `logit_scale.exp()`; no literal), so DMN-W has no `logit_scale` option. f is the unit-norm image feature.
- Pseudo-label (`dmn_weak.py:L97`): the zero-shot argmax of the image's own logits, no confident-view average.
- Entropy stored with the feature (`dmn_weak.py:L63-L68`, L96): -sum p log(p + 1e-5) of the zero-shot softmax.
- Memory update (`dmn_weak.py:MemoryBank.update`, L16-L29): 50 slots per class (L78).
  - A class that is not full takes the feature in its next free slot.
  - A full class ALWAYS replaces its highest-entropy slot (L27-L29: `torch.sort(..., descending=True)[1][0]`), even
    when the newcomer's entropy is higher. That is `replacement: always`. Among tied maxima the lowest slot index
    is replaced, as a stable descending sort gives (CUDA's sort leaves ties unspecified).
  - `replacement: lower` is the DMN authors' rule instead (`dmn_main.py:DualMem.update_memory_bank`, read in
    `dmn.py`): replace only if the newcomer's entropy is lower than some stored entropy.
- Read-out (`dmn_weak.py:MemoryBank.read_out`, L36-L60): per class, its filled slots plus its text feature, each
  normalised; weights exp(-5.5 (1 - f . slot)) (beta 5.5, L76); prototype normalise(sum weight * slot). That is
  `dmn.memory_prototypes` (stored features are unit norm; here a feature is normalised once, when stored).
  p_mem = softmax(logit_scale * f . prototypes).
- Order (`adaptation_process`, L100-L101): the memory is updated BEFORE the read-out, so a sample reads itself.
- Fusion (L105): final = p_zs + 1.0 * p_mem (alpha 1.0, L77) on every dataset. The DMN authors' weight is searched
  per dataset on the test labels (3.0 on ImageNet-A, see `dmn.py`); tta-vlm fixes it at 1.0.

DMN-W against tta-vlm's DMN (`online_method/dmn.py`, the same file but for L71-L74 and L102-L116) and the
authors' DMN-ZS (`dmn.py` here): those label a sample from the mean of its 10% most confident of 64 (tta-vlm) or
32 (authors) augmented views and store view 0; DMN-W sees view 0 alone. Neither paper's text could be checked
for a DMN-W.

Records:
- Every feature put into memory gets the next integer id, reset by `reset()`.
- `appended`: the id stored at this sample (under `always`, every sample stores one). `deleted`: the id it
  replaced. An entry is one sample's unit-norm view-0 feature with its zero-shot entropy, in the slot of its
  pseudo-class.
- `buffer_size`: the number of filled slots over all classes.
- `entropy_before`: the entropy of p_zs. `entropy_after`: the entropy of final / (1 + fusion_weight).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..objectives import TuningConfig, entropy
from ..records import Outcome
from ..text import PromptTextEncoder
from .dmn import DMN, eps_entropy, memory_prototypes

REPLACEMENTS = ("always", "lower")


@dataclass(frozen=True)
class Config:
    """DMN-W's constants (tta-vlm online_method/dmn_weak.py), the same on every dataset."""

    memory_length: int = 50  # slots per class (dmn_weak.py:L78 max_len)
    beta: float = 5.5  # read-out sharpness, exp(-beta (1 - sim)) (dmn_weak.py:L76)
    fusion_weight: float = 1.0  # p_zs + w p_mem (dmn_weak.py:L77 alpha, L105)
    entropy_eps: float = 1e-5  # stored entropy -sum p log(p + eps) (dmn_weak.py:L65)
    replacement: str = "always"  # full class: always (dmn_weak.py:L27-L29) | lower (DMN authors' update_memory_bank)

    def __post_init__(self):
        if self.memory_length < 1:
            raise ValueError("memory_length must be >= 1")
        if self.replacement not in REPLACEMENTS:
            raise ValueError(f"replacement must be one of {REPLACEMENTS}, got {self.replacement!r}")


class DMNW(DMN):
    """Per sample: label view 0 zero-shot, store it in that class's memory, read the memory with view 0."""

    Config = Config
    order_independent = False
    uses_templates = True

    def __init__(self, text: PromptTextEncoder, tuning: TuningConfig, config: Config | None = None, templates=None):
        super().__init__(text, tuning, config if config is not None else Config(), templates)

    def store(self, label: int, feature: torch.Tensor, value: float) -> tuple[list[int], list[int]]:
        """Insert into class `label`'s memory; a full class replaces its highest-entropy slot (`replacement`)."""
        if self.config.replacement == "lower" or self.counts[label] < self.config.memory_length:
            return super().store(label, feature, value)
        slot = int(torch.argsort(self.entropies[label], descending=True, stable=True)[0])
        deleted = [int(self.ids[label, slot])]
        self.memory[label, slot] = feature
        self.entropies[label, slot] = value
        self.ids[label, slot] = self.next_id
        self.next_id += 1
        return [int(self.ids[label, slot])], deleted

    @torch.no_grad()
    def __call__(self, view_features: torch.Tensor) -> Outcome:
        config = self.config
        query = F.normalize(view_features[0].float(), dim=-1)
        logits = self.scale * self.text_features @ query
        probs = logits.softmax(-1)
        appended, deleted = self.store(int(logits.argmax()), query, float(eps_entropy(probs, config.entropy_eps)))
        used_slots = max(self.counts)  # slots past every class's count are empty and add nothing
        filled = self.ids[:, :used_slots] >= 0
        prototypes = memory_prototypes(query, self.memory[:, :used_slots], filled, self.text_features, config.beta)
        memory_probs = (self.scale * prototypes @ query).softmax(-1)
        final = probs + config.fusion_weight * memory_probs
        distribution = final / (1 + config.fusion_weight)
        return Outcome(
            pred=int(final.argmax()), entropy_before=float(entropy(logits)),
            entropy_after=float(-(torch.special.xlogy(distribution, distribution)).sum()),
            appended=appended, deleted=deleted, buffer_size=sum(self.counts),
        )
