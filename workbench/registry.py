"""What the methods provide, looked up by name: their config dataclasses and the evaluation modes they add.

This module imports nothing of the package, so the configuration (which reads method configs by ``method.name``)
and the evaluation (which serves a method's own ``eval.mode``) look methods up here without importing them; the
methods register themselves when :mod:`workbench.methods` is imported. A lookup of a name not registered yet
imports the built-in methods package once (:data:`BUILTIN_METHODS`, by name: the plugin step, like an entry point),
so ``method.name: scalematch`` works in a process that never imported the methods.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

BUILTIN_METHODS = "workbench.methods"
"""The package whose import registers the built-in methods (loaded on the first lookup that misses)."""

_METHOD_CONFIGS: dict[str, type] = {}
_EVAL_MODES: dict[str, EvalMode] = {}
_loaded = False


def _load_builtins() -> None:
    """Import :data:`BUILTIN_METHODS` once (its modules call the ``register_*`` functions below)."""
    global _loaded
    if not _loaded:
        _loaded = True
        importlib.import_module(BUILTIN_METHODS)


def register_method_config(name: str, cls: type) -> None:
    """Make ``method.name == name`` build a ``cls`` (a :class:`workbench.config.MethodConfig` subclass)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: a method config needs a non-empty name, got {name!r}")
    _METHOD_CONFIGS[name] = cls


def method_config(name: str) -> type | None:
    """The config dataclass registered for method ``name`` (built-in methods loaded first); None when unknown."""
    if name not in _METHOD_CONFIGS:
        _load_builtins()
    return _METHOD_CONFIGS.get(name)


def method_names() -> list[str]:
    """The registered method names, sorted (built-in methods loaded first)."""
    _load_builtins()
    return sorted(_METHOD_CONFIGS)


class ServedRequest(Protocol):
    """What an :class:`EvalMode`'s ``open`` yields: ``served`` counts the predictor calls that served the mode."""

    served: int


@dataclass(frozen=True)
class EvalMode:
    """An evaluation mode a method adds to the engine's own (original, center_crop, sliding).

    The evaluation predicts every image whole, at scale 1, inside ``open(settings)``; the method's predictor sees
    the open request and returns the mode's logits, counting its calls in the request's ``served``. A request left
    unserved after an image means the evaluated network does not provide the mode (the evaluation stops with
    ``requirement`` in its error).

    Attributes:
        name: the ``eval.mode`` value.
        requirement: what the mode needs, for error messages ("a method with a CIF module (...)").
        owners: the method names that provide it (for messages).
        open: ``settings -> context manager`` yielding a :class:`ServedRequest`; ``settings`` is the
            :class:`workbench.config.EvalSettings` of the evaluation.
        check: ``settings -> (field, message)`` when the settings cannot serve the mode (the message names the fix),
            None when they can; run when the settings are built.
    """

    name: str
    requirement: str
    owners: tuple[str, ...]
    open: Callable[[Any], AbstractContextManager[ServedRequest]]
    check: Callable[[Any], tuple[str, str] | None] = lambda settings: None


def register_eval_mode(mode: EvalMode) -> None:
    """Make ``eval.mode == mode.name`` served by ``mode`` (a later registration of the name replaces it)."""
    if not isinstance(mode, EvalMode):
        raise TypeError(f"mode: expected an EvalMode, got {type(mode).__name__}")
    _EVAL_MODES[mode.name] = mode


def eval_mode(name: str) -> EvalMode | None:
    """The method-provided evaluation mode ``name`` (built-in methods loaded first); None when no method has it."""
    if name not in _EVAL_MODES:
        _load_builtins()
    return _EVAL_MODES.get(name)


def eval_modes() -> list[str]:
    """The names of the method-provided evaluation modes, sorted (built-in methods loaded first)."""
    _load_builtins()
    return sorted(_EVAL_MODES)


__all__ = ["BUILTIN_METHODS", "EvalMode", "ServedRequest", "eval_mode", "eval_modes", "method_config",
           "method_names", "register_eval_mode", "register_method_config"]
