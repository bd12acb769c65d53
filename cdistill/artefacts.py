"""Compatibility shim: this module moved to cdistill.utils.artefacts (old imports and _target_s keep working)."""

import sys

import cdistill.utils.artefacts

sys.modules[__name__] = cdistill.utils.artefacts
