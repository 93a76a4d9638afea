"""Selection rules on hand-computed metric vectors."""
import torch

from dynaprompt.methods.dynaprompt import probability_difference, prompt_entropy, select_official, select_paper


def t(values):
    return torch.tensor(values, dtype=torch.float32)


def test_paper_rule_needs_lower_entropy_and_higher_probdiff():
    entropy = t([0.5, 0.9, 0.2, 0.7])
    probdiff = t([0.3, 0.4, 0.1, 0.6])
    # v0: H = 0.8, D = 0.2 -> prompt 0 (0.5<0.8, 0.3>0.2), prompt 3 (0.7<0.8, 0.6>0.2); 1 fails H, 2 fails D
    assert select_paper(entropy, probdiff, t(0.8), t(0.2)) == [0, 3]
    assert select_paper(entropy, probdiff, t(0.8), t(0.2), "entropy_only") == [0, 2, 3]
    assert select_paper(entropy, probdiff, t(0.8), t(0.2), "probdiff_only") == [0, 1, 3]


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
