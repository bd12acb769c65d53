"""Compatibility shim: this module moved to cdistill.objective.prototypes (old imports and _target_s keep working)."""

import sys

import cdistill.objective.prototypes

sys.modules[__name__] = cdistill.objective.prototypes
