"""Compatibility shim: this module moved to cdistill.teacher.stage (old imports and _target_s keep working)."""

import sys

import cdistill.teacher.stage

sys.modules[__name__] = cdistill.teacher.stage
