"""ZO methods, one file each; importing this package registers them all."""

from .base import METHODS, Method, get_method, register
from . import ar1, lora, mezo  # noqa: F401  (registration side effects)

__all__ = ["METHODS", "Method", "get_method", "register"]
