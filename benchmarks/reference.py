"""The methods' rules written the plain way: the benchmark's baseline and the library's test oracle.

Each `Plain*` method follows the same rule as its library counterpart in `dynaprompt.methods`, without the
library's shortcuts:

- text runs at the full padded context length (77 tokens for ViT-B-16, 32 for tiny-clip), not truncated;
- the image encoder re-runs over the views on every pass (each tuning step, and the prediction), no cache;
- DynaPrompt holds every buffered prompt (+ v0 for the paper rule) in one parameter tensor: one forward pass
  with grad over all of them gives the metrics, the loss uses the selected ones and the backward pass runs
  through all of them (as the authors' code does); no text features are carried from sample to sample;
- selection, voting and scores are written out again here, not imported from the library;
- C-TPT and R-TPT (episodic) tune from v0 on every sample like TPT, with their own losses written out again: the
  text features of the pass with grad give C-TPT's dispersion, and R-TPT weights the tuned logits of every view
  by similarities of freshly encoded image features.

Given the views whose features the library reads from its cache, both must give the same predictions, the
same selections and the same entropies up to float rounding (tests/test_oracle.py, tests/test_oracle_episodic.py).
"""
from __future__ import annotations

import math
from collections import Counter
from typing import NamedTuple

import torch
import torch.nn.functional as F

from dynaprompt.methods import METHODS
from dynaprompt.methods.ctpt import Config as CTPTConfig
from dynaprompt.methods.rtpt import Config as RTPTConfig
from dynaprompt.model import LoadedClip
from dynaprompt.objectives import TuningConfig, autocast, make_grad_scaler
from dynaprompt.text import text_tower

from .clock import Clock


class Result(NamedTuple):
    """What a reference method says about one sample (the fields `records.Outcome` shares)."""

    pred: int
    entropy_before: float
    entropy_after: float
    selected: list[int]


class PlainCLIP:
    """Prompted CLIP as commonly written (CoOp/TPT): full padded context, image encoder on every call."""

    def __init__(self, clip: LoadedClip, classnames: list[str], n_ctx: int = 4, ctx_init: str = "a photo of a",
                 amp: bool = True):
        self.model = clip.model
        self.tower = text_tower(clip.model)
        self.device = clip.device
        self.amp = amp and self.device.type == "cuda"  # the image encoder's autocast, as features.ViewEncoder
        names = [name.replace("_", " ") for name in classnames]
        tokens = clip.tokenizer([f"{ctx_init} {name}." for name in names]).to(self.device)  # full length
        with torch.no_grad():
            embedded = self.tower.token_embedding(tokens)
        self.prefix, self.suffix = embedded[:, :1], embedded[:, 1 + n_ctx:]
        self.eot = tokens.argmax(-1)
        self.v0 = embedded[0, 1:1 + n_ctx].clone()
        self.scale = self.model.logit_scale.exp().detach()
        self.context_length = tokens.shape[1]

    def text_features(self, contexts: torch.Tensor) -> torch.Tensor:
        """[P, n_ctx, width] -> unit-norm [P, C, E]: every prompt x class through the whole text transformer."""
        n_prompts, n_classes = contexts.shape[0], self.prefix.shape[0]
        prompts = torch.cat([
            self.prefix.unsqueeze(0).expand(n_prompts, -1, -1, -1),
            contexts.unsqueeze(1).expand(-1, n_classes, -1, -1).to(self.prefix.dtype),
            self.suffix.unsqueeze(0).expand(n_prompts, -1, -1, -1),
        ], dim=2).reshape(n_prompts * n_classes, self.context_length, -1)
        x = prompts + self.tower.positional_embedding
        x = self.tower.transformer(x, attn_mask=self.tower.attn_mask)
        x = self.tower.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), self.eot.repeat(n_prompts)]
        projection = self.tower.text_projection
        x = projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection
        return F.normalize(x, dim=-1).reshape(n_prompts, n_classes, -1)

    def image_features(self, views: torch.Tensor) -> torch.Tensor:
        """Unit-norm fp32 features of a batch of views (fp16 autocast on GPU)."""
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            return self.model.encode_image(views, normalize=True).float()

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """[V, E] x [P, C, E] -> [V, P, C]."""
        return self.scale * torch.einsum("ve,pce->vpc", image_features.to(text_features.dtype), text_features)


# ----------------------------------------------------------------------------------------------- the rules


def plain_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax along the last axis."""
    logits = logits.float()
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)


def official_entropy(logits: torch.Tensor) -> torch.Tensor:
    """The authors' ranking entropy: `l = x - logsumexp(x)`, `-(l * exp(l)).sum()`, mean over views -> [P]."""
    log_probs = logits - logits.logsumexp(-1, keepdim=True)
    return (-(log_probs * log_probs.exp()).sum(-1)).mean(0)


def probability_difference(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """D per prompt [P]: confidence on the original view minus its mean over the augmented views."""
    # logit: each view's top logit; prob: each view's probability of the class the original view predicts
    if kind == "logit":
        confidence = logits.max(-1).values
    else:
        probs = logits.softmax(-1)
        predicted = probs[0].argmax(-1).expand(probs.shape[0], -1)
        confidence = probs.gather(-1, predicted.unsqueeze(-1)).squeeze(-1)
    return confidence[0] - confidence[1:].mean(0)


def n_confident(n_views: int, ratio: float) -> int:
    """round_down(ratio * n_views) views, at least one."""
    return max(1, int(ratio * n_views + 1e-9))


def marginal_entropy_loss(logits: torch.Tensor, ratio: float) -> torch.Tensor:
    """TPT's loss over [V, P, C]: mean over prompts of the entropy of the confident views' averaged softmax."""
    # confident: the lowest entropy, averaged over prompts
    keep = torch.argsort(plain_entropy(logits.detach()).mean(-1), stable=True)[:n_confident(len(logits), ratio)]
    log_probs = logits[keep].float().log_softmax(-1)
    log_mean = torch.logsumexp(log_probs, dim=0) - math.log(len(keep))
    return (-(log_mean.exp() * log_mean).sum(-1)).mean()


def authors_avg_entropy(logits: torch.Tensor) -> torch.Tensor:
    """The TPT authors' `avg_entropy` over [K, C]: entropy of the mean softmax, its log clamped at the dtype min."""
    log_probs = logits.float() - logits.float().logsumexp(-1, keepdim=True)
    log_mean = log_probs.logsumexp(0) - math.log(len(logits))
    log_mean = log_mean.clamp(min=torch.finfo(log_mean.dtype).min)
    return -(log_mean * log_mean.exp()).sum(-1)


def lowest_entropy_views(logits: torch.Tensor, ratio: float) -> torch.Tensor:
    """The n_confident rows of [V, C] logits with the lowest entropy of their own softmax."""
    return torch.argsort(plain_entropy(logits), stable=True)[:n_confident(len(logits), ratio)]


def average_text_feature_dispersion(text: torch.Tensor) -> torch.Tensor:
    """C-TPT's ATFD over class text features [C, E]: mean over classes of the L2 distance to their centroid."""
    text = text.float()
    centroid = text.mean(0)
    return torch.stack([torch.sqrt(((row - centroid) ** 2).sum()) for row in text]).mean()


def reliability(image: torch.Tensor, neighbours: int, temperature: float, self_similarity: str) -> torch.Tensor:
    """R-TPT's view weights: softmax over views of (mean of its top-k similarities to its neighbours) / temperature."""
    # no entry at similarity >= 1.0 in fp32 is a neighbour; "always_drop": nor is the view itself (where its own
    # entry rounds below 1.0, the authors' rule keeps it); k = min(neighbours, V - 1)
    n_views = len(image)
    if n_views == 1:
        return image.new_ones(1)
    k = min(neighbours, n_views - 1)
    similarity = (image.float() @ image.float().t()).tolist()
    scores = []
    for v, row in enumerate(similarity):
        others = sorted((s for u, s in enumerate(row) if s < 1.0 and (u != v or self_similarity == "authors")),
                        reverse=True)
        scores.append(sum(others[:k]) / k if len(others) >= k else float("-inf"))
    return torch.softmax(torch.tensor(scores, dtype=torch.float64) / temperature, dim=0).float().to(image.device)


def zero_vote(logits: torch.Tensor, ratio: float) -> int:
    """ZERO over [V, C] logits: the majority class of the confident views, ties broken as its authors do."""
    # a tie goes to the first less confident view voting for a tied class, else to the tied class with the
    # highest logit on the next view
    order = torch.argsort(plain_entropy(logits), stable=True).tolist()
    k = n_confident(len(order), ratio)
    votes = logits.argmax(-1).tolist()
    counts = Counter(votes[view] for view in order[:k])
    tied = sorted(c for c, n in counts.items() if n == max(counts.values()))
    if len(tied) == 1:
        return tied[0]
    for view in order[k:]:
        if votes[view] in tied:
            return votes[view]
    view = order[k] if k < len(order) else order[0]
    return max(tied, key=lambda c: float(logits[view, c]))


def paper_selection(h: torch.Tensor, d: torch.Tensor, config) -> list[int]:
    """Rows m >= 1 with lower entropy and higher D than v0 (row 0), by the config's criteria and margins."""
    selected = []
    for m in range(1, len(h)):
        lower = bool(h[m] < h[0] - config.entropy_margin)
        higher = bool(d[m] > d[0] + config.probdiff_margin)
        if {"both": lower and higher, "entropy_only": lower, "probdiff_only": higher}[config.criteria]:
            selected.append(m)
    return selected


def official_selection(h: torch.Tensor, d: torch.Tensor, init: int) -> list[int]:
    """The authors' rule over rows, to the letter: a list that can repeat, `init` last."""
    # r = the rank of `init` by descending entropy; the rows ranked after it (just `init` when it ranks last)
    # that are among the top-r by D, each mapped through the entropy ranking (the authors' indexing)
    by_entropy = torch.topk(h, len(h)).indices.tolist()
    rank = by_entropy.index(init)
    after = set(by_entropy[min(rank + 1, len(h) - 1):])
    top_d = set(torch.topk(d, len(d)).indices.tolist()[:rank])
    return [by_entropy[i] for i in sorted(after & top_d)] + [init]


# ----------------------------------------------------------------------------------------------- the methods


class PlainMethod:
    """A reference method: `reset()` at the start of a stream, then `(views) -> Result`; `clock` times its parts."""

    def __init__(self, plain: PlainCLIP, tuning: TuningConfig, config, clock: Clock | None = None):
        self.plain, self.tuning, self.config = plain, tuning, config
        self.clock = clock or Clock(plain.device)
        self.scaler = make_grad_scaler(plain.device, tuning)
        self.reset()

    def reset(self) -> None:
        """Nothing carried between samples."""

    def forward(self, views: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Logits [V, P, C]: the image encoder over all views, the text of every prompt with grad."""
        with autocast(self.plain.device, self.tuning):
            return self.plain.logits(self.plain.image_features(views), self.plain.text_features(params))

    def loss(self, logits: torch.Tensor) -> torch.Tensor:
        """TPT's loss on the confident views."""
        with autocast(self.plain.device, self.tuning):
            return marginal_entropy_loss(logits, self.tuning.confident_ratio)

    def optimizer(self, params: torch.Tensor) -> torch.optim.AdamW:
        """AdamW with fresh state."""
        t = self.tuning
        return torch.optim.AdamW([params], lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay)

    def step(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        """One scaled optimiser step."""
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()

    def predict(self, views: torch.Tensor, contexts: torch.Tensor, mentions: list[int]) -> torch.Tensor:
        """Logits [C] of the original view: its image features, a text pass of `contexts`, mean over mentions."""
        with self.clock("predict"), torch.no_grad():
            image = self.plain.image_features(views[:1])
            with autocast(self.plain.device, self.tuning):
                text = self.plain.text_features(contexts).float()
            return self.plain.logits(image, text)[0, mentions].mean(0)


def result(before: torch.Tensor, after: torch.Tensor, selected: list[int]) -> Result:
    """The prediction of the final logits and the entropies before and after."""
    return Result(int(after.argmax()), float(plain_entropy(before)), float(plain_entropy(after)), selected)


class PlainZeroShot(PlainMethod):
    """v0's text features once per stream; the image encoder on every sample's original view."""

    def reset(self):
        with torch.no_grad():
            self.text = self.plain.text_features(self.plain.v0.unsqueeze(0))

    def __call__(self, views):
        with self.clock("predict"), torch.no_grad():
            logits = self.plain.logits(self.plain.image_features(views[:1]), self.text)[0, 0]
        return result(logits, logits, [])


class PlainZero(PlainZeroShot):
    """ZERO: the image encoder over all views, the vote of the confident ones; the entropy of the original view."""

    def __call__(self, views):
        with self.clock("predict"), torch.no_grad():
            logits = self.plain.logits(self.plain.image_features(views), self.text)[:, 0]
            pred = zero_vote(logits, self.config.confident_ratio)
        uncertainty = float(plain_entropy(logits[0]))
        return Result(pred, uncertainty, uncertainty, [])


class PlainTPT(PlainMethod):
    """TPT: every sample starts from v0; `PlainOnlineTPT` from the prompt the last sample left."""

    online = False

    def reset(self):
        self.context = self.plain.v0.clone()

    def __call__(self, views):
        start = self.context if self.online else self.plain.v0
        params = start.clone().unsqueeze(0).requires_grad_(True)
        optimizer = self.optimizer(params)
        with self.clock("tune"):
            logits = self.forward(views, params)
        before = logits.detach()[0, 0]
        for step in range(self.tuning.steps):
            with self.clock("tune"):
                if step:
                    logits = self.forward(views, params)
                self.step(optimizer, self.loss(logits))
        self.context = params.detach()[0]
        return result(before, self.predict(views, params.detach(), [0]), [0])


class PlainOnlineTPT(PlainTPT):
    """Online TPT: each sample starts from the prompt the last one left."""

    online = True


class PlainDynaPrompt(PlainMethod):
    """DynaPrompt without the library's shortcuts: every pass recomputes every prompt's text features with grad."""

    def __init__(self, plain, tuning, config, clock=None):
        if not config.append:
            raise ValueError("the plain DynaPrompt implements `append: true` only")
        super().__init__(plain, tuning, config, clock)

    @property
    def official(self) -> bool:
        return self.config.selection == "official"

    def reset(self):
        self.contexts: dict[int, torch.Tensor] = {}
        self.uses: dict[int, int] = {}
        self.lru: list[int] = []  # least recently selected first
        self.next_id = 0
        if self.official:
            for _ in range(self.config.buffer_size):
                self._new()

    def _new(self) -> int:
        """A fresh prompt at v0, most recently used."""
        prompt_id, self.next_id = self.next_id, self.next_id + 1
        self.contexts[prompt_id], self.uses[prompt_id] = self.plain.v0.clone(), 0
        self.lru.append(prompt_id)
        return prompt_id

    def __call__(self, views):
        with self.clock("metrics"):
            if self.official and all(u > 0 for u in self.uses.values()):
                slot = self.lru[0]  # every slot used: the least recently used one goes back to v0
                self.contexts[slot], self.uses[slot] = self.plain.v0.clone(), 0
            ids = sorted(self.contexts)
            buffered = [self.contexts[i] for i in ids]
            stack = buffered if self.official else [self.plain.v0, *buffered]  # the paper rule scores v0 too
            # the official rule's parameter is every slot's offset from v0 (the authors' PromptLearner), so weight
            # decay pulls every slot toward v0 at every step; the paper rule's is each prompt itself
            base = self.plain.v0 if self.official else torch.zeros_like(self.plain.v0)
            params = (torch.stack(stack) - base).clone().requires_grad_(True)  # every prompt in the graph
            optimizer = self.optimizer(params)
            logits = self.forward(views, params + base)
            mentions, row_of = self._select(logits.detach().float(), ids)
            for prompt_id in mentions:
                self.lru.remove(prompt_id)
                self.lru.append(prompt_id)
                self.uses[prompt_id] += 1
        rows = [row_of[i] for i in mentions]
        before = logits.detach()[0, rows].float().mean(0)
        for step in range(self.tuning.steps):
            with self.clock("tune"):
                if step:
                    logits = self.forward(views, params + base)
                self.step(optimizer, self.loss(logits[:, rows]))  # backward through every row
        distinct = sorted(set(mentions))
        for prompt_id in (ids if self.official else distinct):  # official: every slot moved (weight decay)
            self.contexts[prompt_id] = (params.detach() + base)[row_of[prompt_id]].clone()
        tuned = torch.stack([self.contexts[i] for i in distinct])
        return result(before, self.predict(views, tuned, [distinct.index(i) for i in mentions]), mentions)

    def _select(self, logits: torch.Tensor, ids: list[int]) -> tuple[list[int], dict[int, int]]:
        """Selected prompt ids (repeats allowed) and each one's row in the parameter tensor."""
        h = official_entropy(logits) if self.official else plain_entropy(logits).mean(0)
        d = probability_difference(logits, self.config.probdiff_kind)
        if self.official:
            rows = official_selection(h, d, ids.index(self.lru[0]))
            return [ids[row] for row in rows], {prompt_id: row for row, prompt_id in enumerate(ids)}
        row_of = {prompt_id: row for row, prompt_id in enumerate(ids, start=1)}
        mentions = [ids[row - 1] for row in paper_selection(h, d, self.config)]
        if mentions:
            return mentions, row_of
        if len(self.contexts) >= self.config.buffer_size:
            victim = self.lru.pop(0)
            del self.contexts[victim], self.uses[victim]
        new = self._new()
        row_of[new] = 0  # a fresh prompt is v0: its row in the graph is v0's
        return [new], row_of


class PlainEpisodicTuning(PlainMethod):
    """C-TPT and R-TPT: from v0 every sample, the image encoder and full text with grad on every step.

    The confident views are chosen at the first step and kept for the later ones (the authors' `selected_idx`).
    """

    def __call__(self, views):
        params = self.plain.v0.clone().unsqueeze(0).requires_grad_(True)
        optimizer = self.optimizer(params)
        keep, before = None, None
        for _ in range(self.tuning.steps):
            with self.clock("tune"):
                with autocast(self.plain.device, self.tuning):
                    text = self.plain.text_features(params)  # [1, C, E]
                    logits = self.plain.logits(self.plain.image_features(views), text)[:, 0]  # [V, C]
                if before is None:
                    before = logits.detach()[0]
                    keep = lowest_entropy_views(logits.detach(), self.tuning.confident_ratio)
                with autocast(self.plain.device, self.tuning):
                    loss = self.objective(logits[keep], text[0])
                self.step(optimizer, loss)
        if before is None:  # no step: v0's logits
            with torch.no_grad():
                before = self.predict(views, params.detach(), [0])
        return result(before, self.final_logits(views, params.detach()), [0])

    def final_logits(self, views: torch.Tensor, contexts: torch.Tensor) -> torch.Tensor:
        """The tuned prompt on the original view."""
        return self.predict(views, contexts, [0])


class PlainCTPT(PlainEpisodicTuning):
    """C-TPT: TPT's entropy of the mean softmax minus lambda times the class text features' dispersion."""

    Config = CTPTConfig

    def objective(self, logits: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return authors_avg_entropy(logits) - self.config.lambda_term * average_text_feature_dispersion(text)


class PlainRTPT(PlainEpisodicTuning):
    """R-TPT: the mean of the confident views' own entropies; all views' tuned logits weighted by reliability."""

    Config = RTPTConfig

    def objective(self, logits: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return plain_entropy(logits).mean()

    def final_logits(self, views: torch.Tensor, contexts: torch.Tensor) -> torch.Tensor:
        with self.clock("predict"), torch.no_grad():
            image = self.plain.image_features(views)
            with autocast(self.plain.device, self.tuning):
                text = self.plain.text_features(contexts).float()
            logits = self.plain.logits(image, text)[:, 0].float()  # [V, C]
            config = self.config
            weights = reliability(image, config.neighbours, config.temperature, config.self_similarity)
            return weights @ logits


PLAIN = {"zero_shot": PlainZeroShot, "zero": PlainZero, "tpt": PlainTPT, "online_tpt": PlainOnlineTPT,
         "dynaprompt": PlainDynaPrompt, "ctpt": PlainCTPT, "rtpt": PlainRTPT}


def build_plain(kind: str, plain: PlainCLIP, tuning: TuningConfig, config=None, clock: Clock | None = None):
    """The reference of method `kind` with the library's config for it (the kind's defaults when None)."""
    return PLAIN[kind](plain, tuning, config if config is not None else METHODS[kind].Config(), clock)
