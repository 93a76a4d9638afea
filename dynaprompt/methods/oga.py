"""OGA (Fuchs, Zanella and De Vleeschouwer, 2025, "Online Gaussian Adaptation of Vision-Language Models",
arXiv 2501.04352): Gaussian class models fitted to a memory of low-entropy samples, combined with the zero-shot
prediction as a maximum a posteriori.

Read from the authors' code, cfuchs2023/OGA @ b91d449 (MIT). The method is unchanged since 6be7425 (comments
added to the initial commit 26b6010); the later commits touch README.md and LICENSE only. The class is
`OGA/OGA_core.py:GaussAdapt`, driven by `runner.py:run` with the arguments of `main.py:get_arguments`. For one
sample, in the order the code runs:

- Zero-shot (`runner.py:L136-146`): logits = 100 * f . T with the literal `temp = 100` (L136; `Config.logit_scale`
  "model" takes the model's scale instead). They are kept in float64, p = softmax(logits), the pseudo-label is
  argmax(logits) and the entropy is -sum p log(p + 1e-9) (L146; GaussAdapt.get_entropy's 1e-6 is never called).
  - f is the sample's one feature: the authors cache one CLIP-preprocessed image per sample
    (compute_features.py) and use no augmented views. Here that is view 0.
  - T is `utils.py:clip_classifier`, the normalised mean of the normalised embeddings of the dataset's templates
    (`prompts_types` "standard", main.py:L21: the dataset's `template` list, one template per set). Here it is
    `zero_shot.classifier(text, templates)`.
- Memory (`GaussAdapt.__init__`, L21-36): per class `shot_capacity` = 8 slots (main.py:L18) of features,
  entropies and an occupied flag. The features and entropies are stored in float16 (L23, L34, the authors'
  explicit dtype). Every slot's entropy starts at log K (`__init_entropy`, prop_max 1).
- Update (`__update_memory_entropy`, L43-54): if the entropy is lower than any slot entropy of its pseudo-class,
  the sample replaces that class's slot with the highest entropy (torch.argmax: the first one on a tie).
  - Empty slots hold log K, so they fill first, in slot order.
  - The comparison runs in float16: the float64 entropy is a 0-dim tensor against a float16 row, and PyTorch
    promotes to the row's dtype. So an entropy equal to a stored one at float16 precision is rejected.
- Means (`__update_mu`, L83-91), only when the memory changed (`update_memory`, L77-79):
  - mean_k = torch.mean(occupied * memory, dim=1), a mean over all 8 slots, empty ones counting as zeros. So a
    class holding n < 8 samples gets (n/8) times their mean. It is computed in float16, then cast to float32.
  - Only classes holding >= 2 samples take it (L87, "# was >2"). The others keep their text feature T_k.
  - `normalize_mu` is False (main.py:L33).
- Shared covariance (`__update_sigma`, RidgeMoorePenrose, L109-140; sig_type default main.py:L32), only once some
  class holds > 2 samples (L113):
  - The centred vectors are every stored sample minus its class's mean (class by class, slots in order). A
    class with a single sample is centred on its *text* feature, since its mean was not updated.
  - M = c^T c / (n - 1), where c is those vectors minus their own average and n the number of stored samples.
  - If n <= 4d: Sigma^-1 = d * pinv((n - 1) M + tr(M) I), the empirical-Bayes ridge of L129-136. Else
    Sigma^-1 = pinv(M) (L137-140). Before any update Sigma^-1 = d * I (L20).
  - "Ridge" and "MoorePenrose" (L95-108, L141-150) are the other two estimators: M = torch.cov(c), then always
    the ridge, or always pinv.
- Log-likelihoods (`get_log_probs`, L154-160): x Sigma^-1 mu_k - mu_k Sigma^-1 mu_k / 2 - x Sigma^-1 x / 2, on the
  full-precision feature x.
- MAP (`get_MAP`, L163-200, called with simplex_p=True and tau = 0.05, main.py:L31):
  z = p ** 1.0 * softmax(tau * log-likelihoods), renormalised (lambd = 1.0 at L165). pred = argmax(z).
- Order (`runner.py:L231-257`): the memory is updated with a batch, then the batch is predicted. So a sample
  is predicted by the model its own update built.

Where this differs from the authors:
- Batch size 1. The authors feed batches of 32 (main.py:L17), update the memory on the whole batch (sample
  by sample), refit the Gaussians once, and then predict the batch. A sample there is predicted with the
  updates of the batch's *later* samples too. A stream of single samples cannot see ahead, so here every sample
  updates and is predicted alone. That is also TTABC's OGA (walawalagoose/TTABC ttabc/configs/algorithms.py
  "oga": batch_size 1).
- fp32 text features and zero-shot logits. The authors cast T to float16 (utils.py:L377) and multiply float16
  features. The memory, its means and the entropies it compares keep the authors' float16 (`memory_dtype`).
- The mean-to-covariance recomputation is the authors' line for line. Sigma itself (`self.Sig`) is never read
  by the prediction, so only Sigma^-1 is kept. The MAP weights W, b are refreshed after each memory change
  rather than per batch; they are the same numbers.
- `main.py:L33 --normalize_mu` is `type=bool`, so any non-empty string turns it on. Here it is a boolean.
- The authors run 100 shuffles per dataset (main.py:L16, runner.py:L53-55, L155-161) and report the mean and
  the expected tail accuracy over them. Here one run is one ordering; the sweep's orderings play that part.

Paper, other implementations:
- The paper (arXiv 2501.04352; its text was not available here beyond the abstract and README) describes the
  same pieces: a cache of low-entropy zero-shot samples, Gaussian class likelihoods with a shared covariance,
  and a MAP with the zero-shot soft labels.
- TTABC (ttabc/model_selection/oga.py, @ 009fc22) copies GaussAdapt verbatim. It computes the entropy with
  GaussAdapt.get_entropy (+1e-6, on the model's own logits and logit scale, under autocast) and uses
  batch size 1.
- tta-vlm (TomSheng21/tta-vlm) has no OGA.

Records:
- An entry is one memory slot's sample. Every sample stored gets the next integer id (a counter reset by
  `reset()`).
- `appended`: the id stored at this sample. `deleted`: the id it replaced (none while the class had an empty
  slot). `buffer_size`: the number of occupied slots over all classes. `selected` is empty.
- `entropy_before`: the entropy of the zero-shot softmax. `entropy_after`: the entropy of the MAP posterior z.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..objectives import TuningConfig, entropy
from ..records import Outcome
from ..text import PromptTextEncoder
from .zero_shot import LOGIT_SCALES, chosen_logit_scale, classifier

AUTHORS_LOGIT_SCALE = 100.0  # runner.py:L136 `temp = 100` (also GaussAdapt.temp, OGA_core.py:L15, unused)
SIG_TYPES = ("RidgeMoorePenrose", "Ridge", "MoorePenrose")  # OGA_core.py:L9
MEMORY_DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class Config:
    """OGA's constants: cfuchs2023/OGA main.py argument defaults, the same on every dataset."""

    shot_capacity: int = 8  # memory slots per class (main.py:L18 --shot_capacity)
    tau: float = 0.05  # MAP temperature on the Gaussian log-likelihoods (main.py:L31 --tau)
    sig_type: str = "RidgeMoorePenrose"  # covariance estimator (main.py:L32 --sig_type)
    normalize_mu: bool = False  # renormalise the class means (main.py:L33 --normalize_mu)
    logit_scale: str = "authors"  # authors: runner.py:L136 temp = 100 | model: the model's logit_scale
    entropy_eps: float = 1e-9  # zero-shot entropy -sum p log(p + eps) (runner.py:L146)
    mean_min_shots: int = 2  # a class's mean replaces its text feature from this many samples (OGA_core.py:L87)
    sigma_min_shots: int = 3  # the covariance is refitted once a class holds this many (L113: > 2)
    ridge_samples_per_dim: int = 4  # the ridge estimator while n <= 4 d, pinv after (L129)
    memory_dtype: str = "float16"  # stored features and entropies (OGA_core.py:L23, L34)

    def __post_init__(self):
        if self.shot_capacity < 1:
            raise ValueError("shot_capacity must be >= 1")
        for name, allowed in (("sig_type", SIG_TYPES), ("logit_scale", LOGIT_SCALES),
                              ("memory_dtype", MEMORY_DTYPES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")


def trace(matrix: torch.Tensor) -> torch.Tensor:
    """The authors' torch.sum(M[range(d), range(d)]) (L132): the same sum order, so the same float32 number."""
    dim = matrix.shape[0]
    return torch.sum(matrix[range(dim), range(dim)])


class OGA:
    """Per sample: zero-shot, offer it to the memory, refit the Gaussians if it was kept, predict by MAP."""

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
        """Empty memory at entropy log K, means = text features, Sigma^-1 = d I, a fresh id counter."""
        n_classes, dim = self.text_features.shape
        capacity, device = self.config.shot_capacity, self.text_features.device
        dtype = getattr(torch, self.config.memory_dtype)
        self.memory = torch.zeros(n_classes, capacity, dim, dtype=dtype, device=device)
        start = -torch.log(torch.tensor(1 / n_classes))  # float32, then the memory's dtype (OGA_core.py:L32-34)
        self.entropies = torch.full((n_classes, capacity), float(start), device=device).to(dtype)
        self.occupied = torch.zeros(n_classes, capacity, dtype=torch.bool, device=device)
        self.ids = torch.full((n_classes, capacity), -1, dtype=torch.long, device=device)
        self.means = self.text_features.clone()
        self.inverse_covariance = dim * torch.eye(dim, device=device)
        self.next_id = 0
        self.refresh_discriminant()

    def state_dict(self) -> dict:
        return {"memory": self.memory.clone(), "entropies": self.entropies.clone(), "occupied": self.occupied.clone(),
                "ids": self.ids.clone(), "means": self.means.clone(),
                "inverse_covariance": self.inverse_covariance.clone(), "next_id": self.next_id}

    def load_state_dict(self, state: dict) -> None:
        for name in ("memory", "entropies", "occupied", "ids", "means", "inverse_covariance"):
            getattr(self, name).copy_(state[name])
        self.next_id = int(state["next_id"])
        self.refresh_discriminant()

    def zero_shot(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float64 logits and probabilities of one feature (runner.py:L136-145)."""
        logits = ((self.scale * feature) @ self.text_features.t()).double()
        return logits, logits.softmax(-1)

    def offer(self, feature: torch.Tensor, value: torch.Tensor, label: int) -> tuple[list[int], list[int]]:
        """__update_memory_entropy: replace the class's highest-entropy slot if `value` is below any slot's."""
        row = self.entropies[label]
        if not bool((value < row).any()):  # 0-dim float64 against a row: compared in the row's dtype
            return [], []
        slot = int(row.argmax())
        replaced = int(self.ids[label, slot])
        self.memory[label, slot] = feature
        self.entropies[label, slot] = value
        self.occupied[label, slot] = True
        self.ids[label, slot] = self.next_id
        self.next_id += 1
        return [self.next_id - 1], [replaced] if replaced >= 0 else []

    def refit_means(self) -> None:
        """__update_mu: the mean over all slots (empty ones as zeros) for classes with enough samples."""
        means = torch.mean(self.occupied.unsqueeze(-1) * self.memory, dim=1).float()
        enough = self.occupied.sum(1) >= self.config.mean_min_shots
        self.means[enough] = means[enough]
        if self.config.normalize_mu:
            self.means[enough] = self.means[enough] / torch.linalg.norm(self.means[enough], dim=-1, keepdim=True)

    def refit_inverse_covariance(self) -> None:
        """__update_sigma: the shared covariance of the class-centred memory, inverted by ridge or pinv."""
        if not bool((self.occupied.sum(1) >= self.config.sigma_min_shots).any()):
            return
        dim = self.means.shape[-1]
        centred = (self.memory - self.means.unsqueeze(1))[self.occupied]  # class by class, slots in order
        eye = torch.eye(dim, device=centred.device)
        if self.config.sig_type == "RidgeMoorePenrose":
            n = self.occupied.sum()
            deviations = centred - centred.mean(dim=0)
            scatter = deviations.t() @ deviations / (n - 1)
            if n <= self.config.ridge_samples_per_dim * dim:
                inverse = dim * torch.linalg.pinv((n - 1) * scatter + trace(scatter) * eye)
            else:
                inverse = torch.linalg.pinv(scatter)
        else:
            scatter, n = centred.t().cov(), centred.shape[0]
            if self.config.sig_type == "Ridge":
                inverse = dim * torch.linalg.pinv((n - 1) * scatter + trace(scatter) * eye)
            else:
                inverse = torch.linalg.pinv(scatter)
        self.inverse_covariance = inverse

    def refresh_discriminant(self) -> None:
        """get_log_probs's W [d, K] and b [K] for the current means and Sigma^-1."""
        self.weights = torch.einsum("nd, dc -> cn", self.means, self.inverse_covariance)
        self.bias = -torch.einsum("nd, dc, nc -> n", self.means, self.inverse_covariance, self.means) / 2

    def log_likelihoods(self, feature: torch.Tensor) -> torch.Tensor:
        """Gaussian log-likelihoods [K] of one feature, up to a constant (get_log_probs)."""
        x = feature.unsqueeze(0)
        quadratic = -torch.einsum("nd, dc, nc -> n", x, self.inverse_covariance, x) / 2
        return (x @ self.weights + self.bias + quadratic[:, None])[0]

    @torch.no_grad()
    def __call__(self, view_features: torch.Tensor) -> Outcome:
        config = self.config
        feature = view_features[0].float()
        logits, probs = self.zero_shot(feature)
        value = -torch.sum(torch.log(probs + config.entropy_eps) * probs)
        appended, deleted = self.offer(feature, value, int(logits.argmax()))
        if appended:
            self.refit_means()
            self.refit_inverse_covariance()
            self.refresh_discriminant()
        gaussian = (config.tau * self.log_likelihoods(feature)).softmax(-1)
        posterior = probs * gaussian  # float64 * float32 -> float64, as get_MAP's y_hat ** 1.0 * p_
        posterior = posterior / posterior.sum()
        return Outcome(pred=int(posterior.argmax()), entropy_before=float(entropy(logits)),
                       entropy_after=float(torch.special.entr(posterior).sum()), appended=appended, deleted=deleted,
                       buffer_size=int(self.occupied.sum()))

    def snapshot(self) -> dict:
        """{class: [(id, entropy), ...]} over the occupied slots in slot order (for inspection and tests)."""
        ids, entropies = self.ids.tolist(), self.entropies.float().tolist()
        return {label: [(i, e) for i, e in zip(ids[label], entropies[label]) if i >= 0]
                for label in range(self.n_classes) if any(i >= 0 for i in ids[label])}
