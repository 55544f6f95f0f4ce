"""Fitted objects (scikit-learn transforms) as plain data that loads without running code.

Pickle rebuilds an object by calling whatever the file names, so a doctored file runs code the
moment it is read. ``to_plain`` turns a fitted object into a tree of tensors, strings, numbers,
lists and dicts, which ``torch.load(weights_only=True)`` reads without calling anything;
``from_plain`` rebuilds the object, calling only the classes and functions its caller lists as
trusted. The rebuilt object holds exactly the fitted attributes of the original (arrays bit for
bit), so it transforms new data identically.

Supported values: None, bool, int, float, str; list, tuple, dict; NumPy arrays, scalars and
dtypes; slices; pandas Series; functions, NumPy ufuncs and classes in the trusted list;
instances of trusted classes, through their ``__getstate__`` / ``__setstate__`` (scikit-learn
estimators define both). Anything else raises TypeError at save time, where it is a programming
error, never at load time.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from common.errors import UserError

KIND = "__plain__"  # the key that marks an encoded non-JSON value


def _name(obj: Any) -> str:
    """``module.qualname`` of a class, function or NumPy ufunc (ufuncs live in ``numpy``)."""
    module = getattr(obj, "__module__", None) or "numpy"
    return f"{module}.{getattr(obj, '__qualname__', obj.__name__)}"


def _registry(trusted: Iterable[Any]) -> dict[str, Any]:
    registry: dict[str, Any] = {}
    for obj in trusted:
        registry[_name(obj)] = obj
    return registry


def to_plain(obj: Any, trusted: Iterable[Any]) -> Any:
    """Encode ``obj`` as a tree that ``torch.save`` writes and ``weights_only`` loads."""
    names = {id(v): k for k, v in _registry(trusted).items()}
    return _encode(obj, names)


def _encode(obj: Any, names: dict[int, str]) -> Any:
    if obj is None or type(obj) in (bool, int, float, str):
        return obj
    if isinstance(obj, np.generic):  # np.float64 is also a float: test it first
        return {KIND: "scalar", "dtype": obj.dtype.str, "value": obj.item()}
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            return {
                KIND: "objects",
                "shape": list(obj.shape),
                "items": [_encode(v, names) for v in obj.ravel().tolist()],
            }
        # A copy keeps the memory order (C or Fortran), so arithmetic on it runs the same way.
        return {KIND: "array", "data": torch.from_numpy(np.array(obj, copy=True, order="K"))}
    if isinstance(obj, np.dtype):
        return {KIND: "dtype", "str": obj.str}
    if isinstance(obj, type) and issubclass(obj, np.generic):
        return {KIND: "scalar_type", "str": np.dtype(obj).str}
    if type(obj) is list:
        return [_encode(v, names) for v in obj]
    if type(obj) is tuple:
        return {KIND: "tuple", "items": [_encode(v, names) for v in obj]}
    if type(obj) is dict:
        return {KIND: "dict", "items": [[_encode(k, names), _encode(v, names)] for k, v in obj.items()]}
    if type(obj) is slice:
        return {KIND: "slice", "args": [obj.start, obj.stop, obj.step]}
    if id(obj) in names:  # a trusted function, ufunc or class, referred to by name
        return {KIND: "ref", "name": names[id(obj)]}
    if type(obj).__module__.startswith("pandas") and type(obj).__name__ == "Series":
        return {
            KIND: "series",
            "values": _encode(obj.to_numpy(), names),
            "index": _encode(obj.index.to_numpy(), names),
            "name": _encode(obj.name, names),
            "index_name": _encode(obj.index.name, names),
        }
    if id(type(obj)) in names:
        state = obj.__getstate__()
        if not isinstance(state, dict):
            raise TypeError(f"{_name(type(obj))}: state is a {type(state).__name__}, not a dict")
        return {KIND: "object", "class": names[id(type(obj))], "state": _encode(state, names)}
    raise TypeError(
        f"cannot store {_name(type(obj))} as plain data; add it to the trusted list if it is safe to rebuild"
    )


def from_plain(tree: Any, trusted: Iterable[Any]) -> Any:
    """Rebuild what ``to_plain`` encoded; a class or function not in ``trusted`` is refused.

    Raises ValueError naming what was refused or malformed.
    """
    return _decode(tree, _registry(trusted))


def rebuild(tree: Any, trusted: Iterable[Any], expected: type, where: str, what: str, remedy: str) -> Any:
    """``from_plain`` for a file the user gave: any failure, or an object that is not an
    ``expected``, is one UserError naming ``where`` (the file), ``what`` it holds and ``remedy``."""
    try:
        obj = from_plain(tree, trusted)
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise UserError(f"{where}: its stored {what} cannot be rebuilt ({err}); {remedy}") from None
    if not isinstance(obj, expected):
        raise UserError(f"{where}: its stored {what} is a {type(obj).__name__}, not a fitted {expected.__name__}")
    return obj


def _decode(tree: Any, registry: dict[str, Any]) -> Any:
    if tree is None or type(tree) in (bool, int, float, str):
        return tree
    if isinstance(tree, list):
        return [_decode(v, registry) for v in tree]
    if not isinstance(tree, dict) or KIND not in tree:
        raise ValueError(f"unexpected {type(tree).__name__} in stored state")
    kind = tree[KIND]
    if kind == "scalar":
        return np.dtype(tree["dtype"]).type(tree["value"])
    if kind == "array":
        return tree["data"].numpy()
    if kind == "objects":
        out = np.empty(len(tree["items"]), dtype=object)
        out[:] = [_decode(v, registry) for v in tree["items"]]
        return out.reshape(tree["shape"])
    if kind == "dtype":
        return np.dtype(tree["str"])
    if kind == "scalar_type":
        return np.dtype(tree["str"]).type
    if kind == "tuple":
        return tuple(_decode(v, registry) for v in tree["items"])
    if kind == "dict":
        return {_decode(k, registry): _decode(v, registry) for k, v in tree["items"]}
    if kind == "slice":
        return slice(*tree["args"])
    if kind == "series":
        import pandas as pd

        index = pd.Index(_decode(tree["index"], registry), name=_decode(tree["index_name"], registry))
        return pd.Series(_decode(tree["values"], registry), index=index, name=_decode(tree["name"], registry))
    if kind in ("ref", "object"):
        name = tree["name"] if kind == "ref" else tree["class"]
        if name not in registry:
            raise ValueError(f"{name} is not among the trusted types")
        if kind == "ref":
            return registry[name]
        cls = registry[name]
        obj = cls.__new__(cls)
        state = _decode(tree["state"], registry)
        if hasattr(obj, "__setstate__"):
            obj.__setstate__(state)
        else:
            obj.__dict__.update(state)
        return obj
    raise ValueError(f"unknown stored kind {kind!r}")
