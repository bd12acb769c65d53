"""Compatibility shim: this module moved to cdistill.tasks.distill (old imports and _target_s keep working)."""

import sys

import cdistill.tasks.distill

sys.modules[__name__] = cdistill.tasks.distill
