"""Compatibility shim: this module moved to cdistill.concepts.tcav (old imports and _target_s keep working)."""

import sys

import cdistill.concepts.tcav

sys.modules[__name__] = cdistill.concepts.tcav
