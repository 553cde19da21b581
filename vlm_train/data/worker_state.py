"""A loader worker's state, sent with every pack as a change to the state after the pack before.

The main process must know each worker's state as of the last pack it handed out (that is what a checkpoint
saves), but a state is tens to hundreds of kB of restore keys, and a pack changes only a few of them. A worker's
StateSender turns each state into a small message; the main process's StateReceiver keeps the state up to date
from the messages and expands it only when a checkpoint asks for it.
"""

from __future__ import annotations

import operator
from array import array
from typing import Any

from vlm_train.data.state import RESTORE_FIELDS

_KEY_FIELDS = frozenset(RESTORE_FIELDS)
_first = operator.itemgetter(0)
_MISSING = object()


class StateSender:
    """In a worker: each state after a pack, as a change to the state after the one before.

    A state is mostly restore keys (shuffle and packing buffers), and a pack changes only a few of them: each key
    goes once, with a small id; lists of keys go as arrays of ids; then only the parts of the tree that changed.
    Keys are known by identity (a restore key is never changed once made), which reads none of them again: the
    sender holds each key it has sent, so no other object can take its id while it is in use.
    """

    def __init__(self) -> None:
        self._ids: dict[int, tuple[int, dict[str, Any]]] = {}  # id(key) -> (its id, the key), as the main holds them
        self._free: list[int] = []  # ids given back by earlier states, for reuse
        self._next_id = 0
        self._prev: dict[str, Any] | None = None

    def encode(self, state: dict[str, Any]) -> dict[str, Any]:
        live: dict[int, tuple[int, dict[str, Any]]] = {}
        new: dict[int, dict[str, Any]] = {}
        tree = self._intern(state, live, new)
        gone = [i for obj, (i, _) in self._ids.items() if obj not in live]
        self._free.extend(gone)  # reused from the next state on: the main process frees them with this one
        self._ids = live
        change = _diff(self._prev, tree)
        self._prev = tree
        return {"new": new, "gone": gone, "change": change}

    def _intern(self, tree: Any, live: dict, new: dict[int, dict[str, Any]]) -> Any:
        if isinstance(tree, dict):
            return {k: self._intern(v, live, new) for k, v in tree.items()}
        if not isinstance(tree, list):
            return tree
        if not tree or not _is_restore_key(tree[0]):
            return [self._intern(v, live, new) for v in tree]
        # A list of restore keys (a buffer, a pending pack) becomes an array of ids; mostly keys sent before.
        objects = list(map(id, tree))
        entries = list(map(self._ids.get, objects))
        for n in [n for n, entry in enumerate(entries) if entry is None] if None in entries else []:
            entry = live.get(objects[n])  # or a new key met twice
            if entry is None:
                if not _is_restore_key(tree[n]):
                    return [self._intern(v, live, new) for v in tree]
                entry = (self._free.pop() if self._free else self._take_id(), tree[n])
                new[entry[0]] = tree[n]
            live[objects[n]] = entries[n] = entry
        live.update(zip(objects, entries))
        return array("H" if self._next_id <= 1 << 16 else "I", map(_first, entries))

    def _take_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1


def _is_restore_key(value: Any) -> bool:
    return type(value) is dict and len(value) == len(RESTORE_FIELDS) and value.keys() == _KEY_FIELDS


class StateReceiver:
    """In the main process: a worker's state, kept up to date from its packs' changes, expanded when asked."""

    def __init__(self) -> None:
        self._keys: dict[int, dict[str, Any]] = {}
        self._tree: dict[str, Any] | None = None
        self._state: dict[str, Any] | None = None

    def apply(self, message: dict[str, Any]) -> None:
        for i in message["gone"]:
            del self._keys[i]
        self._keys.update(message["new"])
        self._tree = _patch(self._tree, message["change"])
        self._state = None

    def state(self) -> dict[str, Any] | None:
        if self._state is None and self._tree is not None:
            self._state = _expand(self._tree, self._keys)
        return self._state


def _diff(old: Any, new: Any) -> tuple | None:
    """`new` as a change to `old`: None (the same), ("=", new), or for two dicts ("~", {key: change}, [removed])."""
    if type(old) is type(new) and old == new:
        return None
    if isinstance(old, dict) and isinstance(new, dict):
        changes = {k: c for k, v in new.items() if (c := _diff(old.get(k, _MISSING), v)) is not None}
        return ("~", changes, [k for k in old if k not in new])
    return ("=", new)


def _patch(old: Any, change: tuple | None) -> Any:
    if change is None:
        return old
    if change[0] == "=":
        return change[1]
    out = dict(old)
    for k, c in change[1].items():
        out[k] = _patch(old.get(k), c)
    for k in change[2]:
        del out[k]
    return out


def _expand(tree: Any, keys: dict[int, dict[str, Any]]) -> Any:
    if isinstance(tree, array):
        return [dict(keys[i]) for i in tree]
    if isinstance(tree, dict):
        return {k: _expand(v, keys) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_expand(v, keys) for v in tree]
    return tree
