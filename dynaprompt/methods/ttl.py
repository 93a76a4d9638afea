"""TTL (Imam et al., 2024, arXiv 2407.15913, "Test-Time Low Rank Adaptation via Confidence Maximization for Zero-Shot
Generalization of Vision-Language Models"), episodic: LoRA adapters in the image tower, one weighted-entropy step.

Read from the authors' code, Razaimam45/TTL-Test-Time-Low-Rank-Adaptation @ cc754df (2024-08-18; the files read last
changed in f0df42c): `ttl.py` (`main_worker`, `test_time_tuning`, `test_time_adapt_eval`), `deyo.py` (`DeYO`,
`forward_and_adapt_sar`), `clip/custom_clip.py` (`LoRA_AB`, `ClipTestTimeTuning.__init__`, `inference`) and
`scripts/test_ttl.sh`. Nothing of the text side is tuned; the adapters change the image features, so TTL cannot read
cached view features: it is given the views' pixels (`reads_images`) and runs a private copy of the image tower of
`text.model`.

- Adapters (`custom_clip.py:L583-L600`, `LoraConfig(r=rank, lora_alpha=32, target_modules=["q_proj", "v_proj"])`
  through peft): rank r = 16 (`test_ttl.sh:L18`) on the query and value projections of the attention, scaling
  alpha / r = 2. A projection's output becomes x W^T + b + 2 (x A) B, A [width, r], B [r, width]. Only the blocks
  of `--layer_range 9,11` (`test_ttl.sh:L15`, inclusive, `ttl.py:L159-L161`, L195-L213) are tuned: the last three
  of ViT-B/16's twelve. The adapters of the other blocks keep B = 0 and change nothing, so here only the tuned
  blocks get adapters (`layers`).
- Initialisation (`LoRA_AB.initialize_weights`, `--init_method xavier`): A ~ Xavier normal, std
  sqrt(2 / (width + r)); B = 0, so the adapted tower starts as the frozen one. A is drawn once per run (the authors:
  from the global RNG after `set_random_seed(0)`; here from `init_seed`), and `LoRA_AB.reset` (`ttl.py:L343`) puts
  A back and B to zero before every sample: episodic.
- Loss (`deyo.py:forward_and_adapt_sar` with `ttl.py`'s defaults `--filter_ent 0`, `--filter_plpd 0`,
  `--reweight_ent 1`, `--deyo_margin_e0 0.4`): on all 64 views, the entropy H_v of each view's own softmax; the
  views with H_v <= log(1000) are kept (`deyo.py:L107`: every view on 1000 classes or fewer); each is weighted by
  coeff_v = 1 / exp(H_v - 0.4), detached (L175), and the loss is mean_v(coeff_v * H_v) (L179-L181). No step when no
  view is kept (L110, L184). `ttl.py`'s `--selection_p 0.1` plays no part on this path.
- Step: `torch.optim.AdamW(lora params, lr=args.lr)` (`ttl.py:L218`), torch's defaults otherwise (weight decay
  0.01), fresh state per sample (`optimizer.load_state_dict(optim_state)`, L344), lr 5e-3 (`test_ttl.sh:L10`).
  Under fp16 autocast with one GradScaler(init_scale=1000) for the whole run (L222). The run's `tuning:` holds
  lr, betas, eps, weight decay, amp and the scaler's init.
- Steps (quirk): `test_time_tuning` loops `tta_steps` times and builds, each time, a `DeYO(steps=tta_steps)` whose
  forward loops `tta_steps` times again (`ttl.py:L78-L81`, `deyo.py:L42`): tta_steps^2 steps. With the scripts'
  `TTA_STEPS=1` (`test_ttl.sh:L11`) that is one; `squared_steps: false` gives tta-vlm's tta_steps.
- Logits (`custom_clip.py:inference`, L665-L694): the model's own `logit_scale.exp()` (L619, L686) times the cosine
  of the image feature and the text features of "a photo of a {}." (`get_text_features` over the tokenized
  prompts, the `--ctx_init a_photo_of_a` words: v0, computed without grad). No literal scale, so TTL has no
  `logit_scale` option.
- Prediction (`test_time_adapt_eval`, L350-L352): the adapted tower on the original view (`images[0]`).
- Views: `AugMixAugmenter(n_views=63, augmix=len(set_id)>1)` (L239-L240): TPT's, the run's `views:`.

Paper, code and other implementations:
- The paper's text could not be read here beyond its abstract (LoRA in the image encoder, confidence maximisation
  with a weighted entropy). The rules and constants above are the code's.
- The authors' code loads Hugging Face's "openai/clip-vit-base-patch16" whatever `--arch` says
  (`custom_clip.py:L581`); here the adapters go into the run's own CLIP.
- TomSheng21/tta-vlm @ bcc735f (`instance_method/ttl.py`, `clip/custom_clip.py:ClipLoraTestTimeTuning_v2`,
  `LoRALinear`, `LoRAMultiheadAttention`) runs the same adapters (layers [9, 10, 11], r 16, alpha 32, A Xavier
  normal, B zero, reset per sample), the same weighted entropy over all views (without the log(1000) filter, which
  keeps every view anyway) and the same step and prediction. It differs in two places: it takes `tta_steps` steps,
  not tta_steps^2 (equal at 1), and its text features are its prompt learner's at `add_lora` time (v0 with
  `--ctx_init a_photo_of_a`, as its README runs it).
- LoRA dropout 0.05 (`LoraConfig`, tta-vlm's `add_lora`) is inactive: both run the model in eval mode
  (`ttl.py:L312`, tta-vlm `instance_tta.py:L216`).
- Here the update is merged into the packed in-projection of each tuned block, W' = W + 2 [(A_q B_q)^T; 0;
  (A_v B_v)^T], rather than run as a side path: the same function and gradients, and with B = 0 the weight is W
  exactly, so the untuned tower gives the cache's features bit for bit (`encode_views`, the embed stage's rounding
  to `feature_dtype`). Under fp16 autocast the merged and the side-path products round differently (fp16 rounding
  only).

Records: TTL keeps nothing from sample to sample (`order_independent`): `selected`, `appended` and `deleted` are empty
and `buffer_size` is 0. `entropy_before`: v0 on the original view through the frozen tower, rounded as the cache is
(so it equals zero-shot's); `entropy_after`: v0 on the original view through the adapted tower.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from ..features import encode_views, storage_dtype
from ..objectives import (
    TuningConfig,
    autocast,
    check_finite,
    encode_for_prediction,
    entropy,
    make_grad_scaler,
    make_optimizer,
    original_view_logits,
    view_logits,
)
from ..records import Outcome
from ..text import PromptTextEncoder


@dataclass(frozen=True)
class Config:
    """TTL's adapters and loss at the authors' setting (scripts/test_ttl.sh, the same on every dataset)."""

    layers: tuple[int, ...] = (9, 10, 11)  # test_ttl.sh:L15 LAYER_RANGE=9,11, inclusive: ViT-B/16's last three blocks
    rank: int = 16  # test_ttl.sh:L18 RANK=16
    alpha: float = 32.0  # clip/custom_clip.py:L585 lora_alpha=32: scaling alpha / rank
    margin: float = 0.4  # ttl.py:L417 --deyo_margin_e0: coeff = 1 / exp(H - 0.4) (deyo.py:L175)
    max_entropy: float = math.log(1000)  # deyo.py:L107 keeps views with H <= log(1000)
    squared_steps: bool = True  # ttl.py:L78-L81 + deyo.py:L42: tta_steps^2 steps (False: tta-vlm's tta_steps)
    init_seed: int = 0  # pipeline: seeds A's Xavier-normal draw (the authors': their global seed, 0)
    feature_dtype: str = "float16"  # pipeline: the features rounded as the cache stores them (embed.dtype)

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not self.layers:
            raise ValueError("layers must name at least one block of the image tower")
        storage_dtype(self.feature_dtype)


class LowRankQV(torch.nn.Module):
    """A parametrisation of a packed in-projection [3 width, width]: W + s [(A_q B_q)^T; 0; (A_v B_v)^T]."""

    def __init__(self, width: int, rank: int, scaling: float, a_q: torch.Tensor, a_v: torch.Tensor):
        super().__init__()
        self.scaling = scaling
        self.a_q = torch.nn.Parameter(a_q.clone())
        self.b_q = torch.nn.Parameter(a_q.new_zeros(rank, width))
        self.a_v = torch.nn.Parameter(a_v.clone())
        self.b_v = torch.nn.Parameter(a_v.new_zeros(rank, width))
        self.register_buffer("a_q_init", a_q.clone())
        self.register_buffer("a_v_init", a_v.clone())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        width = weight.shape[1]
        update = torch.cat([(self.a_q @ self.b_q).t(), weight.new_zeros(width, width), (self.a_v @ self.b_v).t()])
        return weight + self.scaling * update

    @torch.no_grad()
    def reset(self) -> None:
        """A back to its draw, B to zero (`LoRA_AB.reset`)."""
        self.a_q.copy_(self.a_q_init)
        self.a_v.copy_(self.a_v_init)
        self.b_q.zero_()
        self.b_v.zero_()


def xavier_normal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """torch.nn.init.xavier_normal_'s draw for a [rows, cols] matrix: N(0, 2 / (rows + cols)), from `generator`."""
    return torch.randn(rows, cols, generator=generator) * math.sqrt(2.0 / (rows + cols))


def adapted_tower(model: torch.nn.Module, config: Config) -> tuple[torch.nn.Module, list[LowRankQV]]:
    """A private copy of `model`'s image tower with adapters on `config.layers` (the shared model is never touched)."""
    visual = copy.deepcopy(model.visual)
    blocks = visual.transformer.resblocks
    outside = [i for i in config.layers if not 0 <= i < len(blocks)]
    if outside:
        raise ValueError(f"ttl layers {list(config.layers)}: the image tower has blocks 0..{len(blocks) - 1}")
    generator = torch.Generator().manual_seed(config.init_seed)
    adapters = []
    for index in config.layers:
        attn = blocks[index].attn
        width = attn.in_proj_weight.shape[1]
        a_q, a_v = (xavier_normal(width, config.rank, generator).to(attn.in_proj_weight) for _ in range(2))
        adapter = LowRankQV(width, config.rank, config.alpha / config.rank, a_q, a_v)
        parametrize.register_parametrization(attn, "in_proj_weight", adapter)
        adapters.append(adapter)
    return visual, adapters


def weighted_entropy_loss(logits: torch.Tensor, margin: float, max_entropy: float) -> torch.Tensor | None:
    """mean over the kept views of H_v / exp(H_v - margin), the weight detached; None when no view is kept."""
    entropies = entropy(logits)
    kept = entropies[entropies <= max_entropy]
    if kept.numel() == 0:
        return None
    coeff = 1 / torch.exp(kept.detach() - margin)
    return (kept * coeff).mean(0)


class TTL:
    """Per sample: adapters reset, weighted-entropy step(s) over all views, predict the original view."""

    Config = Config
    order_independent = True
    uses_templates = False
    reads_images = True

    def __init__(self, text: PromptTextEncoder, tuning: TuningConfig, config: Config | None = None, templates=None):
        self.config = config if config is not None else Config()
        self.tuning = tuning
        self.model = text.model
        self.visual, self.adapters = adapted_tower(text.model, self.config)
        self.text_features = encode_for_prediction(text, text.init_context.unsqueeze(0), tuning)  # v0, [1, C, E]
        self.scale = text.logit_scale().detach()
        self.scaler = make_grad_scaler(text.init_context.device, tuning)
        self.dtype = storage_dtype(self.config.feature_dtype)

    def reset(self) -> None:
        """Episodic: the adapters are reset at every sample (only the gradient scaler's scale carries, on GPU)."""

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    @property
    def n_steps(self) -> int:
        return self.tuning.steps ** 2 if self.config.squared_steps else self.tuning.steps

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for adapter in self.adapters for p in (adapter.a_q, adapter.b_q, adapter.a_v, adapter.b_v)]

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, adapted: bool = True) -> torch.Tensor:
        """Features [N, E] of views through the adapted tower (or the frozen one), rounded as the cache's are."""
        tower = self.visual if adapted else self.model.visual
        return encode_views(lambda v: F.normalize(tower(v), dim=-1), pixels, self.tuning.amp, self.dtype)

    def adapt(self, pixels: torch.Tensor) -> None:
        """Reset the adapters, then `n_steps` AdamW steps with fresh state on the weighted entropy of all views."""
        for adapter in self.adapters:
            adapter.reset()
        optimizer = make_optimizer(self.parameters(), self.tuning)
        for _ in range(self.n_steps):
            with torch.enable_grad(), autocast(pixels.device, self.tuning):
                features = F.normalize(self.visual(pixels), dim=-1)
                logits = view_logits(features, self.text_features, self.scale)[:, 0]  # [V, C]
                loss = weighted_entropy_loss(logits, self.config.margin, self.config.max_entropy)
            if loss is None:
                continue
            check_finite(loss, "loss")
            optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()
        check_finite(torch.cat([p.detach().flatten() for p in self.parameters()]), "tuned adapters")

    def __call__(self, pixels: torch.Tensor) -> Outcome:
        before = original_view_logits(self.encode(pixels[:1], adapted=False), self.text_features, self.scale)
        self.adapt(pixels)
        after = original_view_logits(self.encode(pixels[:1]), self.text_features, self.scale)
        return Outcome(pred=int(after.argmax()), entropy_before=float(entropy(before)),
                       entropy_after=float(entropy(after)))
