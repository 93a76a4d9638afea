"""TPS (Sui et al., WACV 2025, "Just Shift It: Test-Time Prototype Shifting", arXiv 2403.12952), episodic.

Read from the authors' code, elaine-sui/TPS @ 556db0f (MIT): `shift_classification.py` (`run_shift_iter`,
`test_time_tuning`, `test_time_adapt_eval`), `model/learnable_shift.py` (`TestTimeShiftTuning.forward`,
`load_class_embeds`, `get_text_features`), `model/shifter.py` (`Shifter`), `run_utils.py`
(`select_confident_samples`, `avg_entropy`), `utils/save_class_embeds.py` and `scripts/shift/*.sh`. Nothing of the
text encoder is tuned: a shift vector is added to each cached class prototype, and only the shifts are learned.

- Prototypes (`load_class_embeds`, `get_text_features`): per class, the mean of its unit-norm prompt embeddings
  (`save_class_embeds.py:L84-L111`), normalised. `shift_text_per_class.sh` uses "a photo of a {}." alone;
  `shift_text_per_class_mean_init_template.sh` (`--with_templates`) CLIP's 80 ImageNet templates on every set.
  Here that is `zero_shot.classifier(text, templates)`: v0 without templates, the normalised mean with them.
- Shift (`Shifter`, `--per_label`): a [C, E] parameter, zero at every sample (`model.reset()` in
  `test_time_adapt_eval`). The shifted prototypes are normalise(normalise(T) + s) (`learnable_shift.py:L227-L233`,
  `shifter.py:L69`). `per_class: false` is `shift_text_shared.sh`: one [E] shift shared by every class.
- Logits (`forward`): logit_scale.exp() * image . prototype; the scale is the model's own (no literal), so TPS has
  no `logit_scale` option.
- Step (`test_time_tuning`, `run_shift_iter`): `--tta_steps 1` AdamW step on the shift with fresh optimiser state
  (`optimizer.load_state_dict(optim_state)` per sample; `torch.optim.AdamW(params, lr)`, torch defaults otherwise:
  weight decay 0.01). The loss is the marginal entropy (`avg_entropy`) of the int(0.1 * 64) = 6 views of lowest
  entropy (`select_confident_samples`, `--selection_p 0.1`), chosen anew at each step from all 64 views, the
  original included. One GradScaler(init_scale=1e3) lives across samples. Here that is the run's `tuning:`
  (betas, eps, weight decay, steps, confident_ratio, amp, grad_scale_init), whose defaults are the same.
- Learning rate: the scripts take it as an argument; the README runs ImageNet and its shifts at 5e-3
  (`README.md:L48`), which is also `args.py:L13`'s default. `params.yaml` sets it in `methods.tps.tuning`, not
  the calibrated `tuning.lr`: that lr is for a prompt's context tokens, and a prototype shift is a different
  parameter.
- Prediction (`test_time_adapt_eval`): the original view (`images[0]`) against the shifted prototypes. The
  prediction of the tuning pass (`run_shift_iter`'s `pred`) is discarded by the authors.
- Views: `-b 64`, `AugMixAugmenter(n_views=63, augmix=len(set_id) > 1)`: crop + flip on the ImageNet sets, AugMix on
  the fine-grained ones, as TPT's (the run's `views:`).

Paper, code, and tta-vlm:
- The paper's headline prototypes average CLIP's 80 templates with GPT-4 class descriptions
  (`shift_text_per_class_mean_init_template_and_gpt4_micro.sh`: (descriptions + templates) / 2). The descriptions
  (`gpt4_descriptors/`) are not shipped here. A `templates:` set listing them with the templates gives one mean over
  all prompts: the authors' `--macro_pooling` variant (`..._template_and_gpt4_macro.sh`), not the micro one. The
  paper's text could not be checked beyond its abstract.
- TomSheng21/tta-vlm @ bcc735f (`instance_method/tps.py`, `clip/custom_clip.py:ClipShifterTestTimeTuning_v2`) runs the
  same step. It differs in three places:
  - its prototypes are v0, the CoOp prompt learner's "a photo of a {}." (`get_text_features`); `templates: null`
    gives it;
  - its lr is 5e-3 on I/A/V/R/K and 1e-3 on every other set (`tps.py:L27-L30`). The authors ship no
    fine-grained value, so configs/paper.yaml takes tta-vlm's.
  - it keeps the views chosen at its first step for the later steps (`tps.py:L52-L55`); the authors re-select.
    With one step the two agree; here the authors' rule is followed.
- Precision: both run the step under fp16 autocast with fp32 weights (`convert_weights` is commented out in
  `model/model.py:L434`), so the shift is fp32. Here the step follows the run's `tuning.amp`; the prediction is
  fp32 (the authors' is under autocast), a difference at fp16 rounding.

Records: TPS keeps nothing from sample to sample (`order_independent`), so `selected`, `appended` and `deleted` are
empty and `buffer_size` is 0. `entropy_before`: the unshifted prototypes on the original view; `entropy_after`:
the shifted ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..objectives import (
    TuningConfig,
    autocast,
    check_finite,
    confident_view_indices,
    entropy,
    make_grad_scaler,
    make_optimizer,
    marginal_entropy,
    view_logits,
)
from ..records import Outcome
from ..text import PromptTextEncoder
from .zero_shot import classifier


@dataclass(frozen=True)
class Config:
    """TPS's options; the step itself is the run's `tuning:` (params.yaml sets TPS's lr there)."""

    per_class: bool = True  # a shift per class prototype (scripts/shift/*per_class*.sh --per_label); False: one shared


def shifted_prototypes(prototypes: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """normalise(prototypes + shift) [C, E]; `shift` is [C, E] or [E] (`learnable_shift.py:forward`)."""
    return F.normalize(prototypes + shift, dim=-1)


class TPS:
    """Per sample: zero shifts, one entropy step on them over the confident views, predict the original view."""

    Config = Config
    order_independent = True
    uses_templates = True

    def __init__(self, text: PromptTextEncoder, tuning: TuningConfig, config: Config | None = None, templates=None):
        self.config = config if config is not None else Config()
        self.tuning = tuning
        self.prototypes = classifier(text, templates)[0].float()  # [C, E], unit norm
        self.scale = text.logit_scale().detach().float()
        self.scaler = make_grad_scaler(self.prototypes.device, tuning)

    def reset(self) -> None:
        """Episodic: the shifts start at zero at every sample (only the gradient scaler's scale carries, on GPU)."""

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def tune_shift(self, views: torch.Tensor) -> torch.Tensor:
        """The shift after `tuning.steps` AdamW steps from zero on the confident views' marginal entropy."""
        n_classes, dim = self.prototypes.shape
        shift = torch.zeros((n_classes, dim) if self.config.per_class else (dim,), device=views.device,
                            requires_grad=True)
        optimizer = make_optimizer([shift], self.tuning)
        for _ in range(self.tuning.steps):
            with autocast(views.device, self.tuning):
                logits = view_logits(views, shifted_prototypes(self.prototypes, shift).unsqueeze(0), self.scale)
                keep = confident_view_indices(logits.detach(), self.tuning.confident_ratio)  # anew at each step
                loss = marginal_entropy(logits[keep])[0]
            check_finite(loss, "loss")
            optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()
        return check_finite(shift.detach(), "tuned shift")

    def __call__(self, view_features: torch.Tensor) -> Outcome:
        views = view_features.float()
        shift = self.tune_shift(views)
        with torch.no_grad():
            before = self.scale * views[0] @ self.prototypes.t()
            after = self.scale * views[0] @ shifted_prototypes(self.prototypes, shift).t()
        return Outcome(pred=int(after.argmax()), entropy_before=float(entropy(before)),
                       entropy_after=float(entropy(after)))
