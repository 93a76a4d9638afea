"""DPE (Zhang et al., NeurIPS 2024, "Dual Prototype Evolving"): textual prototypes that evolve over the stream, a
cache of visual prototypes, and per-sample learnable residuals on both, stepped once by AdamW.

Read from the authors' code, zhangce01/DPE-CLIP @ fecae5a (MIT). The method is unchanged since the upload
9b4653c; the later commits touch README.md and LICENSE and delete an unused tda_runner.py. Everything below is
`main_dpe.py:run_test_dpe` and the helpers it calls in `main_dpe.py` and `utils.py`, in the order they run for
one sample:

- Text classifier (`utils.py:clip_classifier`): the normalised mean of each class's normalised embeddings of
  the dataset's templates *and* its CuPL GPT-3 descriptions (`gpt3_prompts/*.json`). Here it is
  `zero_shot.classifier(text, templates)`. CuPL's descriptions are not shipped; add them as a template set
  under `templates:` to match the published numbers.
- Logit scale: the authors write the literal 100 (`utils.py:146` in `get_clip_logits`,
  `clip_logits = 100. * image_features @ clip_weights`), not the model's `logit_scale`; every logit below is
  scaled by it. `Config.logit_scale` "authors" (the default) uses the literal, "model" the model's own scale.
  They are equal on OpenAI CLIP. On a model with another scale (the bundled one: about 15) the literal changes the
  confident views, the cache's entropies, the balance of the clip logits against the cache read-out (and of the
  entropy term against InfoNCE, whose temperature is its own) in the step, and the evolution gate.
- State carried from sample to sample: the global textual prototypes T_g [C, E] (`clip_weights_global`,
  T at the start) with their update count n, and the positive cache.
- 1. Query (`utils.py:get_clip_logits`, called with W = normalise(T_g + r_T) and r_T = 0), by `Config.query`:
  - "confident": the authors' I/A/V/R/S loader gives 64 AugMix views (`utils.py:get_preprocess`). Take the
    int(0.1 * n_views) lowest-entropy views, view 0 competing like any other. The query feature x is the
    *unnormalised* mean of their features, the query logits the mean of their logits. The entropy is that of
    their mean softmax (`utils.py:avg_entropy`) and the pseudo-label the argmax of the mean logits.
  - "original": the fine-grained sets, where the authors' loader gives the single CLIP-preprocessed image.
    Everything comes from view 0.
- 2. Cache update (`main_dpe.py:update_cache`, TDA's rule). The entry is (x, H / log2 C), stored under the
  pseudo-label (`utils.py:get_entropy`: nats over bits, as in TDA). A class takes entries while it holds fewer
  than 3 (configs/*.yaml `shot_capacity`). When it is full, the newcomer replaces the last (highest-entropy)
  entry only if its entropy is strictly lower. Each class list is kept sorted by ascending entropy.
- 3. Visual prototypes (`main_dpe.py:cache_key_value`): per class in the cache, the mean of its stored
  features. Classes with no entry have no prototype.
- 4. Residuals (`main_dpe.py:TextResidue`, `PositiveCacheResidue`), fresh zeros at every sample: r_T [C, E] on the
  textual prototypes, r_V on the visual ones. W = normalise(T_g + r_T) and K = normalise(P + r_V), each per
  class.
- 5. One step (`steps = 1` in `run_test_dpe`):
  - final = scale * x . W + alpha * exp(-(beta - beta * x . K_c)) on each class c in the cache
    (`compute_cache_logits`). The first term is the mean of the query views' logits, through r_T.
  - loss = H(softmax(final)) + align * InfoNCE(K, W over the cached classes).
  - InfoNCE is info-nce-pytorch's `InfoNCE(temperature=0.01)` with no explicit negatives (`InfoNCELoss`).
    It normalises both sides and takes the cross-entropy of K_c . W_j / 0.01 against j = c, over the cached
    classes j, averaged over the cached classes c. It is one-sided: image to text.
  - A fresh AdamW (lr `learning_rate.text` on r_T, `learning_rate.image` on r_V, eps 1e-3, weight decay 0.1,
    default betas) takes one step.
- 6. Prediction (no grad), with the stepped residuals: W' = normalise(T_g + r_T), K' = normalise(P + r_V).
  - The query comes from `Config.inference_query`:
    - "confident" is the authors' branch for dataset 'A' only. `get_clip_logits` runs again on all views
      under W', so the confident views are re-ranked with W'.
    - "original" is every other set: view 0 alone.
  - final = clip_logits + alpha * exp(-(beta - beta * q . K'_c)) over the cached classes; pred = argmax(final).
- 7. Textual prototype evolution: if H(softmax(final)) / log2 C < 0.1, then n += 1 and
  T_g <- T_g * n / (n + 1) + W' / (n + 1). This is a cumulative average that counts the initial prototypes
  once. T_g itself is not renormalised; W normalises it at every use.

Paper, code and tta-vlm:
- The paper's text beyond its abstract was not available here; its abstract (two prototype sets that evolve,
  learnable residuals aligning them per sample) matches the code.
- tta-vlm (TomSheng21/tta-vlm @ bcc735f, online_method/dpe.py) differs from the authors in six places. The
  authors are followed in each:
  1. It computes the query logits under no_grad, so the entropy term never reaches r_T. In tta-vlm, r_T
     moves only by the alignment loss.
  2. It ranks the cache by the entropy of the softmax of the mean logits, -sum p log(p + 1e-5), not the
     entropy of the mean softmax.
  3. On ImageNet-A it re-ranks the confident views under W', but reads the cache with the *first* query
     feature. The authors read it with the re-ranked one.
  4. It uses the confident views on every dataset, the fine-grained ones included. Its ImageNet-family views
     are crop + flip without AugMix; the authors' are AugMix.
  5. Its SUN397 align weight is 0.0002; the authors' configs/sun397.yaml has 0.2.
  6. It takes its classifier from a single prompt, without templates or CuPL.
  7. Its query and step use the model's `logit_scale`, its read-out the literal 100 (online_method/dpe.py L163-165,
     L215, L223); the authors use 100 in both.
- The number of confident views is `objectives.n_confident` = floor(0.1 * n_views), at least 1. That is the
  authors' int(0.1 * n_views) from 10 views on; below 10 views their code would average an empty selection.
  The ranking is a stable sort, where the authors' argsort leaves ties unspecified.
- `steps` > 1 re-runs the whole forward at the current residuals, with a fresh AdamW per step as in the
  authors' loop. Their own multi-step path would backpropagate the first query logits again, through
  retain_graph. Their setting is 1.
- fp32 throughout. The authors run under autocast with fp16 residuals, so a difference at fp16 rounding is
  the only one expected. The residuals are stepped on the cached view features; the image encoder gets no
  gradient in the authors' code either (only r_T and r_V are in the optimiser).
- Storage: the cache lives on the device in per-class slots ([C, 3, E] features, entropies with +inf for an
  empty slot, ids with -1). TDA's rule is applied as "append, stable sort by entropy, keep 3", which is the
  same rule. The classes without entries are masked, not dropped, in the read-out and in InfoNCE. Their
  residual rows get zero gradient, so AdamW leaves them at zero. The only host reads per sample are the
  scalars of the outcome, in one transfer at the end.

Records:
- Every entry put into the cache gets the next integer id (a counter reset by `reset()`); a rejected newcomer
  gets none.
- `appended`: the id stored at this sample. `deleted`: the id it replaced.
- `buffer_size`: the number of cache entries after the sample. The C textual prototypes are fixed slots; their
  update count n is in `snapshot()` and the state.
- `selected` is empty.
- `entropy_before`: H(softmax) of the query logits under the current T_g with zero residual (for "confident"
  the mean logits). `entropy_after`: H(softmax(final)), the entropy that gates the textual evolution.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..objectives import TuningConfig, entropy, marginal_entropy
from ..records import Outcome
from ..text import PromptTextEncoder
from .tda import class_logits, confident_views
from .zero_shot import LOGIT_SCALES, chosen_logit_scale, classifier

QUERIES = ("confident", "original")
AUTHORS_LOGIT_SCALE = 100.0  # utils.py:146 (get_clip_logits) `clip_logits = 100. * image_features @ clip_weights`


@dataclass(frozen=True)
class Config:
    """DPE's constants at the authors' ImageNet-A setting (zhangce01/DPE-CLIP configs/imagenet_a.yaml, main_dpe.py)."""

    query: str = "confident"  # cache/step query (get_clip_logits): confident views (I/A/V/R/S) | original: fine-grained
    inference_query: str = "confident"  # read-out (run_test_dpe): confident views (dataset 'A') | original: view 0
    confident_ratio: float = 0.1  # utils.py:get_clip_logits, int(n_views * 0.1) views
    shot_capacity: int = 3  # cache entries per class (configs/*.yaml positive.shot_capacity)
    alpha: float = 6.0  # cache weight (configs/imagenet_a.yaml positive.alpha)
    beta: float = 5.0  # cache sharpness (configs/imagenet_a.yaml positive.beta)
    lr_text: float = 3e-4  # AdamW lr of the textual residual (configs/imagenet_a.yaml learning_rate.text)
    lr_image: float = 3e-4  # AdamW lr of the visual residual (configs/imagenet_a.yaml learning_rate.image)
    align: float = 2.5  # weight of the image-to-text InfoNCE (configs/imagenet_a.yaml learning_rate.align)
    align_temperature: float = 0.01  # main_dpe.py:InfoNCELoss, InfoNCE(temperature=0.01)
    adam_eps: float = 1e-3  # main_dpe.py:run_test_dpe, AdamW param groups 'eps'
    weight_decay: float = 0.1  # main_dpe.py:run_test_dpe, AdamW param groups 'weight_decay'
    adam_betas: tuple[float, float] = (0.9, 0.999)  # AdamW's defaults, which run_test_dpe keeps
    steps: int = 1  # main_dpe.py:run_test_dpe, `steps = 1 # Update step, set to 1 in default`
    evolve_threshold: float = 0.1  # run_test_dpe: T_g averages W' in when H(final) / log2(C) < 0.1
    logit_scale: str = "authors"  # authors: utils.py:146's literal 100 (AUTHORS_LOGIT_SCALE) | model: the model's own

    def __post_init__(self):
        for name, allowed in (("query", QUERIES), ("inference_query", QUERIES), ("logit_scale", LOGIT_SCALES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.shot_capacity < 1 or self.steps < 1:
            raise ValueError("shot_capacity and steps must be >= 1")
        if self.align_temperature <= 0:
            raise ValueError("align_temperature must be > 0")


def query_views(logits: torch.Tensor, query: str, ratio: float) -> torch.Tensor:
    """The views the query averages: view 0 ("original") or the confident ones, most confident first."""
    if query == "original":
        return torch.zeros(1, dtype=torch.long, device=logits.device)
    return confident_views(logits, ratio)


def cache_logits(query: torch.Tensor, keys: torch.Tensor, present: torch.Tensor, alpha: float,
                 beta: float) -> torch.Tensor:
    """alpha * exp(-(beta - beta * q . k_c)) per class [C], 0 for a class with no cache entry."""
    return alpha * torch.exp(-(beta - beta * (keys @ query))) * present


def alignment_loss(image_keys: torch.Tensor, text: torch.Tensor, present: torch.Tensor,
                   temperature: float) -> torch.Tensor:
    """info-nce-pytorch's InfoNCE(image_keys[present], text[present]) with the other classes' texts as negatives.

    Mean over the cached classes c of -log softmax_j(cos(k_c, t_j) / temperature)[c], j over the cached classes.
    """
    logits = F.normalize(image_keys, dim=-1) @ F.normalize(text, dim=-1).t() / temperature
    log_probs = logits.masked_fill(~present, float("-inf")).log_softmax(-1)
    return -log_probs.diagonal().masked_fill(~present, 0.0).sum() / present.sum()


class DPE:
    """Per sample: query, cache update, one AdamW step on fresh residuals, prediction, textual evolution."""

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
        """T_g = T, no evolution yet, an empty cache and a fresh id counter."""
        n_classes, dim = self.text_features.shape
        capacity, device = self.config.shot_capacity, self.text_features.device
        self.text_global = self.text_features.clone()
        self.n_evolved = torch.zeros((), device=device)
        self.features = torch.zeros(n_classes, capacity, dim, device=device)
        self.entropies = torch.full((n_classes, capacity), math.inf, device=device)
        self.ids = torch.full((n_classes, capacity), -1, dtype=torch.long, device=device)
        self.next_id = 0

    def state_dict(self) -> dict:
        return {"text_global": self.text_global.clone(), "n_evolved": self.n_evolved.clone(),
                "features": self.features.clone(), "entropies": self.entropies.clone(), "ids": self.ids.clone(),
                "next_id": self.next_id}

    def load_state_dict(self, state: dict) -> None:
        for name in ("text_global", "n_evolved", "features", "entropies", "ids"):
            getattr(self, name).copy_(state[name])
        self.next_id = int(state["next_id"])

    def insert(self, label: torch.Tensor, feature: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """TDA's rule on class `label`'s slots: append, stable sort by entropy, keep `shot_capacity`.

        `label` is a one-element index tensor (so the device never waits on it). Returns the id of the entry that
        fell off: -1 (an empty slot), the newcomer's (rejected) or a stored one.
        """
        capacity = self.config.shot_capacity
        new_id = torch.full((1,), self.next_id, dtype=torch.long, device=self.ids.device)
        features = torch.cat([self.features[label][0], feature.unsqueeze(0)])
        entropies = torch.cat([self.entropies[label][0], value.reshape(1)])
        ids = torch.cat([self.ids[label][0], new_id])
        order = torch.sort(entropies, stable=True).indices  # empty slots hold +inf; the newcomer sorts after ties
        self.features[label] = features[order[:capacity]].unsqueeze(0)
        self.entropies[label] = entropies[order[:capacity]].unsqueeze(0)
        self.ids[label] = ids[order[:capacity]].unsqueeze(0)
        return ids[order[capacity]]

    def prototypes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Visual prototypes P [C, E], the mean of each class's entries (0 without any), and which classes have one."""
        filled = self.ids >= 0
        counts = filled.sum(1)
        summed = (self.features * filled.unsqueeze(-1)).sum(1)
        return summed / counts.clamp(min=1).unsqueeze(-1), counts > 0

    def step(self, selected: torch.Tensor, query: torch.Tensor, prototypes: torch.Tensor,
             present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`steps` AdamW steps on fresh zero residuals (r_T, r_V) of the entropy + align * InfoNCE loss."""
        config = self.config
        with torch.enable_grad():
            text_residual = torch.zeros_like(self.text_global, requires_grad=True)
            image_residual = torch.zeros_like(prototypes, requires_grad=True)
            for _ in range(config.steps):
                optimizer = torch.optim.AdamW(
                    [{"params": [text_residual], "lr": config.lr_text},
                     {"params": [image_residual], "lr": config.lr_image}],
                    betas=tuple(config.adam_betas), eps=config.adam_eps, weight_decay=config.weight_decay)
                text = F.normalize(self.text_global + text_residual, dim=-1)
                keys = F.normalize(prototypes + image_residual, dim=-1)
                final = class_logits(selected, text, self.scale).mean(0)
                final = final + cache_logits(query, keys, present, config.alpha, config.beta)
                loss = entropy(final) + config.align * alignment_loss(keys, text, present, config.align_temperature)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return text_residual.detach(), image_residual.detach()

    @torch.no_grad()
    def __call__(self, view_features: torch.Tensor) -> Outcome:
        config = self.config
        views = view_features.float().clone()  # a plain tensor, whatever mode the caller built it in
        logits = class_logits(views, F.normalize(self.text_global, dim=-1), self.scale)
        keep = query_views(logits, config.query, config.confident_ratio)
        query, query_logits = views[keep].mean(0), logits[keep].mean(0)
        value = marginal_entropy(logits[keep].unsqueeze(1))[0]  # of the mean softmax; view 0's own for "original"
        dropped = self.insert(query_logits.argmax().reshape(1), query, value / math.log2(self.n_classes))
        prototypes, present = self.prototypes()
        text_residual, image_residual = self.step(views[keep], query, prototypes, present)

        text = F.normalize(self.text_global + text_residual, dim=-1)
        keys = F.normalize(prototypes + image_residual, dim=-1)
        all_logits = class_logits(views, text, self.scale)
        read = query_views(all_logits, config.inference_query, config.confident_ratio)
        final = all_logits[read].mean(0) + cache_logits(views[read].mean(0), keys, present, config.alpha, config.beta)
        after = entropy(final)
        self.evolve(text, after / math.log2(self.n_classes) < config.evolve_threshold)

        pred, before, after, dropped, size = torch.stack([
            final.argmax().double(), entropy(query_logits).double(), after.double(), dropped.double(),
            (self.ids >= 0).sum().double()]).tolist()
        new_id, kept = self.next_id, int(dropped) != self.next_id
        self.next_id += int(kept)
        return Outcome(pred=int(pred), entropy_before=before, entropy_after=after,
                       appended=[new_id] if kept else [], deleted=[int(dropped)] if kept and dropped >= 0 else [],
                       buffer_size=int(size))

    def evolve(self, text: torch.Tensor, confident: torch.Tensor) -> None:
        """Where `confident`: n += 1 and T_g <- T_g * n / (n + 1) + W' / (n + 1) (a cumulative average)."""
        count = self.n_evolved + confident
        averaged = self.text_global * (count / (count + 1)) + text * (1 / (count + 1))
        self.text_global = torch.where(confident, averaged, self.text_global)
        self.n_evolved = count

    def snapshot(self) -> dict:
        """{"cache": {class: [(id, entropy), ...]}, "n_evolved": n}, read from the device (for inspection and tests)."""
        ids, entropies = self.ids.tolist(), self.entropies.tolist()
        cache = {label: [(i, e) for i, e in zip(ids[label], entropies[label]) if i >= 0]
                 for label in range(self.n_classes) if ids[label][0] >= 0}
        return {"cache": cache, "n_evolved": int(self.n_evolved)}
