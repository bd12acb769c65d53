"""Compatibility shim: this module moved to cdistill.utils.resolvers (old imports and _target_s keep working)."""

import sys

import cdistill.utils.resolvers

sys.modules[__name__] = cdistill.utils.resolvers
