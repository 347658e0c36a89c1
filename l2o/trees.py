"""Nested optimizer states (dicts, tuples, lists of tensors) mapped leaf by leaf.

torch's own pytree module is private API (``torch.utils._pytree``); the project's states are
plain dicts, tuples and lists, so these few lines are all it needs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor


def tree_map(fn: Callable[..., Any], tree: Any, *others: Any) -> Any:
    """``fn`` applied to every leaf of ``tree`` (and the matching leaves of ``others``, which
    share its structure); dicts, tuples (named ones included) and lists are rebuilt as such."""
    if isinstance(tree, dict):
        return {k: tree_map(fn, v, *(o[k] for o in others)) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        items = [tree_map(fn, *leaves) for leaves in zip(tree, *others, strict=True)]
        if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # a NamedTuple
            return type(tree)(*items)
        return type(tree)(items)
    return fn(tree, *others)


def tensor_leaves(tree: Any) -> tuple[list[Tensor], Callable[[list[Tensor]], Any]]:
    """The tensor leaves of ``tree`` in order, and a function that rebuilds ``tree`` with new
    tensors in their places (every other leaf, e.g. a tuple of shapes or an int, is kept)."""
    found: list[Tensor] = []

    def collect(leaf: Any) -> Any:
        if isinstance(leaf, Tensor):
            found.append(leaf)
        return leaf

    tree_map(collect, tree)

    def rebuild(tensors: list[Tensor]) -> Any:
        it = iter(tensors)
        return tree_map(lambda leaf: next(it) if isinstance(leaf, Tensor) else leaf, tree)

    return found, rebuild
