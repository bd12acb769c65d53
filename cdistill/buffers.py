"""Compatibility shim: this module moved to cdistill.utils.buffers (old imports and _target_s keep working)."""

import sys

import cdistill.utils.buffers

sys.modules[__name__] = cdistill.utils.buffers
