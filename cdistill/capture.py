"""Compatibility shim: this module moved to cdistill.utils.capture (old imports and _target_s keep working)."""

import sys

import cdistill.utils.capture

sys.modules[__name__] = cdistill.utils.capture
