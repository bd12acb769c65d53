"""One registry mechanism: factories register themselves by name when their module is imported.

Students (:mod:`cdistill.models.students`), cdistill's own teachers
(:mod:`cdistill.teacher.teachers`) and the IID networks (:mod:`cdistill.models.iid_net`) each
hold a :class:`Registry`; a module that defines a factory decorates it with ``register``, and the
package that owns the registry imports that module, so lookups never need a lazy import.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from cdistill.errors import CdistillError, unknown_name

T = TypeVar("T")


class Registry(Generic[T]):
    """Named factories of one kind.

    Args:
        kind: What the names stand for, used in errors (e.g. ``"student"``).
        fix: The sentence an unknown-name error ends with (which config key to change).
    """

    def __init__(self, kind: str, fix: str) -> None:
        self.kind = kind
        self.fix = fix
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that files ``fn`` under ``name`` (a second entry of one name is an error)."""

        def wrap(fn: T) -> T:
            if name in self._items:
                raise CdistillError(f"{self.kind.capitalize()} {name!r} is registered twice.")
            self._items[name] = fn
            return fn

        return wrap

    def get(self, name: str) -> T:
        """The factory called ``name``.

        Raises:
            CdistillError: No such name (close names listed, then :attr:`fix`).
        """
        if name not in self._items:
            raise unknown_name(self.kind, name, self._items, self.fix)
        return self._items[name]

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)
