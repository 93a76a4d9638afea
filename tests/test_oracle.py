"""Test oracle: each library method against its plain reference (benchmarks/reference.py) on the same samples.

The reference re-runs the image encoder over the views and the full-length text transformer with grad through
every prompt, and writes the selection and voting rules out again; the library reads cached view features,
truncated text and carried text features. Both must predict, select and score alike.
"""
import pytest

from benchmarks.reference import PlainCLIP, build_plain
from benchmarks.stream import Stream
from dynaprompt.methods import build_method
from dynaprompt.methods.dynaprompt import Config as DynaPromptConfig
from dynaprompt.model import ModelSpec, load_clip
from dynaprompt.objectives import TuningConfig
from dynaprompt.text import PromptTextEncoder

# ImageNet classes on which the random-weight model's zero-shot prediction changes from sample to sample
CLASSNAMES = ["axolotl", "snow leopard", "Dandie Dinmont Terrier", "flamingo", "Saharan horned viper", "Carolina anole"]
TUNING = TuningConfig(lr=0.05)
CASES = {
    "zero_shot": ("zero_shot", None),
    "zero": ("zero", None),
    "tpt": ("tpt", None),
    "online_tpt": ("online_tpt", None),
    "dynaprompt_paper": ("dynaprompt", DynaPromptConfig(buffer_size=3)),
    "dynaprompt_paper_logit": ("dynaprompt", DynaPromptConfig(buffer_size=3, probdiff="logit")),
    "dynaprompt_official": ("dynaprompt", DynaPromptConfig(buffer_size=3, selection="official")),
}


@pytest.fixture(scope="module")
def outcomes():
    """Case -> [(library outcome, reference result)] per sample: a random-weight tiny CLIP, 4 samples x 16 views."""
    clip = load_clip(ModelSpec(arch="tiny-clip", pretrained=None, device="cpu"))
    stream = Stream(clip, n_samples=4, n_views=16, seed=0)
    cache = stream.build_cache()
    samples = [(stream.views(i), cache(i)) for i in stream.ids]
    text, plain = PromptTextEncoder(clip.model, clip.tokenizer, CLASSNAMES), PlainCLIP(clip, CLASSNAMES)
    out = {}
    for case, (kind, config) in CASES.items():
        library, reference = build_method(kind, text, TUNING, config), build_plain(kind, plain, TUNING, config)
        out[case] = [(library(features), reference(views)) for views, features in samples]
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_library_agrees_with_its_plain_reference(outcomes, case):
    for got, want in outcomes[case]:
        assert got.pred == want.pred
        assert list(got.selected) == want.selected
        assert got.entropy_before == pytest.approx(want.entropy_before, abs=1e-4)
        assert got.entropy_after == pytest.approx(want.entropy_after, abs=1e-4)


def test_the_samples_exercise_the_rules(outcomes):
    """The agreement is not vacuous: predictions vary, ZERO's vote differs, buffers select, delete and recycle."""
    library = {case: [got for got, _ in pairs] for case, pairs in outcomes.items()}
    assert len({o.pred for o in library["zero_shot"]}) > 1
    assert [o.pred for o in library["zero"]] != [o.pred for o in library["zero_shot"]]
    assert any(o.entropy_after < o.entropy_before - 0.1 for o in library["tpt"])
    assert any(len(o.selected) > 1 for o in library["dynaprompt_paper"])
    assert any(o.deleted for o in library["dynaprompt_paper_logit"])
    assert any(o.deleted for o in library["dynaprompt_official"])
