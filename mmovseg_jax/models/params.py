"""Flat views of NNX parameters: {"blocks.0.attn.query.kernel": array} and back.

The flat dotted form is what checkpoint converters and storage exchange; it is
independent of how NNX nests modules and lists.
"""

from __future__ import annotations

from typing import Mapping

import jax
import numpy as np
from flax import nnx


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def flat_params(model: nnx.Module) -> dict[str, np.ndarray]:
    """All `nnx.Param` values of `model` as host numpy arrays keyed by dotted path."""
    return {_dotted(path): np.asarray(jax.device_get(var.get_value()))
            for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def param_shapes_of(model: nnx.Module) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shapes and dtypes of the parameters of `model` (concrete or from `nnx.eval_shape`)."""
    return {_dotted(path): (tuple(var.get_value().shape), np.dtype(var.get_value().dtype))
            for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


class ParamMismatchError(ValueError):
    """Raised when a set of parameters does not fit a model; the message lists every problem."""


def check_params(expected: Mapping[str, tuple], given: Mapping[str, object], what: str) -> None:
    """Raises ParamMismatchError naming missing, unexpected and mis-shaped entries of `given`."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    misshaped = [f"{k}: got {tuple(np.shape(given[k]))}, expected {expected[k][0]}"
                 for k in sorted(set(expected) & set(given))
                 if tuple(np.shape(given[k])) != tuple(expected[k][0])]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {', '.join(unexpected)}")
    if misshaped:
        problems.append(f"wrong shape {len(misshaped)}: {'; '.join(misshaped)}")
    if problems:
        raise ParamMismatchError(f"{what} does not fit the architecture: " + " | ".join(problems))


def set_params(model: nnx.Module, flat: Mapping[str, np.ndarray], what: str = "parameters") -> None:
    """Assigns every parameter of `model` from `flat` (dotted keys); all must match exactly."""
    state = nnx.state(model, nnx.Param)
    entries = nnx.to_flat_state(state)
    expected = {_dotted(p): (tuple(v.get_value().shape), v.get_value().dtype) for p, v in entries}
    check_params(expected, flat, what)
    nested: dict = {}
    for path, var in entries:
        node = nested
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = np.asarray(flat[_dotted(path)], dtype=var.get_value().dtype)
    state.replace_by_pure_dict(nested)
    nnx.update(model, state)
