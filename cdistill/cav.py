"""Compatibility shim: this module moved to cdistill.concepts.cav (old imports and _target_s keep working)."""

import sys

import cdistill.concepts.cav

sys.modules[__name__] = cdistill.concepts.cav
