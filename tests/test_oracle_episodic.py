"""Test oracle for the episodic tuners C-TPT and R-TPT: each against its plain reference (benchmarks/reference.py).

The reference re-runs the image encoder over the views on every pass and the full-length text transformer with
grad, and writes the losses, the confident views, the dispersion and the view weights out again; the library reads
cached view features and truncated text. Both must predict alike, with entropies within 1e-4.
"""
import pytest

from benchmarks.reference import PlainCLIP, build_plain
from benchmarks.stream import Stream
from dynaprompt.methods.ctpt import CTPT
from dynaprompt.methods.rtpt import RTPT
from dynaprompt.methods.tpt import TPT
from dynaprompt.model import ModelSpec, load_clip
from dynaprompt.objectives import TuningConfig
from dynaprompt.text import PromptTextEncoder

# ImageNet classes on which the random-weight model's zero-shot prediction changes from sample to sample
CLASSNAMES = ["axolotl", "snow leopard", "Dandie Dinmont Terrier", "flamingo", "Saharan horned viper", "Carolina anole"]
TUNING = TuningConfig(lr=0.05)
TWO_STEPS = TuningConfig(lr=0.05, steps=2)
CASES = {
    "ctpt": ("ctpt", CTPT, TUNING, CTPT.Config()),
    "ctpt_lambda50": ("ctpt", CTPT, TUNING, CTPT.Config(lambda_term=50.0)),
    "ctpt_two_steps": ("ctpt", CTPT, TWO_STEPS, CTPT.Config()),
    "rtpt": ("rtpt", RTPT, TUNING, RTPT.Config()),
    "rtpt_k5": ("rtpt", RTPT, TUNING, RTPT.Config(neighbours=5, temperature=0.05)),
    "rtpt_two_steps": ("rtpt", RTPT, TWO_STEPS, RTPT.Config(neighbours=5)),
}


@pytest.fixture(scope="module")
def setup():
    """A random-weight tiny CLIP, 4 samples x 16 views: (text encoder, plain CLIP, [(views, cached features)])."""
    clip = load_clip(ModelSpec(arch="tiny-clip", pretrained=None, device="cpu"))
    stream = Stream(clip, n_samples=4, n_views=16, seed=0)
    cache = stream.build_cache()
    samples = [(stream.views(i), cache(i)) for i in stream.ids]
    return PromptTextEncoder(clip.model, clip.tokenizer, CLASSNAMES), PlainCLIP(clip, CLASSNAMES), samples


@pytest.fixture(scope="module")
def outcomes(setup):
    """Case -> [(library outcome, reference result)] per sample."""
    text, plain, samples = setup
    out = {}
    for case, (kind, cls, tuning, config) in CASES.items():
        library, reference = cls(text, tuning, config), build_plain(kind, plain, tuning, config)
        out[case] = [(library(features), reference(views)) for views, features in samples]
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_library_agrees_with_its_plain_reference(outcomes, case):
    for got, want in outcomes[case]:
        assert got.pred == want.pred
        assert list(got.selected) == want.selected == [0]
        assert got.entropy_before == pytest.approx(want.entropy_before, abs=1e-4)
        assert got.entropy_after == pytest.approx(want.entropy_after, abs=1e-4)


def test_the_reference_builds_with_default_configs(setup):
    _, plain, _ = setup
    assert build_plain("ctpt", plain, TUNING).config == CTPT.Config()
    assert build_plain("rtpt", plain, TUNING).config == RTPT.Config()


def test_the_samples_exercise_the_rules(setup, outcomes):
    """Not vacuous: the dispersion and the weighting move the outcomes away from TPT's, and lambda matters."""
    text, _, samples = setup
    tpt = TPT(text, TUNING)
    tpt_outcomes = [tpt(features) for _, features in samples]
    library = {case: [got for got, _ in pairs] for case, pairs in outcomes.items()}
    assert len({o.pred for o in library["rtpt"]}) > 1
    assert [o.pred for o in library["ctpt"]] != [t.pred for t in tpt_outcomes]  # lr 0.05: the dispersion wins
    assert all(o.entropy_before == pytest.approx(t.entropy_before, abs=1e-6)
               for o, t in zip(library["ctpt"], tpt_outcomes))
    assert any(abs(o.entropy_after - t.entropy_after) > 1e-3 for o, t in zip(library["ctpt"], tpt_outcomes))
    assert any(abs(a.entropy_after - b.entropy_after) > 1e-3
               for a, b in zip(library["ctpt"], library["ctpt_lambda50"]))
    assert any(abs(a.entropy_after - b.entropy_after) > 1e-3
               for a, b in zip(library["ctpt"], library["ctpt_two_steps"]))
    assert any(abs(o.entropy_after - t.entropy_after) > 1e-3 for o, t in zip(library["rtpt"], tpt_outcomes))
    assert any(abs(a.entropy_after - b.entropy_after) > 1e-3 for a, b in zip(library["rtpt"], library["rtpt_k5"]))
