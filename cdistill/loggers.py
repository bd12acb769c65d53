"""Compatibility shim: this module moved to cdistill.cli.loggers (old imports and _target_s keep working)."""

import sys

import cdistill.cli.loggers

sys.modules[__name__] = cdistill.cli.loggers
