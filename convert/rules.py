"""Key-mapping rules between PyTorch state dicts and our flat Flax parameters.

A `Rule` ties one or more PyTorch tensors to one or more Flax parameters with a pair
of pure data-movement functions (transpose, reshape, split, concatenate), so that
converting forth and back is exact. A checkpoint format is a list of rules built for
a given architecture; `to_flax` / `to_torch` apply them and report every missing,
unexpected or mis-shaped key at once.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from mmovseg_jax.cli import Progress

Arrays = list[np.ndarray]


class ConversionError(ValueError):
    """A checkpoint does not match the expected format; the message names every offending key."""


@dataclasses.dataclass(frozen=True)
class Rule:
    torch_keys: tuple[str, ...]
    flax_keys: tuple[str, ...]
    to_flax: Callable[[Arrays], Arrays]
    to_torch: Callable[[Arrays], Arrays]


def _one(fn):
    return lambda xs: [fn(xs[0])]


def copy(torch_key: str, flax_key: str) -> Rule:
    return Rule((torch_key,), (flax_key,), _one(lambda x: x), _one(lambda x: x))


def linear(torch_prefix: str, flax_prefix: str, bias: bool = True) -> list[Rule]:
    """nn.Linear weight (out, in) <-> kernel (in, out), bias copied."""
    rules = [Rule((f"{torch_prefix}.weight",), (f"{flax_prefix}.kernel",), _one(lambda w: w.T), _one(lambda k: k.T))]
    if bias:
        rules.append(copy(f"{torch_prefix}.bias", f"{flax_prefix}.bias"))
    return rules


def matrix(torch_key: str, flax_key: str) -> Rule:
    """A bare (in, out) matrix used as x @ W (OpenAI's proj) <-> kernel, unchanged."""
    return copy(torch_key, flax_key)


def conv(torch_prefix: str, flax_prefix: str, bias: bool) -> list[Rule]:
    """Conv weight (O, I, kh, kw) <-> kernel (kh, kw, I, O)."""
    rules = [Rule((f"{torch_prefix}.weight",), (f"{flax_prefix}.kernel",),
                  _one(lambda w: w.transpose(2, 3, 1, 0)), _one(lambda k: k.transpose(3, 2, 0, 1)))]
    if bias:
        rules.append(copy(f"{torch_prefix}.bias", f"{flax_prefix}.bias"))
    return rules


def layer_norm(torch_prefix: str, flax_prefix: str, names: tuple[str, str] = ("weight", "bias")) -> list[Rule]:
    return [copy(f"{torch_prefix}.{names[0]}", f"{flax_prefix}.scale"),
            copy(f"{torch_prefix}.{names[1]}", f"{flax_prefix}.bias")]


def reshaped(torch_key: str, flax_key: str, torch_shape: Sequence[int], flax_shape: Sequence[int]) -> Rule:
    """Same values under another shape (e.g. DINO's (1, 1, D) CLS token <-> (D,)). -1 allowed."""
    return Rule((torch_key,), (flax_key,), _one(lambda x: x.reshape(flax_shape)),
                _one(lambda x: x.reshape(torch_shape)))


def fused_qkv(torch_weight: str, torch_bias: str | None, flax_attn: str) -> list[Rule]:
    """One (3D, D) [q; k; v] weight and (3D,) bias <-> query/key/value kernels and biases."""
    names = ("query", "key", "value")
    rules = [Rule((torch_weight,), tuple(f"{flax_attn}.{n}.kernel" for n in names),
                  lambda xs: [w.T for w in _split3(xs[0])],
                  lambda ks: [np.concatenate([k.T for k in ks], axis=0)])]
    if torch_bias:
        rules.append(Rule((torch_bias,), tuple(f"{flax_attn}.{n}.bias" for n in names),
                          lambda xs: _split3(xs[0]), lambda bs: [np.concatenate(bs, axis=0)]))
    return rules


def split_qkv_weights_fused_bias(torch_attn: str, flax_attn: str) -> list[Rule]:
    """Separate q/k/v_proj_weight (D, D) with one fused in_proj_bias (3D,)."""
    names = ("query", "key", "value")
    rules = [Rule((f"{torch_attn}.{t}_proj_weight",), (f"{flax_attn}.{n}.kernel",),
                  _one(lambda w: w.T), _one(lambda k: k.T)) for t, n in zip("qkv", names)]
    rules.append(Rule((f"{torch_attn}.in_proj_bias",), tuple(f"{flax_attn}.{n}.bias" for n in names),
                      lambda xs: _split3(xs[0]), lambda bs: [np.concatenate(bs, axis=0)]))
    return rules


def _split3(x: np.ndarray) -> Arrays:
    if x.shape[0] % 3:
        raise ValueError(f"first dimension {x.shape[0]} is not divisible by 3")
    return list(np.split(x, 3, axis=0))


def numbered(keys: Iterable[str], pattern: str) -> int:
    """How many consecutive indices i = 0, 1, ... have some key matching pattern.format(i=i)."""
    found = set()
    regex = re.compile(re.escape(pattern).replace(re.escape("{i}"), r"(\d+)"))
    for k in keys:
        m = regex.match(k)
        if m:
            found.add(int(m.group(1)))
    count = 0
    while count in found:
        count += 1
    return count


def _shape_list(keys: Sequence[str], shapes: Sequence[tuple]) -> str:
    return ", ".join(f"{k} {tuple(s)}" for k, s in zip(keys, shapes))


def apply_to_flax(rules: Sequence[Rule], state: Mapping[str, np.ndarray],
                  expected: Mapping[str, tuple], auxiliary: Callable[[str], bool], what: str
                  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Converts `state` by `rules`. Returns (flax params, auxiliary tensors kept aside).

    `expected` holds the architecture's Flax shapes; `auxiliary(key)` says which
    non-architecture keys (poolers, heads, buffers) are known and kept as extras.
    Raises ConversionError listing every missing, unexpected and mis-shaped key.
    """
    wanted = [k for r in rules for k in r.torch_keys]
    missing = sorted(set(wanted) - set(state))
    extras = {k: v for k, v in state.items() if k not in set(wanted) and auxiliary(k)}
    unexpected = sorted(set(state) - set(wanted) - set(extras))
    misshaped, out = [], {}
    progress = Progress(len(rules), sys.stderr, every=2.0, label="convert", unit="tensors", quiet_below=2.0)
    for i, rule in enumerate(rules):
        progress.update(i)
        if any(k not in state for k in rule.torch_keys):
            continue
        sources = [state[k] for k in rule.torch_keys]
        try:
            values = rule.to_flax(sources)
        except ValueError:
            values = None
        if values is None or any(tuple(v.shape) != tuple(expected[f][0]) for f, v in zip(rule.flax_keys, values)):
            want = rule.to_torch([np.zeros(expected[f][0], np.float32) for f in rule.flax_keys])
            misshaped.append(f"{_shape_list(rule.torch_keys, [s.shape for s in sources])} "
                             f"(expected {_shape_list(rule.torch_keys, [w.shape for w in want])})")
            continue
        out.update(zip(rule.flax_keys, values))
    progress.update(len(rules))
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    if misshaped:
        problems.append(f"wrong shapes ({len(misshaped)}): {'; '.join(misshaped)}")
    if problems:
        raise ConversionError(f"{what}: " + " | ".join(problems))
    covered = {k for r in rules for k in r.flax_keys}
    if covered != set(expected):  # a bug in a rule table, not in the user's file
        raise AssertionError(f"rules do not cover parameters {sorted(set(expected) - covered)}")
    return out, extras


def apply_to_torch(rules: Sequence[Rule], params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of apply_to_flax for a complete parameter set."""
    out = {}
    progress = Progress(len(rules), sys.stderr, every=2.0, label="convert", unit="tensors", quiet_below=2.0)
    for i, rule in enumerate(rules):
        progress.update(i)
        missing = [k for k in rule.flax_keys if k not in params]
        if missing:
            raise ConversionError(f"parameters missing for {rule.torch_keys}: {missing}")
        out.update(zip(rule.torch_keys, rule.to_torch([np.asarray(params[k]) for k in rule.flax_keys])))
    progress.update(len(rules))
    return out
