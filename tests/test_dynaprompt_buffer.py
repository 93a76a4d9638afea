"""Appending, LRU deletion and untouched prompts in DynaPrompt's buffer."""
import torch

from dynaprompt.methods import dynaprompt as dp
from dynaprompt.objectives import TuningConfig

from .conftest import random_view_features

TUNING = TuningConfig(lr=0.05)


def make(text, **config):
    return dp.DynaPrompt(text, TUNING, dp.DynaPromptConfig(**config))


def test_nothing_selected_appends_and_evicts_least_recently_selected(text, monkeypatch):
    monkeypatch.setattr(dp, "select_paper", lambda *args, **kwargs: [])
    method = make(text, buffer_size=3)
    outcomes = [method(v) for v in random_view_features(5)]
    assert [o.appended for o in outcomes] == [[0], [1], [2], [3], [4]]
    assert [o.deleted for o in outcomes] == [[], [], [], [0], [1]]
    assert [o.buffer_size for o in outcomes] == [1, 2, 3, 3, 3]
    assert sorted(method.buffer) == [2, 3, 4]


def test_selected_prompts_become_most_recent(text, monkeypatch):
    picks = iter([[], [], [], [0], []])  # append 0, 1, 2; select 0; then append -> evicts 1, not 0
    monkeypatch.setattr(dp, "select_paper", lambda *args, **kwargs: next(picks))
    method = make(text, buffer_size=3)
    outcomes = [method(v) for v in random_view_features(5)]
    assert outcomes[3].selected == [0] and outcomes[3].appended == []
    assert outcomes[4].deleted == [1] and outcomes[4].appended == [3]


def test_no_append_keeps_first_m_prompts(text, monkeypatch):
    monkeypatch.setattr(dp, "select_paper", lambda *args, **kwargs: [])
    method = make(text, buffer_size=2, append=False)
    outcomes = [method(v) for v in random_view_features(5)]
    assert [o.appended for o in outcomes] == [[0], [1], [], [], []]
    assert all(o.deleted == [] for o in outcomes)
    assert [o.selected for o in outcomes[2:]] == [[0], [1], [0]]  # least recently selected, in turn


def lru_replay_checks(outcomes, buffer_size):
    """Replay the records: buffer <= M, every deletion is the least recently selected prompt."""
    last_selected, buffer = {}, set()
    for step, outcome in enumerate(outcomes):
        for victim in outcome.deleted:
            assert victim == min(buffer, key=lambda i: last_selected[i])
            buffer.remove(victim)
        buffer.update(outcome.appended)
        assert len(buffer) <= buffer_size
        for position, prompt_id in enumerate(outcome.selected):
            last_selected[prompt_id] = (step, position)
        assert outcome.buffer_size == len(buffer)


def test_real_selection_respects_buffer_bound_and_lru(text):
    method = make(text, buffer_size=3)
    outcomes = [method(v) for v in random_view_features(40, seed=3)]
    assert any(o.deleted for o in outcomes), "the stream should exercise deletion"
    assert any(o.selected and not o.appended for o in outcomes), "the stream should exercise reuse"
    lru_replay_checks(outcomes, 3)


def test_prompts_outside_selection_are_bit_identical_after_a_step(text):
    method = make(text, buffer_size=4)
    features = random_view_features(30, seed=5)
    checked = 0
    for v in features:
        before = {i: (p.context.clone(), p.features.clone()) for i, p in method.buffer.items()}
        outcome = method(v)
        for prompt_id, (context, feats) in before.items():
            if prompt_id in outcome.selected or prompt_id in outcome.deleted:
                continue
            checked += 1
            assert torch.equal(method.buffer[prompt_id].context, context)
            assert torch.equal(method.buffer[prompt_id].features, feats)
        for prompt_id in set(outcome.selected) - set(outcome.appended):
            assert not torch.equal(method.buffer[prompt_id].context, before[prompt_id][0])
    assert checked > 0


def test_carried_features_equal_fresh_encoding(text):
    method = make(text, buffer_size=3)
    for v in random_view_features(10, seed=7):
        method(v)
    for prompt in method.buffer.values():
        fresh = text.encode(prompt.context.unsqueeze(0))[0]
        assert torch.allclose(prompt.features, fresh, atol=1e-6)


def test_official_rule_slots_lru_and_recycling(text):
    method = make(text, buffer_size=3, selection="official")
    outcomes = [method(v) for v in random_view_features(12, seed=11)]
    # First M samples: the fresh slots 0, 1, 2 are used in turn, each selected last.
    assert [o.selected[-1] for o in outcomes[:3]] == [0, 1, 2]
    assert [o.appended for o in outcomes[:3]] == [[0], [1], [2]]
    for outcome in outcomes[3:]:
        # Every slot was used: the least recently used one is recycled and is the fresh init prompt.
        assert len(outcome.deleted) == 1 and outcome.appended == outcome.deleted
        assert outcome.selected[-1] == outcome.deleted[0]
    assert all(o.buffer_size <= 3 for o in outcomes)


def test_official_twice_named_prompt_counts_twice(text, monkeypatch):
    monkeypatch.setattr(dp, "select_official", lambda entropy, probdiff, init: [init, init])
    method = make(text, buffer_size=3, selection="official")
    outcome = method(random_view_features(1)[0])
    assert outcome.selected == [0, 0]
    assert method.buffer[0].uses == 2
    assert method.lru == [1, 2, 0]


def test_official_slots_are_offsets_that_decay_toward_v0_at_every_sample(text):
    """The authors' parameterisation: an unselected slot's offset from v0 shrinks by lr x wd per sample, by hand."""
    tuning = TuningConfig(lr=0.05, weight_decay=0.01)
    method = dp.DynaPrompt(text, tuning, dp.Config(buffer_size=3, selection="official"))
    v0, factor = text.init_context, 1 - 0.05 * 0.01
    checked, largest = 0, 0.0
    for features in random_view_features(8, n_views=16, dim=128, seed=11):
        before = {i: prompt.context.clone() for i, prompt in method.buffer.items()}
        outcome = method(features)
        for i, prompt in method.buffer.items():
            if i in outcome.selected or i in outcome.deleted:  # stepped, or reset to v0 and stepped
                continue
            torch.testing.assert_close(prompt.context, v0 + (before[i] - v0) * factor, rtol=0, atol=1e-7)
            checked, largest = checked + 1, max(largest, float((before[i] - v0).abs().max()))
        for prompt in method.buffer.values():  # every slot moved: every carried feature is re-encoded
            torch.testing.assert_close(prompt.features, text.encode(prompt.context.unsqueeze(0))[0], rtol=0, atol=1e-6)
    assert checked > 0 and largest > 0  # some slot was tuned, then left out, and decayed


def test_paper_rule_prompts_are_their_own_parameters(text):
    """The paper's rule: an unselected prompt does not move at all (no decay toward v0 or 0)."""
    method = dp.DynaPrompt(text, TuningConfig(lr=0.05, weight_decay=0.01), dp.Config(buffer_size=3))
    for features in random_view_features(6, n_views=16, dim=128, seed=12):
        before = {i: prompt.context.clone() for i, prompt in method.buffer.items()}
        outcome = method(features)
        for i in before:
            if i in method.buffer and i not in outcome.selected:
                assert torch.equal(method.buffer[i].context, before[i])
