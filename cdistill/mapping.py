"""Compatibility shim: this module moved to cdistill.teacher.mapping (old imports and _target_s keep working)."""

import sys

import cdistill.teacher.mapping

sys.modules[__name__] = cdistill.teacher.mapping
