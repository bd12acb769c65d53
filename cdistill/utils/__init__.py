"""Small shared utilities of cdistill (used by the package and by ``datamodules``).

The atomic-build helpers of :mod:`cdistill.utils.atomic` are re-exported here (``X as X``: one
list of the public names rather than an import list and an ``__all__`` that repeat each other).
"""

from cdistill.utils.atomic import MANIFEST as MANIFEST
from cdistill.utils.atomic import build_file as build_file
from cdistill.utils.atomic import build_folder as build_folder
from cdistill.utils.atomic import check_folder as check_folder
from cdistill.utils.atomic import exclusive_lock as exclusive_lock
from cdistill.utils.atomic import lock_path as lock_path
from cdistill.utils.atomic import remove_lock_if_free as remove_lock_if_free
