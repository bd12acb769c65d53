"""Compatibility shim: this module moved to cdistill.utils.checkpointing (old imports and _target_s keep working)."""

import sys

import cdistill.utils.checkpointing

sys.modules[__name__] = cdistill.utils.checkpointing
