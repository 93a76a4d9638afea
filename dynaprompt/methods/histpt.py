"""HisTPT (Zhang et al., NeurIPS 2024, "Historical Test-time Prompt Tuning for Vision Foundation Models", arXiv
2410.20346): online prompt tuning whose pseudo-labels come from memory banks of the prompt's past text features: a
local bank (the most recent), a hard-sample bank (means of the hardest recent entries) and a global prototype (a
momentum average of the two), weighted per sample by how confident each is.

Read from the authors' code, jingyi0000/HisTPT @ aaf5479 (no LICENSE file). It is the paper's semantic-segmentation
experiment, a fork of SEEM; there is no official classification code. The method is in
`modeling/language/vlpencoder.py` (`update_st_memory`, `update_st_prompt`, `update_hard_memory`,
`update_hard_prompt`, `update_ema_prompt`, `compute_similarity`) and `modeling/architectures/seem_model_v1.py`
(`forward_seg_coop`, L442-528). Its rules, in the order they run for one test sample, mapped onto CLIP
classification (the segmentation code's 101 mask queries become the sample's views):

- 1. t = the current prompt's text features [C, E] (`get_text_embeddings_coop`, L457), and the loss views' logits
  under it (`outputs` on the augmented copy `image`, L470, L479).
- 2. Hardness of the sample (L482-486): -sum_c l_c exp(l_c) over the *raw* logits l of each loss view (clamped at
  the dtype's minimum, which changes nothing), averaged over the views. The code treats logits as log-probabilities,
  so this is not an entropy; it is a decreasing function of the view's top logits, so the "highest entropy" that
  the hard bank picks is the least confident. `hardness: authors` (the default); `entropy` is the softmax entropy.
- 3. Local bank (`update_st_memory`, L262-276): 32 slots, newest first. At the stream's first sample every slot
  is filled with t and every slot's hardness with this sample's; afterwards t is pushed in front and the oldest
  slot falls off (first in, first out), with its hardness.
- 4. Hard-sample bank (`update_hard_memory`, L285-296): 32 slots. At the first sample every slot is t; afterwards
  the mean of the local bank's 16 slots of highest hardness (`torch.topk`, in its order) is pushed in front, first
  in, first out.
- 5. Global prototype (`update_ema_prompt`, L247-257): t at the first sample; afterwards
  g <- 0.99 g + 0.01 * (local[-1] + hard[-1]) / 2, with the *oldest* slot of each bank (index -1; new slots go to
  index 0), not the banks' means.
- 6. Retrieval and pseudo-label (L499-519): the original view's logits under g, mean(local) and mean(hard) (the
  means are not renormalised: `compute_similarity` scales v . t by the model's logit scale as they are). Each gets
  the weight softmax over the three of sum p log p (the negative entropy, so the most confident weighs most); the
  pseudo-label is argmax softmax(sum of the weighted *logits*).
- 7. Loss (L520): cross-entropy of the loss views' logits against the hard pseudo-label, averaged over the views;
  one step of the optimizer (the trainer's). The banks are updated once per sample, before the step.
- 8. Prediction (`trainer/default_trainer.py:train`, `pipeline/XDecoderPipeline.py:test_time_evaluate_model`): the
  stepped current prompt on the original view, as TPT predicts. The prompt is never reset.
- Constants: bank sizes 32 (vlpencoder.py:266, L289), 16 hard slots (L293), momentum 0.99 (L256); TTABC's
  algorithms.py `histpt` block has the same three (its comments name them L = H = 32, K = 16, gamma = 0.99).
- Logit scale: the model's own everywhere (`compute_similarity` multiplies by the encoder's learned
  `logit_scale.exp()`, L207; TTABC by the CLIP model's), so there is no literal and no `logit_scale` option.

Where the classification setting needs what the segmentation code cannot say, and where TTABC (the classification
port, walawalagoose/TTABC @ 009fc22, `ttabc/model_selection/histpt.py`) differs:
- Views (`loss_views`). The authors' loss is on an augmented copy and the pseudo-label on the original
  (`image` vs `image_ori`, datasets/dataset_mappers/mask_former_semantic_dataset_mapper.py). Here: "confident", the
  TPT-style confident views of the sample (`tuning.confident_ratio`, view 0 competing) against the pseudo-label of
  view 0, which is TTABC's `tpt: True` mode; "original" is view 0 for both, TTABC's default (`tpt: False`, which
  its config calls the original HisTPT setting). With "original" the view seed does not reach the method.
- Optimizer. The authors' SEEM trainer keeps one AdamW for the whole stream (configs/seem/focalt_unicl_lang_v1.yaml
  SOLVER: lr 1e-4, weight decay 0.05, 10 warm-up iterations, gradient clipping at norm 5); TTABC keeps one SGD
  (momentum 0.9, weight decay 1e-4, lr 5e-3: ttabc/utils/load_model.py:set_optimizer, main.py --lr), its per-sample
  reset commented out. Both carry the optimizer's state along the stream, and so does this module
  (`persistent_optimizer: true`; false gives a fresh state per sample, as this project's other online tuners). The
  step itself is the run's `tuning:` AdamW (lr, betas, eps, weight decay, steps, mixed precision), as for every
  prompt tuner here; the segmentation trainer's schedule and clipping are not carried over.
- Prompt. The authors' segmentation prompt is class-specific: every class's context starts from the embedding of
  its own "a photo of a" tokens (vlpencoder.py:233). TTABC, TPT and this module share one context over the classes
  (v0, "a photo of a"), which is what the pipeline's text encoder tunes.
- TTABC differs from the authors' rules in seven more places; the authors are followed in each:
  1. it pushes the *stepped* prompt's features after the step (here, as the authors: the current features before
     the step, which are the previous sample's stepped ones);
  2. at the first sample its banks are empty and the current features stand in; the authors fill them first;
  3. its global update uses the banks' means, not their oldest slots;
  4. it renormalises the banks' means before the retrieval;
  5. it fuses the three *probabilities*, not the logits;
  6. its pseudo-label is soft (the fused probabilities, with a soft-target cross-entropy), not the argmax;
  7. its hardness is the softmax entropy of the loss views (here `hardness: entropy`).
- If `tuning.steps` > 1, each step re-reads the loss views under the current prompt against the same pseudo-label
  (TTABC's loop); the banks are updated once per sample. The authors take one step per sample.
- The paper's text beyond its abstract was not available here; tta-vlm (TomSheng21/tta-vlm @ bcc735f) has no HisTPT.
- The banks, hardness and retrieval are fp32, from detached features and logits (in fp16, l exp(l) overflows once a
  logit passes about 8.6); the forward and the step follow `tuning.amp` as TPT's do.

Records:
- An entry is one slot of the local or hard bank. Every slot gets the next integer id (a counter reset by
  `reset()`): at the stream's first sample all 2 x 32 slots are filled with copies (the authors' `repeat(32, 1, 1)`)
  and `appended` lists their 64 ids; afterwards each sample appends one slot to each bank and `deleted` lists the two
  oldest that fell off. `buffer_size` is the number of filled slots (64 from the first sample on). The global
  prototype is one fixed slot, in `snapshot()` and the state but not in the records.
- `selected` is empty.
- `entropy_before`: the entropy of the original view's logits under the prompt before the step; `entropy_after`:
  under the stepped prompt, which predicts.
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
    encode_for_prediction,
    entropy,
    make_grad_scaler,
    make_optimizer,
    view_logits,
)
from ..records import Outcome
from ..text import PromptTextEncoder

LOSS_VIEWS = ("confident", "original")
HARDNESS = ("authors", "entropy")


@dataclass(frozen=True)
class Config:
    """HisTPT's constants (jingyi0000/HisTPT modeling/language/vlpencoder.py; TTABC algorithms.py `histpt`)."""

    bank_size: int = 32  # slots of the local and of the hard-sample bank (vlpencoder.py:266 and L289, repeat(32, 1, 1))
    hard_topk: int = 16  # local slots of highest hardness averaged into a hard slot (vlpencoder.py:293 topk(.., 16))
    momentum: float = 0.99  # global prototype's momentum (vlpencoder.py:256 old * 0.99 + new * (1 - 0.99))
    loss_views: str = "confident"  # confident: TPT's confident views (TTABC tpt=True) | original: view 0 (tpt=False)
    hardness: str = "authors"  # authors: -sum l exp(l) on raw logits (seem_model_v1.py:482-486) | entropy (TTABC)
    persistent_optimizer: bool = True  # one optimizer state along the stream (the authors' trainer; TTABC)

    def __post_init__(self):
        if self.loss_views not in LOSS_VIEWS:
            raise ValueError(f"loss_views must be one of {LOSS_VIEWS}, got {self.loss_views!r}")
        if self.hardness not in HARDNESS:
            raise ValueError(f"hardness must be one of {HARDNESS}, got {self.hardness!r}")
        if not 1 <= self.hard_topk <= self.bank_size:
            raise ValueError(f"hard_topk must be in [1, bank_size={self.bank_size}], got {self.hard_topk}")


def authors_hardness(logits: torch.Tensor) -> torch.Tensor:
    """-sum_c l_c exp(l_c) per row of raw logits [k, C], averaged over the rows (seem_model_v1.py:482-486)."""
    clamped = logits.clamp(min=torch.finfo(logits.dtype).min)
    return -(clamped * clamped.exp()).sum(-1).mean()


def fused_pseudo_label(query: torch.Tensor, banks: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """argmax softmax(sum_b w_b l_b), l_b = scale * q . bank_b [C], w = softmax_b(sum p_b log p_b) (L499-519)."""
    logits = scale * banks @ query  # [3, C]: global, local, hard
    negative_entropy = (logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    weights = negative_entropy.softmax(0)
    return (weights.unsqueeze(1) * logits).sum(0).softmax(-1).argmax()


def push_front(bank: torch.Tensor, entry: torch.Tensor) -> torch.Tensor:
    """`entry` in slot 0, every other slot one further back, the last one dropped (first in, first out)."""
    return torch.cat([entry.unsqueeze(0), bank[:-1]])


class HisTPT:
    """Per sample: remember the current prompt, pseudo-label the original view from the banks, one step, predict."""

    Config = Config
    order_independent = False
    uses_templates = False
    BANKS = ("local", "hard", "global_prototype", "hardness")  # None until the stream's first sample

    def __init__(self, text: PromptTextEncoder, tuning: TuningConfig, config: Config | None = None, templates=None):
        self.text = text
        self.tuning = tuning
        self.config = config if config is not None else Config()
        self.scale = text.logit_scale().detach()
        self.scaler = make_grad_scaler(text.init_context.device, tuning)
        self.reset()

    def reset(self) -> None:
        """Back to v0 with a fresh optimizer and empty banks, at the start of a stream."""
        self.context = self.text.init_context.clone().requires_grad_(True)
        self.optimizer = make_optimizer([self.context], self.tuning)
        self.local = self.hard = self.global_prototype = self.hardness = None  # filled at the first sample
        size = self.config.bank_size
        self.local_ids = torch.full((size,), -1, dtype=torch.long)
        self.hard_ids = torch.full((size,), -1, dtype=torch.long)
        self.next_id = 0

    def state_dict(self) -> dict:
        """The prompt, the optimizer's and the gradient scaler's states, the banks and their slot ids."""
        state = {name: None if getattr(self, name) is None else getattr(self, name).clone() for name in self.BANKS}
        return {**state, "context": self.context.detach().clone(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "local_ids": self.local_ids.clone(),
                "hard_ids": self.hard_ids.clone(), "next_id": self.next_id}

    def load_state_dict(self, state: dict) -> None:
        device = self.context.device
        with torch.no_grad():
            self.context.copy_(state["context"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        for name in self.BANKS:
            setattr(self, name, None if state[name] is None else state[name].to(device).clone())
        self.local_ids, self.hard_ids = state["local_ids"].clone(), state["hard_ids"].clone()
        self.next_id = int(state["next_id"])

    def forward(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """With grad: the current prompt's text features [C, E], the loss views' logits [k, C] and, detached, the
        original view's logits [C]."""
        with autocast(views.device, self.tuning):
            features = self.text.encode(self.context.unsqueeze(0))
            logits = view_logits(views, features, self.scale)  # [V, 1, C]
        if self.config.loss_views == "original":
            keep = torch.zeros(1, dtype=torch.long, device=views.device)
        else:
            keep = confident_view_indices(logits.detach(), self.tuning.confident_ratio)
        return features[0], logits[keep, 0].float(), logits[0, 0].detach().float()

    def sample_hardness(self, loss_logits: torch.Tensor) -> torch.Tensor:
        if self.config.hardness == "authors":
            return authors_hardness(loss_logits)
        return entropy(loss_logits).mean()

    def remember(self, features: torch.Tensor, hardness: torch.Tensor) -> tuple[list[int], list[int]]:
        """Put the current features [C, E] into the local, hard and global banks (vlpencoder.py:247-302);
        (appended slot ids, deleted slot ids)."""
        if self.local is None:
            return self.fill(features, hardness), []
        deleted = [int(self.local_ids[-1]), int(self.hard_ids[-1])]
        self.local = push_front(self.local, features)
        self.hardness = push_front(self.hardness, hardness)
        hardest = torch.topk(self.hardness, self.config.hard_topk, dim=0).indices
        self.hard = push_front(self.hard, self.local[hardest].mean(0))
        newest = torch.tensor([self.next_id, self.next_id + 1])
        self.local_ids, self.hard_ids = push_front(self.local_ids, newest[0]), push_front(self.hard_ids, newest[1])
        self.next_id += 2
        update = 1 / 2 * (self.local[-1] + self.hard[-1])  # the oldest slots (vlpencoder.py:255)
        self.global_prototype = self.global_prototype * self.config.momentum + update * (1 - self.config.momentum)
        return newest.tolist(), deleted

    def fill(self, features: torch.Tensor, hardness: torch.Tensor) -> list[int]:
        """The stream's first sample: every slot of both banks is a copy, the global prototype the features; the ids."""
        size = self.config.bank_size
        self.local = features.expand(size, *features.shape).clone()
        self.hard = self.local.clone()
        self.global_prototype = features.clone()
        self.hardness = hardness.expand(size).clone()
        self.local_ids, self.hard_ids = torch.arange(size), torch.arange(size, 2 * size)
        self.next_id = 2 * size
        return list(range(2 * size))

    def pseudo_label(self, query: torch.Tensor) -> torch.Tensor:
        """The original view's label fused from the global prototype and the two banks' means."""
        banks = torch.stack([self.global_prototype, self.local.mean(0), self.hard.mean(0)])
        return fused_pseudo_label(query.float(), banks, self.scale.float())

    def descend(self, loss: torch.Tensor) -> None:
        """One step of the (carried or fresh) optimizer, through the gradient scaler."""
        check_finite(loss, "loss")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def __call__(self, view_features: torch.Tensor) -> Outcome:
        if not self.config.persistent_optimizer:
            self.optimizer = make_optimizer([self.context], self.tuning)
        with torch.enable_grad():
            features, loss_logits, before = self.forward(view_features)
            with torch.no_grad():
                appended, deleted = self.remember(features.detach().float(), self.sample_hardness(loss_logits))
                label = self.pseudo_label(view_features[0])
            for step in range(self.tuning.steps):
                if step:
                    _, loss_logits, _ = self.forward(view_features)
                self.descend(F.cross_entropy(loss_logits, label.expand(loss_logits.shape[0])))
        check_finite(self.context.detach(), "tuned contexts")
        tuned = encode_for_prediction(self.text, self.context.detach().unsqueeze(0), self.tuning)
        after = view_logits(view_features[:1], tuned, self.scale)[0, 0].float()
        return Outcome(pred=int(after.argmax()), entropy_before=float(entropy(before)),
                       entropy_after=float(entropy(after)), appended=appended, deleted=deleted,
                       buffer_size=int((self.local_ids >= 0).sum() + (self.hard_ids >= 0).sum()))

    def snapshot(self) -> dict:
        """The banks' slot ids (newest first) and hardness, for inspection and tests."""
        hardness = [] if self.hardness is None else self.hardness.tolist()
        return {"local": self.local_ids.tolist(), "hard": self.hard_ids.tolist(), "hardness": hardness}
