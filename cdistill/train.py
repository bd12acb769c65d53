"""Compatibility shim: this module moved to cdistill.cli.train (old imports and _target_s keep working)."""

import sys

import cdistill.cli.train

if __name__ == "__main__":  # python -m cdistill.train
    cdistill.cli.train.main()
else:
    sys.modules[__name__] = cdistill.cli.train
