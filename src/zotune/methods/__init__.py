"""ZO methods, one file each; importing this package registers them all."""

from .base import METHODS, Method, get_method, option_owners, prepare_seeded, register
from . import agzo, ar1, fo_lora, ln, lora, lozo, mezo, params, subzero, zoact  # noqa: F401  (registration side effects)

__all__ = ["METHODS", "Method", "get_method", "option_owners", "prepare_seeded", "register"]
