"""Semi-supervised methods, registered by name in :data:`METHODS`.

Every module of this package is imported here, so a new method module registers itself (``@register_method``)
just by existing.
"""
import importlib
import pkgutil

from workbench.methods.base import METHODS, Method, SemiBatch, StepInfo, StepOutput, build_method, register_method

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _mod != "base" and not _mod.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod}")

__all__ = ["METHODS", "Method", "SemiBatch", "StepInfo", "StepOutput", "build_method", "register_method"]
