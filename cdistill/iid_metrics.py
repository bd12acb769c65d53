"""Compatibility shim: this module moved to cdistill.tasks.iid_metrics (old imports and _target_s keep working)."""

import sys

import cdistill.tasks.iid_metrics

sys.modules[__name__] = cdistill.tasks.iid_metrics
