"""A check that fastai's callback order keeps the `run_after` / `run_before` that callbacks declare."""

from __future__ import annotations

from collections.abc import Iterable

from fastai.callback.core import Callback
from fastcore.foundation import L


def _declared(cb: Callback, name: str) -> tuple[type, ...]:
    # Read on the class: a fastai callback forwards unknown attributes to its Learner.
    declared = getattr(type(cb), name, None)
    if declared is None:
        return ()
    return tuple(declared) if isinstance(declared, (list, tuple)) else (declared,)


def order_violations(cbs: Iterable[Callback]) -> list[str]:
    """Each declared `run_after` / `run_before` that the order fastai runs `cbs` in breaks; empty if none.

    fastai 2.8 runs callbacks sorted by `order` alone (ties in the order added); the
    `run_after` / `run_before` class attributes, fastai's names from when it sorted by
    them, are declarations only. This holds the `order` values to them.
    """
    ordered = list(L(cbs).sorted("order"))
    problems = []
    for position, cb in enumerate(ordered):
        for other_position, other in enumerate(ordered):
            after = any(isinstance(other, cls) for cls in _declared(cb, "run_after"))
            before = any(isinstance(other, cls) for cls in _declared(cb, "run_before"))
            if (after and other_position > position) or (before and other_position < position):
                problems.append(f"{cb!r} (order {cb.order}) must run {'after' if after else 'before'} "
                                f"{other!r} (order {other.order})")
    return problems
