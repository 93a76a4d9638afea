"""Selection rules on hand-computed metric vectors."""
import torch

from dynaprompt.methods.dynaprompt import (
    official_prompt_entropy,
    probability_difference,
    prompt_entropy,
    select_official,
    select_paper,
)


def t(values):
    return torch.tensor(values, dtype=torch.float32)


def test_paper_rule_needs_lower_entropy_and_higher_probdiff():
    entropy = t([0.5, 0.9, 0.2, 0.7])
    probdiff = t([0.3, 0.4, 0.1, 0.6])
    # v0: H = 0.8, D = 0.2 -> prompt 0 (0.5<0.8, 0.3>0.2), prompt 3 (0.7<0.8, 0.6>0.2); 1 fails H, 2 fails D
    assert select_paper(entropy, probdiff, t(0.8), t(0.2)) == [0, 3]
    assert select_paper(entropy, probdiff, t(0.8), t(0.2), "entropy_only") == [0, 2, 3]
    assert select_paper(entropy, probdiff, t(0.8), t(0.2), "probdiff_only") == [0, 1, 3]


def test_paper_rule_margins_shift_both_thresholds():
    entropy = t([0.5, 0.75, 0.2, 0.7])
    probdiff = t([0.3, 0.4, 0.15, 0.6])
    # v0: H = 0.8, D = 0.2. tau_h = 0.2 -> H[m] < 0.6: prompts 0, 2; tau_d = 0.15 -> D[m] > 0.35: prompts 1, 3
    assert select_paper(entropy, probdiff, t(0.8), t(0.2), "both", 0.2, 0.0) == [0]  # 2 fails D > 0.2
    assert select_paper(entropy, probdiff, t(0.8), t(0.2), "both", 0.0, 0.15) == [1, 3]
    assert select_paper(entropy, probdiff, t(0.8), t(0.2), "both", 0.2, 0.15) == []
    assert select_paper(entropy, probdiff, t(0.8), t(0.2), "entropy_only", 0.2, 0.15) == [0, 2]
    # margin 0 is the paper's rule
    assert select_paper(entropy, probdiff, t(0.8), t(0.2), "both", 0.0, 0.0) == select_paper(
        entropy, probdiff, t(0.8), t(0.2))


def test_paper_rule_ties_with_v0_are_not_selected():
    assert select_paper(t([0.8]), t([0.2]), t(0.8), t(0.2)) == []


def test_official_intersection_ids_are_mapped_through_entropy_order():
    entropy = t([0.5, 0.9, 0.2, 0.7])  # descending order: [1, 3, 0, 2]; init=3 ranks 1
    probdiff = t([0.1, 0.3, 0.5, 0.0])  # descending order: [2, 1, 0, 3]; top-1 = [2]
    # A = [0, 2], B = [2], A & B = [2], mapped: entropy_order[2] = 0; init appended last.
    assert select_official(entropy, probdiff, init=3) == [0, 3]


def test_official_init_with_lowest_entropy_is_its_own_candidate_set():
    entropy = t([0.5, 0.9, 0.7, 0.2])  # order [1, 2, 0, 3]: init=3 ranks last, A = [3]
    assert select_official(entropy, t([0.1, 0.3, 0.5, 0.0]), init=3) == [3]  # B = [2, 1, 0]: empty
    # B = top-3 by D = [3, 1, 0] contains init: A & B = [3], mapped to entropy_order[3] = 3 -> named twice
    assert select_official(entropy, t([0.1, 0.3, 0.0, 0.5]), init=3) == [3, 3]


def test_official_init_with_highest_entropy_selects_init_alone():
    entropy = t([0.1, 0.2, 0.3, 0.9])
    assert select_official(entropy, t([0.9, 0.8, 0.7, 0.0]), init=3) == [3]


def test_official_mapped_ids_keep_increasing_intersection_order():
    entropy = t([0.6, 0.1, 0.9, 0.3, 0.5])  # descending: [2, 0, 4, 3, 1]; init=4 ranks 2 -> A = [3, 1]
    probdiff = t([0.0, 0.9, 0.1, 0.8, 0.2])  # descending: [1, 3, 4, 2, 0]; top-2 = [1, 3]
    # A & B = [1, 3] -> entropy_order[1] = 0, entropy_order[3] = 3; then init
    assert select_official(entropy, probdiff, init=4) == [0, 3, 4]


def test_official_fresh_slots_tie_and_break_like_topk():
    entropy = t([0.4, 0.4, 0.4, 0.4])
    probdiff = t([0.1, 0.1, 0.1, 0.1])
    order = torch.topk(entropy, 4).indices.tolist()
    init = 2
    rank = order.index(init)
    a = set(order[min(rank + 1, 3):])
    b = set(torch.topk(probdiff, 4).indices[:rank].tolist())
    expected = [order[i] for i in sorted(a & b)] + [init]
    assert select_official(entropy, probdiff, init=init) == expected


def test_official_ties_at_the_start_of_a_stream_by_hand():
    # M = 5 fresh slots: H and D tie exactly. On CPU torch.topk returns five equal values as [2, 4, 3, 0, 1]
    # (pinned here: the rest of the derivation rests on it).
    tie = t([0.7] * 5)
    assert torch.topk(tie, 5).indices.tolist() == [2, 4, 3, 0, 1]
    # Sample 1: init = slot 0 (LRU order [0..4]) ranks 3 -> A = order[4:] = [1], B = top-3 by D = [2, 4, 3]:
    # A & B empty -> slot 0 alone.
    assert select_official(tie, t([0.1] * 5), init=0) == [0]
    # Sample 2: slot 0 was tuned (here: lower H, higher D), slots 1-4 still tie; init = slot 1.
    # H = [0.5, .7, .7, .7, .7]: descending [1..4 in tie order, then 0]. torch.topk on these gives
    # [2, 4, 3, 1, 0] (pinned) -> init 1 ranks 3 -> A = order[4:] = [0]; D = [0.3, .1, .1, .1, .1]: top-3 = [0, ...]
    entropy, probdiff = t([0.5, 0.7, 0.7, 0.7, 0.7]), t([0.3, 0.1, 0.1, 0.1, 0.1])
    assert torch.topk(entropy, 5).indices.tolist() == [2, 4, 3, 1, 0]
    assert torch.topk(probdiff, 5).indices.tolist()[0] == 0
    # A & B = [0] -> mapped through the entropy order: order[0] = 2 (a fresh slot, not slot 0!), then init 1
    assert select_official(entropy, probdiff, init=1) == [2, 1]


def test_official_entropy_is_the_authors_expression():
    logits = torch.randn(64, 5, 10, generator=torch.Generator().manual_seed(0)) * 4
    log_p = logits - logits.logsumexp(dim=-1, keepdim=True)
    assert torch.equal(official_prompt_entropy(logits), (-(log_p * log_p.exp()).sum(dim=-1)).mean(0))
    assert torch.allclose(official_prompt_entropy(logits), prompt_entropy(logits), atol=1e-5)


def test_official_rule_at_stream_start_selects_as_the_authors_loop(text):
    """The first sample of an official stream: identical fresh slots, selection by the authors' lines."""
    from dynaprompt.methods import dynaprompt as dp
    from dynaprompt.objectives import TuningConfig, view_logits

    from .conftest import random_view_features

    method = dp.DynaPrompt(text, TuningConfig(lr=0.05), dp.DynaPromptConfig(selection="official", buffer_size=5))
    views = random_view_features(1, seed=4)[0]
    # the authors' loop, literally: logits of every slot, their entropy, max-logit difference, topk, intersect1d
    logits = view_logits(views, torch.stack([method.buffer[s].features for s in range(5)]), method.scale)
    log_p = logits - logits.logsumexp(dim=-1, keepdim=True)
    p_ent = (-(log_p * log_p.exp()).sum(dim=-1)).mean(0)
    plpd = (logits[0].max(-1)[0].unsqueeze(0) - logits[1:].max(dim=-1)[0]).mean(0)
    ent_order = p_ent.topk(5)[1]
    rank = int(torch.where(ent_order == 0)[0])
    common = sorted(set(ent_order[min(rank + 1, 4):].tolist()) & set(plpd.topk(5)[1][:rank].tolist()))
    expected = [int(ent_order[i]) for i in common] + [0]
    assert method(views).selected == expected


def test_metrics_by_hand():
    # 3 views (0 = original), 1 prompt, 2 classes
    logits = t([[[2.0, 0.0]], [[1.0, 0.0]], [[0.0, 0.5]]])
    # max logit: original 2.0; augmented 1.0 and 0.5 -> D = mean(1.0, 1.5) = 1.25
    assert torch.allclose(probability_difference(logits, "logit"), t([1.25]))
    probs = logits.softmax(-1)[:, 0, 0]  # class 0 is the original's prediction
    expected = ((probs[0] - probs[1]) + (probs[0] - probs[2])) / 2
    assert torch.allclose(probability_difference(logits, "prob"), expected.reshape(1))
    h = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean(0)
    assert torch.allclose(prompt_entropy(logits), h)
