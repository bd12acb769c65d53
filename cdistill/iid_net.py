"""Compatibility shim: this module moved to cdistill.models.iid_net (old imports and _target_s keep working)."""

import sys

import cdistill.models.iid_net

sys.modules[__name__] = cdistill.models.iid_net
