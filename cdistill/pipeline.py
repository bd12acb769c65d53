"""Compatibility shim: this module moved to cdistill.cli.pipeline (old imports and _target_s keep working)."""

import sys

import cdistill.cli.pipeline

if __name__ == "__main__":  # python -m cdistill.pipeline
    cdistill.cli.pipeline.main()
else:
    sys.modules[__name__] = cdistill.cli.pipeline
