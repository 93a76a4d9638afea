"""The test-time methods, one per file, each a class with a `Config` of its options, built by kind.

Protocol: `Method(text, tuning, config, templates)`; `reset()` at the start of a stream; `method(view_features)`
-> `records.Outcome` for one sample ([n_views, E] image features, view 0 the original); class attributes
`order_independent` (its prediction of a sample ignores the samples before it) and `uses_templates`.
"""
from __future__ import annotations

from ..objectives import TuningConfig
from ..text import PromptTextEncoder
from .boostadapter import BoostAdapter
from .ctpt import CTPT
from .dmn import DMN
from .dpe import DPE
from .dynaprompt import DynaPrompt, DynaPromptConfig
from .ecalp import ECALP
from .mta import MTA
from .online_tpt import OnlineTPT
from .onzeta import OnZeta
from .rtpt import RTPT
from .tca import TCA
from .tda import TDA
from .tpt import TPT
from .zero import Zero
from .zero_shot import ZeroShot

METHODS = {"zero_shot": ZeroShot, "tpt": TPT, "online_tpt": OnlineTPT, "dynaprompt": DynaPrompt, "zero": Zero,
           "tda": TDA, "dmn": DMN, "onzeta": OnZeta, "boostadapter": BoostAdapter, "ctpt": CTPT, "rtpt": RTPT,
           "mta": MTA, "dpe": DPE, "ecalp": ECALP, "tca": TCA}
METHOD_KINDS = tuple(METHODS)


def build_method(kind: str, text: PromptTextEncoder, tuning: TuningConfig, config=None, templates=None):
    """A method of `kind` with its config (the kind's defaults when None)."""
    cls = METHODS[kind]
    return cls(text, tuning, config if config is not None else cls.Config(), templates)


__all__ = ["METHODS", "METHOD_KINDS", "build_method", "DynaPrompt", "DynaPromptConfig", "OnlineTPT", "TPT", "Zero",
           "ZeroShot", "TDA", "DMN", "OnZeta", "BoostAdapter", "CTPT", "RTPT", "MTA", "DPE", "ECALP", "TCA"]
