"""Compatibility shim: this module moved to cdistill.teacher.teachers (old imports and _target_s keep working)."""

import sys

import cdistill.teacher.teachers

sys.modules[__name__] = cdistill.teacher.teachers
