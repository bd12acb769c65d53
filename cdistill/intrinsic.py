"""Compatibility shim: this module moved to cdistill.tasks.intrinsic (old imports and _target_s keep working)."""

import sys

import cdistill.tasks.intrinsic

sys.modules[__name__] = cdistill.tasks.intrinsic
