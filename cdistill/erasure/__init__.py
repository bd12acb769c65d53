"""Linear concept erasure: LEACE (closed form), oracle LEACE, INLP, RLACE and ClArC.

Every method produces a small frozen ``nn.Module`` mapping ``x [..., d] -> x' [..., d]``
(:class:`LowRankEraser`; the oracle eraser also takes z), so a config switch compares them.
:mod:`cdistill.erasure.hooks` fits them at a layer of a network and applies them as hooks.
Closed-form methods stream statistics with ``update()`` and then ``build()`` the eraser.
"""

from cdistill.erasure.base import LowRankEraser
from cdistill.erasure.clarc import clarc_eraser, fit_clarc
from cdistill.erasure.factory import METHODS, fit_eraser
from cdistill.erasure.hooks import (
    MODES,
    ErasureSpec,
    bias_probe_accuracy,
    erase,
    eraser_key,
    fit_layer_erasers,
    specs_from_config,
)
from cdistill.erasure.inlp import fit_inlp
from cdistill.erasure.leace import LeaceEraser, LeaceFitter, LeaceInfo
from cdistill.erasure.linalg import Whitener, oas_shrinkage
from cdistill.erasure.moments import CrossMoments, encode_concept
from cdistill.erasure.oracle import OracleEraser, build_oracle
from cdistill.erasure.probe import LinearProbe, fit_logistic
from cdistill.erasure.rlace import fantope_project, fit_rlace

__all__ = [
    "METHODS",
    "MODES",
    "CrossMoments",
    "ErasureSpec",
    "LeaceEraser",
    "LeaceFitter",
    "LeaceInfo",
    "LinearProbe",
    "LowRankEraser",
    "OracleEraser",
    "Whitener",
    "bias_probe_accuracy",
    "build_oracle",
    "clarc_eraser",
    "encode_concept",
    "erase",
    "eraser_key",
    "fantope_project",
    "fit_clarc",
    "fit_eraser",
    "fit_inlp",
    "fit_layer_erasers",
    "fit_logistic",
    "fit_rlace",
    "oas_shrinkage",
    "specs_from_config",
]
