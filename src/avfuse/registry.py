"""Name -> entry tables: the one list of each kind of thing a user picks by name.

A :class:`Registry` holds the models, the fusion methods or the score file formats; a config
field typed ``Annotated[str, OneOf(REGISTRY)]`` allows the names registered at the moment it
is checked (:mod:`avfuse.config` checks it, offers the names as CLI choices and documents
them), so adding an entry is the whole change. Pure Python: the NumPy-only modules use it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any, Generic, TypeVar

V = TypeVar("V")


class Registry(MutableMapping[str, V], Generic[V]):
    """Entries registered by name, in registration order: the one list of a kind of thing.

    ``what`` names the kind in messages (``"model"``). :meth:`entry` refuses an unknown name
    with the allowed ones; plain ``registry[name]`` raises ``KeyError`` as a dict does.
    """

    def __init__(self, what: str, entries: Mapping[str, V] | None = None) -> None:
        self.what = what
        self._entries: dict[str, V] = dict(entries or {})

    def __getitem__(self, name: str) -> V:
        return self._entries[name]

    def __setitem__(self, name: str, entry: V) -> None:
        self._entries[name] = entry

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}, {list(self._entries)})"

    def entry(self, name: str) -> V:
        """The entry ``name``; ``ValueError`` listing the registered names if there is none."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            known = ", ".join(repr(n) for n in self._entries)
            raise ValueError(f"unknown {self.what} {name!r}; one of {known}") from None


class OneOf:
    """The values a ``str`` field allows: ``extra`` fixed ones (``"auto"``), then the names of
    ``registry`` entries that ``keep`` accepts, read when asked (never copied at import).

    Used as ``Annotated[str, OneOf(REGISTRY)]``; iterating gives the values in order.
    """

    def __init__(
        self,
        registry: Mapping[str, Any],
        extra: tuple[str, ...] = (),
        keep: Callable[[Any], bool] | None = None,
    ) -> None:
        self.registry = registry
        self.extra = extra
        self.keep = keep

    def __iter__(self) -> Iterator[str]:
        yield from self.extra
        for name, entry in self.registry.items():
            if self.keep is None or self.keep(entry):
                yield name

    def __contains__(self, value: object) -> bool:
        return isinstance(value, str) and value in tuple(self)

    def __eq__(self, other: object) -> bool:
        # Equal when made alike: an annotation resolved twice gives two OneOf objects.
        return isinstance(other, OneOf) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def _key(self) -> tuple[int, tuple[str, ...], Callable[[Any], bool] | None]:
        return (id(self.registry), self.extra, self.keep)

    def __repr__(self) -> str:
        return f"OneOf({tuple(self)})"
