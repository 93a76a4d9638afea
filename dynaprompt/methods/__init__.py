"""The test-time methods, one per file, each a class with a `Config` of its options, built by kind.

Protocol: `Method(text, tuning, config, templates)`; `reset()` at the start of a stream; `method(view_features)`
-> `records.Outcome` for one sample ([n_views, E] image features, view 0 the original); class attributes
`order_independent` (its prediction of a sample ignores the samples before it) and `uses_templates`.
A method whose `reads_images` is true (TTL, RLCF with its own teacher) is given the views' pixels [n_views, 3, S, S]
instead of their features, and runs the image tower of `text.model` itself.
"""
from __future__ import annotations

from ..objectives import TuningConfig
from ..text import PromptTextEncoder
from .bca import BCA
from .boostadapter import BoostAdapter
from .ctpt import CTPT
from .dmn import DMN
from .dmn_w import DMNW
from .dota import DOTA
from .dpe import DPE
from .dynaprompt import DynaPrompt, DynaPromptConfig
from .ecalp import ECALP
from .histpt import HisTPT
from .mta import MTA
from .oga import OGA
from .online_tpt import OnlineTPT
from .onzeta import OnZeta
from .rlcf import RLCF
from .rtpt import RTPT
from .tca import TCA
from .tda import TDA
from .tps import TPS
from .tpt import TPT
from .ttl import TTL
from .zero import Zero
from .zero_shot import ZeroShot

METHODS = {"zero_shot": ZeroShot, "tpt": TPT, "online_tpt": OnlineTPT, "dynaprompt": DynaPrompt, "zero": Zero,
           "tda": TDA, "dmn": DMN, "onzeta": OnZeta, "boostadapter": BoostAdapter, "ctpt": CTPT, "rtpt": RTPT,
           "mta": MTA, "dpe": DPE, "ecalp": ECALP, "tca": TCA, "oga": OGA, "bca": BCA, "tps": TPS, "dmn_w": DMNW,
           "dota": DOTA, "histpt": HisTPT, "ttl": TTL, "rlcf": RLCF}
METHOD_KINDS = tuple(METHODS)


def build_method(kind: str, text: PromptTextEncoder, tuning: TuningConfig, config=None, templates=None, **models):
    """A method of `kind` with its config (the kind's defaults when None); `models`: the CLIPs it needs besides
    the run's (RLCF's `teacher`), loaded by the runner."""
    cls = METHODS[kind]
    return cls(text, tuning, config if config is not None else cls.Config(), templates, **models)


__all__ = ["METHODS", "METHOD_KINDS", "build_method", "DynaPrompt", "DynaPromptConfig", "OnlineTPT", "TPT", "Zero",
           "ZeroShot", "TDA", "DMN", "OnZeta", "BoostAdapter", "CTPT", "RTPT", "MTA", "DPE", "ECALP", "TCA",
           "TPS", "DMNW", "OGA", "BCA", "DOTA", "HisTPT", "TTL", "RLCF"]
