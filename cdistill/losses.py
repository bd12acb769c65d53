"""Compatibility shim: this module moved to cdistill.objective.losses (old imports and _target_s keep working)."""

import sys

import cdistill.objective.losses

sys.modules[__name__] = cdistill.objective.losses
