"""Compatibility shim: this module moved to cdistill.tasks.metrics (old imports and _target_s keep working)."""

import sys

import cdistill.tasks.metrics

sys.modules[__name__] = cdistill.tasks.metrics
