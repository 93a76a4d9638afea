"""DynaPrompt (Xiao et al., ICLR 2025): a buffer of online prompts, selected per test sample by entropy and
probability difference, grown by appending, bounded by deleting the least recently selected prompt.

Two selection rules: `paper` follows the paper's text; `official` follows the authors' code, quirks included.
Text features of buffered prompts are carried from sample to sample: a prompt that was not stepped is
bit-for-bit the same, so only the prompts stepped at the last sample were re-encoded (by its prediction).

Parameterisation. The paper's rule steps each selected prompt as its own vector (the paper describes prompts
initialised from v0 and optimised when selected, as TPT's context is): weight decay acts on a prompt only when it
is stepped, and pulls it toward 0. The official rule keeps the authors' parameterisation
(clip/custom_clip_lessctx.py: `ctx` starts at zeros and `forward` adds `init_ctx`; all M slots are one AdamW
parameter): a slot is an offset from v0, and every step decays every slot's offset toward 0, i.e. the slot toward
v0, selected or not (by lr x weight_decay = 5e-5 of the offset per sample at lr 5e-3, wd 0.01). Every slot that
has moved from v0 then changes at every sample, so the official rule re-encodes each such slot in its prediction
pass (a slot still exactly at v0 and not selected stays exactly there, and keeps its carried features).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..objectives import (
    TuningConfig,
    TuningRequest,
    encode_for_prediction,
    entropy,
    make_grad_scaler,
    original_view_logits,
    tune_and_finish,
    view_logits,
)
from ..records import Outcome
from ..text import PromptTextEncoder

CRITERIA = ("both", "entropy_only", "probdiff_only")


@dataclass(frozen=True)
class Config:
    """The `dynaprompt` method's parameters, ablations included."""

    buffer_size: int = 10  # M
    selection: str = "paper"  # paper | official
    criteria: str = "both"  # both | entropy_only | probdiff_only (paper rule only)
    append: bool = True  # False: the buffer stays at its first M prompts (no appending, no deletion)
    entropy_margin: float = 0.0  # tau_h (paper rule): select m only if H[m] < H[v0] - tau_h; 0 is the paper's rule
    probdiff_margin: float = 0.0  # tau_d (paper rule): select m only if D[m] > D[v0] + tau_d
    probdiff: str | None = None  # prob: softmax of the original's predicted class (the paper's words, the default
    #   of `paper`) | logit: max-logit difference (the authors' code, always used by `official`)

    @property
    def probdiff_kind(self) -> str:
        """`probdiff`, or the rule's own default: probabilities for `paper`, logits for `official`."""
        return self.probdiff or ("prob" if self.selection == "paper" else "logit")

    def __post_init__(self):
        if self.selection not in ("paper", "official"):
            raise ValueError(f"dynaprompt.selection must be 'paper' or 'official', got {self.selection!r}")
        if self.criteria not in CRITERIA:
            raise ValueError(f"dynaprompt.criteria must be one of {CRITERIA}, got {self.criteria!r}")
        if self.probdiff not in (None, "logit", "prob"):
            raise ValueError(f"dynaprompt.probdiff must be 'logit' or 'prob', got {self.probdiff!r}")
        if self.buffer_size < 1:
            raise ValueError(f"dynaprompt.buffer_size must be >= 1, got {self.buffer_size}")
        paper_only = (self.criteria != "both" or self.probdiff_kind != "logit" or self.entropy_margin
                      or self.probdiff_margin)
        if self.selection == "official" and paper_only:
            raise ValueError("the official selection rule has no criteria/probdiff/margin ablations; "
                             "use selection: paper")


@dataclass
class BufferedPrompt:
    """One online prompt: its context, its carried text features and how often it was selected."""

    id: int
    context: torch.Tensor  # [n_ctx, width]
    features: torch.Tensor  # [C, E], text features of `context`
    uses: int = 0


def prompt_entropy(logits: torch.Tensor) -> torch.Tensor:
    """H[m]: prediction entropy averaged over all views; logits [V, P, C] -> [P]."""
    return entropy(logits).mean(0)


def official_prompt_entropy(logits: torch.Tensor) -> torch.Tensor:
    """H[m] as the authors' code computes it (`l = x - logsumexp(x)`, `-(l * exp(l)).sum()`, mean over views).

    The same value as `prompt_entropy` up to rounding; the rounding decides which of several fresh slots (exact
    ties in the authors' code) `torch.topk` ranks first, so the official rule uses this form.
    """
    log_probs = logits.float() - logits.float().logsumexp(dim=-1, keepdim=True)
    return (-(log_probs * log_probs.exp()).sum(dim=-1)).mean(0)


def probability_difference(logits: torch.Tensor, kind: str = "logit") -> torch.Tensor:
    """D[m]: how much more confident prompt m is on the original view than on the augmented ones -> [P]."""
    if kind == "logit":
        top = logits.float().max(-1).values  # [V, P]
        return (top[:1] - top[1:]).mean(0)
    probs = logits.float().softmax(-1)
    predicted = probs[0].argmax(-1)  # [P], the original view's class per prompt
    of_predicted = probs[:, torch.arange(probs.shape[1]), predicted]  # [V, P]
    return (of_predicted[:1] - of_predicted[1:]).mean(0)


def select_paper(entropy_m, probdiff_m, entropy_v0, probdiff_v0, criteria="both", entropy_margin=0.0,
                 probdiff_margin=0.0) -> list[int]:
    """S = {m : H[m] < H[v0] - tau_h and D[m] > D[v0] + tau_d} (or either criterion alone), as buffer positions."""
    lower_entropy = entropy_m < entropy_v0 - entropy_margin
    higher_probdiff = probdiff_m > probdiff_v0 + probdiff_margin
    keep = {"both": lower_entropy & higher_probdiff, "entropy_only": lower_entropy, "probdiff_only": higher_probdiff}
    return keep[criteria].nonzero().flatten().tolist()


def select_official(entropy_m: torch.Tensor, probdiff_m: torch.Tensor, init: int) -> list[int]:
    """The authors' rule, to the letter: a list of slot ids that can repeat, `init` always last.

    r = the number of prompts with higher entropy than `init`; A = prompts ranked after `init` by descending
    entropy (just `init` when it ranks last); B = the top-r prompts by D. Each id i of A & B (increasing)
    is mapped to entropy_order[i] -- the authors' indexing, kept on purpose -- and `init` is appended.
    """
    n = entropy_m.shape[0]
    entropy_order = torch.topk(entropy_m, n).indices
    init_rank = int((entropy_order == init).nonzero()[0, 0])
    after_init = entropy_order[min(init_rank + 1, n - 1) :]
    top_probdiff = torch.topk(probdiff_m, n).indices[:init_rank]
    common = np.intersect1d(after_init.cpu().numpy(), top_probdiff.cpu().numpy())
    return [int(entropy_order[i]) for i in common] + [init]


class DynaPrompt:
    """Per sample: score the buffer, select (or append), tune the selected prompts, predict with them."""

    Config = Config
    order_independent = False
    uses_templates = False

    def __init__(self, text: PromptTextEncoder, tuning: TuningConfig, config: Config, templates=None):
        self.text = text
        self.tuning = tuning
        self.config = config
        self.scale = text.logit_scale().detach()
        self.scaler = make_grad_scaler(text.init_context.device, tuning)
        self.v0_features = encode_for_prediction(text, text.init_context.unsqueeze(0), tuning)[0]
        self.reset()

    def reset(self) -> None:
        """Empty buffer (paper) or M fresh slots at v0 (official), at the start of a stream."""
        self.buffer: dict[int, BufferedPrompt] = {}
        self.lru: list[int] = []  # prompt ids, least recently selected first
        self.next_id = 0
        if self.config.selection == "official":
            for _ in range(self.config.buffer_size):
                self._append_fresh()

    def state_dict(self) -> dict:
        """The buffer (contexts, carried text features, use counts), the LRU order, the id counter, the scaler."""
        ids = list(self.buffer)
        prompts = [self.buffer[i] for i in ids]
        def stacked(tensors, like):
            return torch.stack(tensors) if tensors else like.new_zeros((0, *like.shape))

        return {"ids": ids, "uses": [p.uses for p in prompts], "lru": list(self.lru), "next_id": self.next_id,
                "contexts": stacked([p.context for p in prompts], self.text.init_context),
                "features": stacked([p.features for p in prompts], self.v0_features),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        device = self.text.init_context.device
        self.buffer = {int(i): BufferedPrompt(int(i), state["contexts"][k].to(device), state["features"][k].to(device),
                                              int(state["uses"][k])) for k, i in enumerate(state["ids"])}
        self.lru = [int(i) for i in state["lru"]]
        self.next_id = int(state["next_id"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def begin(self, view_features: torch.Tensor) -> TuningRequest:
        """Steps 1-6: score the buffer from carried features, select (or append), mark the selection in LRU order."""
        if self.config.selection == "official":
            mentions, appended, deleted = self._select_official(view_features)
        else:
            mentions, appended, deleted = self._select_paper(view_features)
        for prompt_id in mentions:  # LRU: once per mention, as the authors' code does
            self.lru.remove(prompt_id)
            self.lru.append(prompt_id)
            self.buffer[prompt_id].uses += 1
        return self._tuning_request(mentions, appended, deleted, view_features)

    def finish(self, request: TuningRequest, tuned: torch.Tensor, new_features: torch.Tensor) -> Outcome:
        """Steps 7-8 after the tuning: keep the stepped prompts and their features, predict by their mean logits."""
        mentions, appended, deleted, rows, before = request.state
        encoded = rows if request.reencode is None else [rows[k] for k in request.reencode]
        for k, prompt_id in enumerate(rows):
            self.buffer[prompt_id].context = tuned[k]
        for k, prompt_id in enumerate(encoded):  # the others did not move: their carried features stand
            self.buffer[prompt_id].features = new_features[k]
        features = torch.stack([self.buffer[prompt_id].features for prompt_id in rows])
        after = original_view_logits(request.view_features, features[request.mentions], self.scale)
        return Outcome(
            pred=int(after.argmax()), entropy_before=float(entropy(before)), entropy_after=float(entropy(after)),
            selected=mentions, appended=appended, deleted=deleted, buffer_size=self.buffer_in_use(),
        )

    def __call__(self, view_features: torch.Tensor) -> Outcome:
        return tune_and_finish(self, view_features)

    def _scores(self, features: torch.Tensor, view_features: torch.Tensor):
        """H and D of every prompt whose text features are stacked in `features` [P, C, E]."""
        logits = view_logits(view_features.float(), features, self.scale)
        ranking_entropy = official_prompt_entropy if self.config.selection == "official" else prompt_entropy
        return ranking_entropy(logits), probability_difference(logits, self.config.probdiff_kind)

    def _select_paper(self, view_features):
        """Steps 1-5 of the paper: metrics for v0 and the buffer, selection, appending with LRU deletion."""
        ids = list(self.buffer)
        features = torch.stack([self.v0_features] + [self.buffer[i].features for i in ids])
        entropy_all, probdiff_all = self._scores(features, view_features)
        config = self.config
        chosen = select_paper(entropy_all[1:], probdiff_all[1:], entropy_all[0], probdiff_all[0], config.criteria,
                              config.entropy_margin, config.probdiff_margin)
        mentions = [ids[position] for position in chosen]
        appended, deleted = [], []
        if not mentions:
            full = len(self.buffer) >= self.config.buffer_size
            if self.config.append or not full:
                if full:
                    deleted.append(self._delete(self.lru[0]))
                appended.append(self._append_fresh())
                mentions = appended[:]
            else:  # no-append ablation with a full buffer: fall back to the least recently selected prompt
                mentions = [self.lru[0]]
        return mentions, appended, deleted

    def _select_official(self, view_features):
        """The authors' loop: recycle the LRU slot once all are used; the fresh LRU slot is always selected."""
        deleted = []
        if self.config.append and all(prompt.uses > 0 for prompt in self.buffer.values()):
            deleted.append(self._reset_slot(self.lru[0]))
        init = self.lru[0]
        appended = [init] if self.buffer[init].uses == 0 else []
        slots = sorted(self.buffer)
        entropy_m, probdiff_m = self._scores(torch.stack([self.buffer[s].features for s in slots]), view_features)
        return select_official(entropy_m, probdiff_m, init), appended, deleted

    def _tuning_request(self, mentions: list[int], appended, deleted, view_features) -> TuningRequest:
        """Step 7's ask: one step on the selected prompts, repeats counting twice in the loss.

        Paper rule: the distinct selected prompts are the parameters. Official rule (clip/custom_clip_lessctx.py):
        every slot is an offset from v0 in one AdamW parameter, so the step also decays every other slot's offset
        toward v0 (by lr x weight_decay), and every slot is re-encoded by the prediction pass.
        """
        official = self.config.selection == "official"
        rows = sorted(self.buffer) if official else sorted(set(mentions))
        position = {prompt_id: k for k, prompt_id in enumerate(rows)}
        mention_index = [position[prompt_id] for prompt_id in mentions]
        old_features = torch.stack([self.buffer[i].features for i in rows])
        before = original_view_logits(view_features, old_features[mention_index], self.scale)
        contexts = torch.stack([self.buffer[i].context for i in rows])
        state = (mentions, appended, deleted, rows, before)
        # official: a slot still at v0 and not stepped keeps a zero offset through the step (decay of 0 is 0, a zero
        # gradient moves nothing): bit for bit v0, so its carried features stand and it is not re-encoded
        v0 = self.text.init_context
        seen = set(mention_index)
        moved = [k for k, i in enumerate(rows) if k in seen or not torch.equal(self.buffer[i].context, v0)]
        return TuningRequest(contexts, view_features, mention_index, state=state,
                             base=v0 if official else None, reencode=moved if official else None)

    def _append_fresh(self) -> int:
        """A new prompt at v0, most recently used; returns its id."""
        prompt_id = self.next_id
        self.next_id += 1
        self.buffer[prompt_id] = BufferedPrompt(
            prompt_id, self.text.init_context.clone(), self.v0_features.clone()
        )
        self.lru.append(prompt_id)
        return prompt_id

    def _delete(self, prompt_id: int) -> int:
        """Drop a prompt from the buffer (paper rule)."""
        del self.buffer[prompt_id]
        self.lru.remove(prompt_id)
        return prompt_id

    def _reset_slot(self, slot: int) -> int:
        """Official rule: a used slot goes back to v0 and counts as unused; it keeps its LRU position."""
        prompt = self.buffer[slot]
        prompt.context = self.text.init_context.clone()
        prompt.features = self.v0_features.clone()
        prompt.uses = 0
        return slot

    def buffer_in_use(self) -> int:
        """Prompts holding something learned: the buffer size (paper), the used slots (official)."""
        return sum(1 for prompt in self.buffer.values() if prompt.uses > 0)

    def final_buffer(self) -> list[dict]:
        """The buffer at the end of the stream, least recently selected first."""
        return [{"id": i, "uses": self.buffer[i].uses, "lru_rank": rank} for rank, i in enumerate(self.lru)]


DynaPromptConfig = Config
