"""The methods' rules written the plain way: the benchmark's baseline and the library's test oracle.

Each `Plain*` method follows the same rule as its library counterpart in `dynaprompt.methods`, without the
library's shortcuts:

- text runs at the full padded context length (77 tokens for ViT-B-16, 32 for tiny-clip), not truncated;
- the image encoder re-runs over the views on every pass (each tuning step, and the prediction), no cache;
- DynaPrompt holds every buffered prompt (+ v0 for the paper rule) in one parameter tensor: one forward pass
  with grad over all of them gives the metrics, the loss uses the selected ones and the backward pass runs
  through all of them (as the authors' code does); no text features are carried from sample to sample;
- selection, voting and scores are written out again here, not imported from the library.

Given the views whose features the library reads from its cache, both must give the same predictions, the
same selections and the same entropies up to float rounding (tests/test_oracle.py).
"""
from __future__ import annotations

import math
from collections import Counter
from typing import NamedTuple

import torch
import torch.nn.functional as F

from dynaprompt.methods import METHODS
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
            params = torch.stack(stack).clone().requires_grad_(True)  # every prompt in the graph
            optimizer = self.optimizer(params)
            logits = self.forward(views, params)
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
                    logits = self.forward(views, params)
                self.step(optimizer, self.loss(logits[:, rows]))  # backward through every row
        distinct = sorted(set(mentions))
        for prompt_id in distinct:
            self.contexts[prompt_id] = params.detach()[row_of[prompt_id]].clone()
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


PLAIN = {"zero_shot": PlainZeroShot, "zero": PlainZero, "tpt": PlainTPT, "online_tpt": PlainOnlineTPT,
         "dynaprompt": PlainDynaPrompt}


def build_plain(kind: str, plain: PlainCLIP, tuning: TuningConfig, config=None, clock: Clock | None = None):
    """The reference of method `kind` with the library's config for it (the kind's defaults when None)."""
    return PLAIN[kind](plain, tuning, config if config is not None else METHODS[kind].Config(), clock)
