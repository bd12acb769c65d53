"""Compatibility shim: this module moved to cdistill.teacher.feature_cache (old imports and _target_s keep working)."""

import sys

import cdistill.teacher.feature_cache

if __name__ == "__main__":  # python -m cdistill.feature_cache
    raise SystemExit(cdistill.teacher.feature_cache.main())
else:
    sys.modules[__name__] = cdistill.teacher.feature_cache
