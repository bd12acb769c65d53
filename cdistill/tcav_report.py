"""Compatibility shim: this module moved to cdistill.cli.tcav_report (old imports and _target_s keep working)."""

import sys

import cdistill.cli.tcav_report

sys.modules[__name__] = cdistill.cli.tcav_report
