"""Semi-supervised methods, registered by name in :data:`METHODS`."""
from workbench.methods.base import METHODS, Method, SemiBatch, StepInfo, StepOutput, build_method, register_method
from workbench.methods import supervised, fixmatch  # noqa: F401,E402  (register the built-in methods)

__all__ = ["METHODS", "Method", "SemiBatch", "StepInfo", "StepOutput", "build_method", "register_method"]
