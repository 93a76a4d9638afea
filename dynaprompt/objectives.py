"""What the methods share: logits over views x prompts x classes, entropies, confident views, one tuning step."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .text import PromptTextEncoder


class NonFiniteError(ArithmeticError):
    """A NaN or infinity where a run needs numbers (features, logits, loss, contexts)."""


@dataclass(frozen=True)
class TuningConfig:
    """The test-time optimisation of TPT and its successors; the `tuning:` block of params.yaml."""

    lr: float = 5e-3  # 5e-3 for the ImageNet family, 3e-3 for the fine-grained sets
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    steps: int = 1
    confident_ratio: float = 0.1  # keep round_down(ratio * n_views) lowest-entropy views
    amp: bool = True  # autocast (fp16) + gradient scaling on GPU
    amp_on_cpu: bool = False  # also on CPU, in bfloat16 (how the tests run the mixed-precision path)
    grad_scale_init: float = 1000.0


def view_logits(view_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Logits [V, P, C] from image features [V, E] and text features [P, C, E]."""
    return scale * torch.einsum("ve,pce->vpc", view_features.to(text_features.dtype), text_features)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax along the last axis."""
    logits = logits.float()
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)


def n_confident(n_views: int, ratio: float) -> int:
    """round_down(ratio * n_views), at least one view."""
    return max(1, math.floor(ratio * n_views + 1e-9))


def confident_view_indices(logits: torch.Tensor, ratio: float) -> torch.Tensor:
    """Views with the lowest entropy, the entropy averaged over prompts; logits [V, P, C]."""
    per_view = entropy(logits).mean(-1)
    return torch.argsort(per_view, stable=True)[: n_confident(logits.shape[0], ratio)]


def marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per prompt, the entropy of the softmax averaged over views; logits [V, P, C] -> [P]."""
    log_probs = logits.float().log_softmax(-1)
    log_mean = torch.logsumexp(log_probs, dim=0) - math.log(logits.shape[0])
    return -(log_mean.exp() * log_mean).sum(-1)


def uses_amp(device: torch.device, config: TuningConfig) -> bool:
    return config.amp and (device.type == "cuda" or config.amp_on_cpu)


def autocast(device: torch.device, config: TuningConfig):
    """Autocast when mixed precision is on: fp16 on GPU, bfloat16 on CPU; a no-op context otherwise."""
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=uses_amp(device, config))


def make_grad_scaler(device: torch.device, config: TuningConfig) -> torch.amp.GradScaler:
    """One scaler per method instance, carried across samples as TPT's code does."""
    return torch.amp.GradScaler(device.type, enabled=uses_amp(device, config), init_scale=config.grad_scale_init)


@dataclass
class TuningRequest:
    """What one sample asks of the tuner, and what its method needs back to finish the sample.

    `contexts` [P, n_ctx, width] are the prompts the optimiser holds; `mentions` lists the rows the loss sees, as
    it sees them (a row named twice counts twice; None: every row once); `state` is the method's own note from
    `begin` to `finish`. `base` None: each context is its own parameter. `base` v0 [n_ctx, width]: the parameter
    is the offset `context - base` (DynaPrompt's authors' parameterisation), so AdamW's decoupled weight decay
    pulls every row toward v0 at every step, whether the loss saw it or not; only the mentioned rows are encoded
    with grad.
    """

    contexts: torch.Tensor
    view_features: torch.Tensor
    mentions: list[int] | None = None
    state: object = None
    base: torch.Tensor | None = None
    reencode: list[int] | None = None  # rows the prediction pass encodes (None: all); the others did not move

    def parameters(self) -> torch.Tensor:
        """A fresh leaf to optimise: the contexts, or their offsets from `base`."""
        return fresh_parameters(self.contexts if self.base is None else self.contexts - self.base)

    def encoded(self, params: torch.Tensor) -> tuple[torch.Tensor, list[int] | None]:
        """The contexts the loss encodes (with grad) and the loss's mentions of them."""
        if self.base is None:
            return params, self.mentions
        rows = sorted(set(self.mentions if self.mentions is not None else range(params.shape[0])))
        where = {row: k for k, row in enumerate(rows)}
        mentions = [where[row] for row in (self.mentions if self.mentions is not None else rows)]
        return params[rows] + self.base, mentions

    def tuned(self, params: torch.Tensor) -> torch.Tensor:
        """Every row's context after the steps."""
        return params.detach() if self.base is None else (params + self.base).detach()


def fresh_parameters(contexts: torch.Tensor) -> torch.Tensor:
    """A leaf copy of `contexts` to optimise; the caller's tensor is never touched."""
    return contexts.detach().clone().requires_grad_(True)


def make_optimizer(params: list[torch.Tensor], config: TuningConfig) -> torch.optim.AdamW:
    """AdamW with fresh state, as every sample gets."""
    return torch.optim.AdamW(
        params, lr=config.lr, betas=tuple(config.betas), eps=config.eps, weight_decay=config.weight_decay
    )


def tuning_loss(
    features: torch.Tensor, view_features: torch.Tensor, scale: torch.Tensor, config: TuningConfig,
    mentions: list[int] | None = None,
) -> torch.Tensor:
    """Mean marginal entropy over the confident views, for the prompts whose text features are `features` [U, C, E]."""
    if mentions is not None:
        features = features[mentions]
    logits = view_logits(view_features, features, scale)
    keep = confident_view_indices(logits.detach(), config.confident_ratio)
    return marginal_entropy(logits[keep]).mean()


def tune_contexts(
    text: PromptTextEncoder,
    contexts: torch.Tensor,
    view_features: torch.Tensor,
    config: TuningConfig,
    scaler: torch.amp.GradScaler,
    mentions: list[int] | None = None,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """`config.steps` AdamW steps on the mean marginal entropy of the confident views; fresh optimiser state.

    `contexts` [P, n_ctx, width] are the prompts being tuned; `mentions` lists the rows as the loss sees them (a
    prompt named twice counts twice), defaulting to each once; `base` as in `TuningRequest`.
    """
    request = TuningRequest(contexts, view_features, mentions, base=base)
    params = request.parameters()
    optimizer = make_optimizer([params], config)
    scale = text.logit_scale()
    for _ in range(config.steps):
        encoded, seen = request.encoded(params)
        with autocast(view_features.device, config):
            loss = tuning_loss(text.encode(encoded), view_features, scale, config, seen)
        check_finite(loss, "loss")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return check_finite(request.tuned(params), "tuned contexts")


def check_finite(tensor: torch.Tensor, what: str) -> torch.Tensor:
    """`tensor`, or a NonFiniteError naming `what` (under fp16 a skipped step leaves the contexts finite)."""
    if not torch.isfinite(tensor).all():
        raise NonFiniteError(what)
    return tensor


def tune_and_finish(method, view_features: torch.Tensor):
    """One sample through a tuning method: `begin` (select, score), one tuning, one prediction pass, `finish`.

    `method` has `text`, `tuning`, `scaler`, `begin(view_features) -> TuningRequest` and
    `finish(request, tuned_contexts, tuned_features) -> Outcome`; `benchmarks/lockstep.py` drives the same
    two halves for several streams at once.
    """
    request = method.begin(view_features)
    tuned = tune_contexts(
        method.text, request.contexts, request.view_features, method.tuning, method.scaler, request.mentions,
        request.base,
    )
    return method.finish(request, tuned, encode_for_prediction(method.text, rows_to_encode(request, tuned),
                                                                method.tuning))


def rows_to_encode(request: TuningRequest, tuned: torch.Tensor) -> torch.Tensor:
    """The tuned contexts whose text features the prediction pass computes (`finish` receives them in order)."""
    return tuned if request.reencode is None else tuned[request.reencode]


@torch.no_grad()
def encode_for_prediction(text: PromptTextEncoder, contexts: torch.Tensor, config: TuningConfig) -> torch.Tensor:
    """Text features [P, C, E] of tuned contexts, without grad, in fp32."""
    with autocast(contexts.device, config):
        return text.encode(contexts).float()


def original_view_logits(view_features: torch.Tensor, text_features: torch.Tensor, scale) -> torch.Tensor:
    """Logits [C] of the original view (row 0), averaged over the prompts of `text_features` [P, C, E]."""
    return view_logits(view_features[:1], text_features, scale)[0].mean(0)
