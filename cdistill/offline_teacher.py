"""Compatibility shim: this module moved to cdistill.teacher.offline (old imports and _target_s keep working)."""

import sys

import cdistill.teacher.offline

sys.modules[__name__] = cdistill.teacher.offline
