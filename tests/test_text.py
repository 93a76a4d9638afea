"""The prompt text encoder: CoOp prompts, truncated sequences, one batched pass."""
import pytest
import torch

from dynaprompt.text import PromptTextEncoder

from .conftest import CLASSNAMES


@pytest.fixture(scope="module")
def encoders(clip):
    cut = PromptTextEncoder(clip.model, clip.tokenizer, CLASSNAMES, truncate=True)
    full = PromptTextEncoder(clip.model, clip.tokenizer, CLASSNAMES, truncate=False)
    return cut, full


def test_truncation_shortens_the_sequences(encoders, clip):
    cut, full = encoders
    assert full.sequence_length == clip.model.context_length
    assert cut.sequence_length < full.sequence_length
    assert cut.sequence_length == int(cut.tokens.argmax(-1).max()) + 1


def test_truncation_changes_no_feature_at_init(encoders):
    cut, full = encoders
    v0 = cut.init_context.unsqueeze(0)
    torch.testing.assert_close(cut.encode(v0), full.encode(v0), rtol=0, atol=1e-6)


def test_truncation_changes_no_feature_after_perturbing_contexts(encoders):
    cut, full = encoders
    generator = torch.Generator().manual_seed(0)
    contexts = cut.init_context + 0.5 * torch.randn(5, *cut.init_context.shape, generator=generator)
    torch.testing.assert_close(cut.encode(contexts), full.encode(contexts), rtol=0, atol=1e-6)


def test_v0_prompt_equals_encoding_the_plain_sentence(encoders, clip):
    cut, _ = encoders
    sentences = [f"a photo of a {name.replace('_', ' ')}." for name in CLASSNAMES]
    reference = clip.model.encode_text(clip.tokenizer(sentences), normalize=True)
    torch.testing.assert_close(cut.encode(cut.init_context.unsqueeze(0))[0], reference, rtol=0, atol=1e-6)


def test_batched_pass_equals_one_prompt_at_a_time(encoders):
    cut, _ = encoders
    noise = torch.randn(3, *cut.init_context.shape, generator=torch.Generator().manual_seed(1))
    contexts = cut.init_context + 0.1 * noise
    batched = cut.encode(contexts)
    single = torch.cat([cut.encode(c.unsqueeze(0)) for c in contexts])
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-6)
    assert batched.shape == (3, len(CLASSNAMES), 128)


def test_ctx_init_length_must_match_n_ctx(clip):
    with pytest.raises(ValueError, match="n_ctx"):
        PromptTextEncoder(clip.model, clip.tokenizer, CLASSNAMES, n_ctx=3, ctx_init="a photo of a")


def test_random_init_without_words_is_seeded(clip):
    a = PromptTextEncoder(clip.model, clip.tokenizer, CLASSNAMES, ctx_init=None, init_seed=3)
    b = PromptTextEncoder(clip.model, clip.tokenizer, CLASSNAMES, ctx_init=None, init_seed=3)
    assert torch.equal(a.init_context, b.init_context)
    assert a.init_context.std() < 0.05


def test_gradients_reach_the_context(encoders):
    cut, _ = encoders
    context = cut.init_context.clone().unsqueeze(0).requires_grad_(True)
    cut.encode(context).sum().backward()
    assert context.grad is not None and context.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------ chunks under a token budget


def chunked_case(clip, budget_sequences: int):
    """Three prompts over the test's classes: one pass, and chunks of `budget_sequences` sequences."""
    whole = PromptTextEncoder(clip.model, clip.tokenizer, CLASSNAMES)
    chunked = PromptTextEncoder(clip.model, clip.tokenizer, CLASSNAMES,
                                max_tokens=budget_sequences * whole.sequence_length)
    generator = torch.Generator().manual_seed(1)
    contexts = whole.init_context + 0.3 * torch.randn(3, *whole.init_context.shape, generator=generator)
    return whole, chunked, contexts


@pytest.mark.parametrize("budget_sequences", [1, 2, 4])
def test_chunked_features_and_predictions_equal_one_pass(clip, budget_sequences):
    whole, chunked, contexts = chunked_case(clip, budget_sequences)
    assert chunked.sequences_per_chunk == budget_sequences < 3 * len(CLASSNAMES)  # it does chunk
    one, parts = whole.encode(contexts), chunked.encode(contexts)
    torch.testing.assert_close(parts, one, rtol=0, atol=1e-6)
    image = torch.nn.functional.normalize(torch.randn(7, one.shape[-1], generator=torch.Generator().manual_seed(2)),
                                          dim=-1)
    assert torch.equal((image @ one.transpose(1, 2)).argmax(-1), (image @ parts.transpose(1, 2)).argmax(-1))


@pytest.mark.parametrize("budget_sequences", [1, 4])
def test_chunked_gradients_equal_one_pass_under_checkpointing(clip, budget_sequences):
    """The same loss through chunks under activation checkpointing gives the same gradients (to 1e-6 relative)."""
    whole, chunked, contexts = chunked_case(clip, budget_sequences)
    image = torch.nn.functional.normalize(torch.randn(5, 128, generator=torch.Generator().manual_seed(3)), dim=-1)
    grads = []
    for encoder in (whole, chunked):
        params = contexts.clone().requires_grad_(True)
        logits = 10 * image @ encoder.encode(params).transpose(1, 2)  # [P, V, C]
        (-(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()).backward()
        grads.append(params.grad)
    scale = float(grads[0].abs().max())
    assert scale > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-6 * scale)


def test_no_budget_or_a_large_one_is_a_single_pass(clip):
    whole = PromptTextEncoder(clip.model, clip.tokenizer, CLASSNAMES)
    roomy = PromptTextEncoder(clip.model, clip.tokenizer, CLASSNAMES, max_tokens=10**6)
    contexts = whole.init_context.unsqueeze(0).repeat(2, 1, 1)
    assert torch.equal(whole.encode(contexts), roomy.encode(contexts))  # bit for bit: the same one pass


def test_template_features_come_back_from_the_cache_unchanged(clip, tmp_path):
    from dynaprompt.text import TemplateCache, template_features

    cache = TemplateCache(tmp_path, {"weights": "random(seed=0)", "arch": "tiny-clip"})
    fresh = template_features(clip.model, clip.tokenizer, CLASSNAMES, "a photo of a {}.", "cpu")
    first = cache.features(clip.model, clip.tokenizer, CLASSNAMES, "a photo of a {}.", "cpu")
    assert len(list(tmp_path.glob("*.pt"))) == 1 and torch.equal(first, fresh)
    again = cache.features(clip.model, clip.tokenizer, CLASSNAMES, "a photo of a {}.", "cpu")
    assert torch.equal(again, fresh) and len(list(tmp_path.glob("*.pt"))) == 1  # read back, not recomputed
    cache.features(clip.model, clip.tokenizer, CLASSNAMES, "a {}.", "cpu")
    cache.features(clip.model, clip.tokenizer, CLASSNAMES[:2], "a {}.", "cpu")
    other = TemplateCache(tmp_path, {"weights": "other", "arch": "tiny-clip"})
    other.features(clip.model, clip.tokenizer, CLASSNAMES, "a {}.", "cpu")
    assert len(list(tmp_path.glob("*.pt"))) == 4  # another template, class list or model: another entry
