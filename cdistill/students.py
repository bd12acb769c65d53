"""Compatibility shim: this module moved to cdistill.models.students (old imports and _target_s keep working)."""

import sys

import cdistill.models.students

sys.modules[__name__] = cdistill.models.students
