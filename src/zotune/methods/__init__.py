"""ZO methods, one file each; importing this package registers them all."""

from .base import METHODS, Method, get_method, prepare_seeded, register
from . import ar1, ln, lora, mezo, params, zoact  # noqa: F401  (registration side effects)

__all__ = ["METHODS", "Method", "get_method", "prepare_seeded", "register"]
