"""Semi-supervised methods, registered by name in :data:`METHODS`."""
from workbench.methods.base import METHODS, Method, SemiBatch, StepInfo, StepOutput, build_method, register_method
from workbench.methods import supervised  # noqa: F401  (registers)

__all__ = ["METHODS", "Method", "SemiBatch", "StepInfo", "StepOutput", "build_method", "register_method"]
