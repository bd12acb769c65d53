"""Compatibility shim: this module moved to cdistill.utils.checkpoint_files (old imports and _target_s keep working)."""

import sys

import cdistill.utils.checkpoint_files

sys.modules[__name__] = cdistill.utils.checkpoint_files
