"""Compatibility shim: this module moved to cdistill.tasks.classifier (old imports and _target_s keep working)."""

import sys

import cdistill.tasks.classifier

sys.modules[__name__] = cdistill.tasks.classifier
