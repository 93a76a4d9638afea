"""Diagnostics that explain two findings about methods on a stream (issue 27), as pure functions of cached view
features, text features and run records. The report shows each next to the method's accuracy.

- ECALP (`ecalp_text_edges`): its image-text edge weight is the *signed* dot product x . T_c raised to
  gamma = 10. Where a node's top-3 text edges include negative dot products (image-text cosines below 0, which
  OpenAI CLIP's 0.2-0.35 never are), the even power can make the most negative one the node's heaviest edge, so
  the node seeds a class other than its zero-shot top-1. Computed exactly as `methods.ecalp` builds its graph:
  the node feature by `Config.view`, the top-k_text classes by the raw dot product, weights ** gamma.
- C-TPT (`ctpt_gradients`): at the first step from v0, the size of the dispersion term's gradient
  (lambda * grad ATFD) against the entropy term's, and how much of AdamW's step follows the dispersion. Together
  with `prediction_agreement` against zero-shot, it tells whether the step is the calibration term's rather
  than the entropy's.
"""
from __future__ import annotations

import statistics

import pandas as pd
import torch

from .methods.ctpt import text_feature_dispersion
from .methods.ecalp import Config as ECALPConfig
from .methods.ecalp import node_feature
from .objectives import (
    TuningConfig,
    confident_view_indices,
    fresh_parameters,
    make_optimizer,
    marginal_entropy,
    view_logits,
)
from .text import PromptTextEncoder


def ecalp_text_edges(view_features: torch.Tensor, text_features: torch.Tensor,
                     config: ECALPConfig | None = None) -> dict:
    """ECALP's image-text edges over one stream's samples.

    `view_features` [N, V, E] (or [N, E]: one view each), `text_features` [C, E] the classifier ECALP's run
    uses (its templates), `config` its options (the defaults when None). Returns counts and shares:
    `negative_text_edges` of the N * k_text top-k text edges whose dot product is < 0, and `heaviest_not_top1` of
    the N nodes whose heaviest text edge (dot ** gamma) points at a class other than their zero-shot top-1 (the
    class of the largest dot product). Only the text edges seed classes, so only they are weighed here.
    """
    config = config if config is not None else ECALPConfig()
    views = view_features if view_features.dim() == 3 else view_features.unsqueeze(1)
    nodes = node_feature(views, config.view)
    text = text_features.float()
    k_text = min(config.k_text, text.shape[0])
    similarities, classes = (nodes @ text.t()).topk(k_text, dim=-1)  # sorted: column 0 is the zero-shot top-1
    heaviest = classes.gather(1, (similarities ** config.gamma).argmax(-1, keepdim=True))[:, 0]
    n_nodes = nodes.shape[0]
    negative = int((similarities < 0).sum())
    off_top1 = int((heaviest != classes[:, 0]).sum())
    return {"n_nodes": n_nodes, "text_edges": n_nodes * k_text,
            "negative_text_edges": negative, "negative_text_edge_share": negative / max(n_nodes * k_text, 1),
            "heaviest_not_top1": off_top1, "heaviest_not_top1_share": off_top1 / max(n_nodes, 1)}


def ctpt_first_step(text: PromptTextEncoder, view_features: torch.Tensor, tuning: TuningConfig,
                    lambda_term: float) -> tuple[float, float]:
    """C-TPT's first step from v0 on one sample: (|lambda grad ATFD| / |grad H|, share of the step's coordinates
    that move the way the dispersion term alone would move them).

    The loss is C-TPT's (`methods.ctpt.ctpt_loss`): H(mean softmax of the confident views) - lambda * ATFD. Its
    gradient splits into g_H and g_D = -lambda grad ATFD; the step is AdamW's first step on g_H + g_D with the
    run's `tuning:`. fp32, without autocast: the diagnostic reads directions, not fp16 rounding.
    """
    start = text.init_context.unsqueeze(0)
    params = fresh_parameters(start)
    with torch.enable_grad():
        features = text.encode(params)
        logits = view_logits(view_features.float(), features, text.logit_scale().detach())
        keep = confident_view_indices(logits.detach(), tuning.confident_ratio)
        entropy_term = marginal_entropy(logits[keep])[0]
        dispersion_term = -lambda_term * text_feature_dispersion(features[0])
        (entropy_grad,) = torch.autograd.grad(entropy_term, params, retain_graph=True)
        (dispersion_grad,) = torch.autograd.grad(dispersion_term, params)
    optimizer = make_optimizer([params], tuning)
    params.grad = entropy_grad + dispersion_grad
    optimizer.step()
    step = params.detach() - start
    ratio = float(dispersion_grad.norm() / entropy_grad.norm())
    follows = float((torch.sign(step) == -torch.sign(dispersion_grad)).float().mean())
    return ratio, follows


def ctpt_gradients(text: PromptTextEncoder, samples, tuning: TuningConfig, lambda_term: float) -> dict:
    """`ctpt_first_step` over one stream's samples (an iterable of [V, E] view features): the median gradient
    ratio, the mean share of step coordinates that follow the dispersion, and the number of samples."""
    ratios, follows = zip(*(ctpt_first_step(text, views, tuning, lambda_term) for views in samples))
    return {"n_samples": len(ratios), "gradient_ratio_median": statistics.median(ratios),
            "follows_dispersion_share": statistics.fmean(follows)}


def prediction_agreement(records: pd.DataFrame, reference: pd.DataFrame) -> float:
    """Share of samples on which two runs' records (`records.RECORD_COLUMNS`) predict the same class, matched by
    sample id (e.g. C-TPT against zero-shot on the same stream; the order of the rows does not matter)."""
    ours, theirs = (frame.set_index("sample_id")["pred"] for frame in (records, reference))
    for name, preds in (("records", ours), ("reference", theirs)):
        if preds.index.has_duplicates:
            raise ValueError(f"{name}: sample_id {preds.index[preds.index.duplicated()][0]!r} appears twice")
    for name, preds, other in (("reference", ours, theirs), ("records", theirs, ours)):
        missing = preds.index.difference(other.index)
        if len(missing):
            raise ValueError(f"sample_id {missing[0]!r} has no row in {name} ({len(missing)} samples missing)")
    if ours.empty:
        raise ValueError("no records to compare")
    return float((ours == theirs.loc[ours.index]).mean())
