"""RLCF (Zhao et al., ICLR 2024, "Test-Time Adaptation with CLIP Reward for Zero-Shot Generalization in
Vision-Language Models"), prompt tuning, episodic: REINFORCE on the prompt with a CLIP reward.

Read from the authors' code, mzhaoshuai/RLCF @ 0996a5d (2025-10-20; TPT/ unchanged since 82212b6, 2024-01-18):
`TPT/tpt_cls_rl.py` (`test_time_tuning`, `main_worker`, `test_time_adapt_eval`), `TPT/clip_reward.py` (`CLIPRewards`),
`TPT/params.py`, `TPT/clip/custom_clip.py` and `TPT/scripts/rlcf-prompt.sh`, `rlcf-prompt-fine.sh`.

- Policy: the CoOp prompt "{ctx} {classname}." of TPT, reset before every sample (`test_time_adapt_eval`:
  `model.reset()`, `optimizer.load_state_dict(optim_state)`), logits = the policy CLIP's own `logit_scale.exp()`
  times cosines (`custom_clip.py:L332-L333`): no literal scale, so RLCF has no `logit_scale` option.
- Confident views (`test_time_tuning`, L53-L59): at the first step the policy scores all 64 views and keeps the
  int(0.1 * 64) = 6 of lowest entropy (`select_confident_samples`, `--selection_p 0.1`); later steps reuse them.
- Reward model (`clip_reward.py:CLIPRewards`): a separate CLIP, ViT-L/14 (`rlcf-prompt.sh:L25 reward_arch`).
  - Its class features (`set_class_features`, `tpt_cls_rl.py:L182-L183`): the teacher's text encoder over the
    policy's tokenized prompts, i.e. "a photo of a {classname}." (`--ctx_init a_photo_of_a`), normalised.
  - Its image features (`set_image_features`, L59): the teacher's image encoder over the 6 selected views' pixels
    (resized bicubic with align_corners when its resolution is not 224, `extract_image_features`), normalised.
- Sampling (L62-L64): the K = 3 classes of highest policy logit per selected view (`torch.topk`, `sample_k=3`,
  `rlcf-prompt.sh:L29`); the paper speaks of sampling from the policy, the code takes the top K.
- Reward (`CLIPScore(pairwise=False)`, `rewards_post_process`): r = max(2.5 cos(teacher text_k, teacher image_v), 0)
  (`clipscore_weight=2.5`, `clip_reward.py:L77`, L124-L126); the baseline is the mean of the view's K rewards,
  subtracted (`reward_process=1`, `process_batch=0`), with no division by their std (`reward_amplify=0`,
  `rlcf-prompt.sh:L26-L28`).
- Loss (L69-L71): mean over the 6 x K pairs of r_vk * CE(policy logits_v, k), i.e. REINFORCE with log pi(k | v).
  `--min_entropy_reg` is off (`params.py:L65` default 0).
- Step (L76-L79, L119-L127): AdamW(lr 7e-3, weight_decay 5e-4) (`rlcf-prompt.sh:L16-L18`, L38-L39), fresh state per
  sample, 3 steps on ImageNet and its shifts and 5 on the fine-grained sets (`rlcf-prompt-fine.sh:L39`), under fp16
  autocast with one GradScaler(init_scale=1000) for the run (L127). The run's `tuning:` holds them.
- Prediction (L260-L262): the tuned prompt on the original view.
- Views: `AugMixAugmenter(augmix=len(set_id) > 1 and args.augmix)` with `--augmix 1` (`params.py:L48`): TPT's.

Paper, code and other implementations:
- The paper's text could not be read here beyond its abstract; the rules and constants are the code's.
- Initial prompt: the authors' scripts load a CoOp context learned on 16-shot ImageNet (`--load ${coop_weight}`,
  `rlcf-prompt.sh:L14`, L61), which is not shipped; here the prompt starts from v0, as tta-vlm runs it.
- `rlcf-prompt-fine.sh:L68` passes `--augmix ${augmix}` with `augmix` never set, which argparse rejects; the
  default (`--augmix 1`, TPT's AugMix on the fine-grained sets) is taken.
- TomSheng21/tta-vlm @ bcc735f (`instance_method/rlcf.py`) runs the same loss, selection, reward and step (lr 7e-3,
  weight decay 5e-4, 3 steps, K 3) on every dataset, with one difference: its reward model is a second copy of the
  policy's own architecture and weights (`rlcf.py:L171-L175`, `arch=args.arch`), not a larger CLIP.
- Teacher here (`teacher:`): `arch: null` is tta-vlm's choice, the policy's own CLIP: its image features are then
  the cached view features of the selected views, and its class features v0's (or, with `templates:`, that
  ensemble's). A named `arch` (ViT-L-14 with OpenAI weights for the paper) is loaded by the runner
  (`dynaprompt.runner.load_teacher`); RLCF then `reads_images`, encodes its own view features from the pixels as
  the cache does, and the teacher encodes the selected views. With a teacher, `templates:` averages those
  templates through the teacher's text tower instead of reading the policy's prompt.
- What the self-teacher changes: with v0 as the teacher's text, the first step's rewards rank a view's K classes
  exactly as the policy's own logits do (both are its v0 cosines, unless clamped at 0), so the step only moves
  probability to the view's top class among its top K, an entropy minimisation restricted to the top K; there is
  no feedback from a stronger model. A template ensemble as the teacher's text gives it a ranking of its own where
  the ensemble and v0 disagree. Negative cosines (frequent on the bundled model, see ECALP) clamp to 0 and tie.
- Precision: the authors compute the teacher's features under autocast in fp16; here the teacher's image and text
  passes run under the run's autocast too; the self-teacher reads the cache's fp16 rows, renormalised.

Records: `selected` [0] and `buffer_size` 1, as TPT has them (one prompt, nothing kept between samples).
`entropy_before`: v0 on the original view; `entropy_after`: the tuned prompt on the original view.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..features import encode_views, storage_dtype
from ..objectives import (
    TuningConfig,
    autocast,
    check_finite,
    confident_view_indices,
    encode_for_prediction,
    entropy,
    fresh_parameters,
    make_grad_scaler,
    make_optimizer,
    original_view_logits,
    view_logits,
)
from ..records import Outcome
from ..text import PromptTextEncoder, encode_tokens, template_features


@dataclass(frozen=True)
class Teacher:
    """The reward CLIP: null `arch` is the policy's own CLIP (tta-vlm); else a model loaded like `model:`."""

    arch: str | None = None  # rlcf-prompt.sh:L25 reward_arch=ViT-L/14 (open_clip: ViT-L-14); null: the policy's own
    pretrained: str | None = None  # open_clip tag (openai) or a weights file, relative to the params file
    cache_dir: str | None = None  # a Hugging Face cache that holds the teacher's weights
    quick_gelu: bool | None = None  # as `model.quick_gelu`
    init_seed: int = 0  # seeds random teacher weights (tests)

    def __post_init__(self):
        if self.arch is None and self.pretrained is not None:
            raise ValueError("teacher.pretrained is set but teacher.arch is null (null: the policy's own CLIP)")


@dataclass(frozen=True)
class Config:
    """RLCF's reward at the authors' setting (rlcf-prompt.sh); the step itself is the run's `tuning:`."""

    sample_k: int = 3  # rlcf-prompt.sh:L29 sample_k=3 (params.py:L52 default 5)
    clipscore_weight: float = 2.5  # clip_reward.py:L77 CLIPRewards(clipscore_weight=2.5)
    reward_process: bool = True  # rlcf-prompt.sh:L27 reward_process=1: subtract the baseline (the mean reward)
    process_batch: bool = False  # rlcf-prompt.sh:L28 process_batch=0: the baseline over each view's K samples
    reward_amplify: bool = False  # rlcf-prompt.sh:L26 reward_amplify=0: no division by the rewards' std
    teacher: Teacher = field(default_factory=Teacher)
    feature_dtype: str = "float16"  # pipeline: view features computed from pixels rounded as the cache's (embed.dtype)

    def __post_init__(self):
        if self.sample_k < 1:
            raise ValueError(f"sample_k must be >= 1, got {self.sample_k}")
        storage_dtype(self.feature_dtype)


def clip_rewards(teacher_text: torch.Tensor, teacher_images: torch.Tensor, sampled: torch.Tensor,
                 config: Config) -> torch.Tensor:
    """Rewards [V * K] of the sampled classes [V, K]: max(w cos, 0), less their baseline (`CLIPScore` and
    `rewards_post_process`)."""
    n_views, k = sampled.shape
    images = torch.repeat_interleave(teacher_images, k, dim=0)
    scores = (config.clipscore_weight * (teacher_text[sampled.flatten()] * images).sum(-1)).clamp(min=0)
    scores = scores if config.process_batch else scores.reshape(n_views, k)
    if scores.shape[-1] > 1 and config.reward_process:
        std = scores.std(dim=-1, keepdim=True) + 1e-5 if config.reward_amplify else 1.0  # clip_reward.py:L160
        scores = (scores - scores.mean(dim=-1, keepdim=True)) / std
    return scores.flatten()


def reinforce_loss(logits: torch.Tensor, teacher_text: torch.Tensor, teacher_images: torch.Tensor,
                   config: Config) -> torch.Tensor:
    """mean over views x K of reward * CE(logits_v, k) for the top-K classes k of each view; logits [V, C]."""
    sampled = torch.topk(logits.detach(), config.sample_k, dim=-1).indices
    with torch.no_grad():
        rewards = clip_rewards(teacher_text, teacher_images, sampled, config)
    repeated = torch.repeat_interleave(logits.float(), config.sample_k, dim=0)
    return (rewards * F.cross_entropy(repeated, sampled.flatten(), reduction="none")).mean()


class RLCF:
    """Per sample: v0, `tuning.steps` REINFORCE steps on the confident views with the teacher's reward, predict."""

    Config = Config
    order_independent = True
    uses_templates = True

    def __init__(self, text: PromptTextEncoder, tuning: TuningConfig, config: Config | None = None, templates=None,
                 teacher=None):
        self.config = config if config is not None else Config()
        if self.config.teacher.arch is not None and teacher is None:
            raise ValueError(f"rlcf: teacher.arch is {self.config.teacher.arch!r} but no teacher CLIP was given "
                             "(dynaprompt.runner.load_teacher loads it)")
        if self.config.sample_k > text.n_classes:
            raise ValueError(f"rlcf: sample_k {self.config.sample_k} exceeds the {text.n_classes} classes")
        self.text = text
        self.tuning = tuning
        self.teacher = teacher  # a LoadedClip, or None: the policy's own CLIP
        self.reads_images = teacher is not None
        self.scale = text.logit_scale().detach()
        self.scaler = make_grad_scaler(text.init_context.device, tuning)
        self.v0_features = encode_for_prediction(text, text.init_context.unsqueeze(0), tuning)  # [1, C, E]
        self.teacher_text = self.teacher_class_features(templates)
        self.dtype = storage_dtype(self.config.feature_dtype)

    def reset(self) -> None:
        """Episodic: nothing carries between samples except the GradScaler's scale, as the authors' run does."""

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    @torch.no_grad()
    def teacher_class_features(self, templates) -> torch.Tensor:
        """The teacher's unit-norm class features [C, E]: the policy's prompt text, or the `templates` averaged."""
        device = self.text.init_context.device
        if self.teacher is None:
            return self.v0_features[0] if templates is None else self.text.encode_templates(templates)[0].float()
        model = self.teacher.model
        with autocast(device, self.tuning):
            if templates is None:
                check_tokens(self.text.tokens, model)
                features = encode_tokens(model, self.text.tokens).float()
            else:
                features = torch.stack([template_features(model, self.teacher.tokenizer, self.text.classnames, t,
                                                          device).float() for t in templates]).mean(0)
        return F.normalize(features, dim=-1)

    @torch.no_grad()
    def teacher_image_features(self, view_features: torch.Tensor, pixels: torch.Tensor | None,
                               keep: torch.Tensor) -> torch.Tensor:
        """Unit-norm teacher features [K, E] of the selected views: their cached rows, or the teacher's encoding."""
        if self.teacher is None:
            return F.normalize(view_features[keep].float(), dim=-1)
        views = pixels[keep]
        if views.shape[-1] != self.teacher.image_size:  # clip_reward.py:L133-L134
            views = F.interpolate(views, size=self.teacher.image_size, mode="bicubic", align_corners=True)
        with autocast(views.device, self.tuning):
            features = self.teacher.model.encode_image(views).float()
        return F.normalize(features, dim=-1)

    def tune(self, view_features: torch.Tensor, pixels: torch.Tensor | None) -> torch.Tensor:
        """`tuning.steps` AdamW steps on the REINFORCE loss from v0, fresh optimiser state; the context [1, n_ctx, w].

        The confident views and the teacher's features of them are fixed at the first step (L53-L59).
        """
        params = fresh_parameters(self.text.init_context.unsqueeze(0))
        optimizer = make_optimizer([params], self.tuning)
        scale = self.text.logit_scale()
        keep = teacher_images = None
        for _ in range(self.tuning.steps):
            with autocast(view_features.device, self.tuning):
                features = self.text.encode(params)  # [1, C, E]
                if keep is None:
                    logits = view_logits(view_features, features, scale)  # [V, 1, C]
                    keep = confident_view_indices(logits.detach(), self.tuning.confident_ratio)
                    teacher_images = self.teacher_image_features(view_features, pixels, keep)
                    logits = logits[keep]
                else:
                    logits = view_logits(view_features[keep], features, scale)
                loss = reinforce_loss(logits[:, 0], self.teacher_text, teacher_images, self.config)
            check_finite(loss, "loss")
            optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()
        return check_finite(params.detach(), "tuned contexts")

    def view_features(self, views: torch.Tensor) -> torch.Tensor:
        """The policy's view features: given, or (with a teacher) encoded from the pixels as the cache is."""
        if not self.reads_images:
            return views
        model = self.text.model
        with torch.no_grad():
            return encode_views(lambda v: model.encode_image(v, normalize=True), views, self.tuning.amp, self.dtype)

    def __call__(self, views: torch.Tensor) -> Outcome:
        view_features = self.view_features(views)
        before = original_view_logits(view_features, self.v0_features, self.scale)
        tuned = self.tune(view_features, views if self.reads_images else None)
        after = original_view_logits(view_features, encode_for_prediction(self.text, tuned, self.tuning), self.scale)
        return Outcome(pred=int(after.argmax()), entropy_before=float(entropy(before)),
                       entropy_after=float(entropy(after)), selected=[0], buffer_size=1)


def check_tokens(tokens: torch.Tensor, model: torch.nn.Module) -> None:
    """The teacher reads the policy's token ids (as the authors' does): its vocabulary and context must hold them."""
    tower = getattr(model, "text", model)
    vocabulary, context = tower.token_embedding.num_embeddings, tower.positional_embedding.shape[0]
    if int(tokens.max()) >= vocabulary or tokens.shape[1] > context:
        raise ValueError(f"rlcf: the teacher's text tower (vocabulary {vocabulary}, context {context}) cannot read the "
                         f"policy's prompts ({tokens.shape[1]} tokens, largest id {int(tokens.max())}); give it "
                         "`templates:` to tokenize with its own tokenizer")
