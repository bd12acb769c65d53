"""Small shared utilities of cdistill (used by the package and by ``datamodules``)."""

from cdistill.utils.atomic import (
    MANIFEST,
    build_file,
    build_folder,
    check_folder,
    exclusive_lock,
    lock_path,
    remove_lock_if_free,
)

__all__ = [
    "MANIFEST",
    "build_file",
    "build_folder",
    "check_folder",
    "exclusive_lock",
    "lock_path",
    "remove_lock_if_free",
]
