"""Compatibility shim: this module moved to cdistill.utils.resources (old imports and _target_s keep working)."""

import sys

import cdistill.utils.resources

sys.modules[__name__] = cdistill.utils.resources
