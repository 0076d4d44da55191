"""Settings as data: the base of every method's own options, and the type coercion of settings.

A method's options are a small dataclass in the method's own file (as each peft
tuner has its own config). Its fields are settable everywhere a run setting is:
as a flag (``--ar1-scaling canonical``), a YAML key (``ar1_scaling: canonical``)
and a keyword of :class:`zotune.ZOOptimizer` — always spelled
``<prefix>_<field>``. Validation runs when the run's config is validated, before
any model loads. Adding a method therefore touches no shared file.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import ZOError, require


def setting(default: Any, help: str, **kw) -> Any:
    """A dataclass field with the ``help`` that ``zotune train --help`` prints."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def default_of(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def coerce(f: dataclasses.Field, value: Any, source: str, name: str | None = None) -> Any:
    """Convert ``value`` to the type of field ``f``, or say which setting is wrong."""
    kind = type(default_of(f))
    name = name or f.name
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            if value in (0, 1) and isinstance(value, (bool, int)):
                return bool(value)
            raise ValueError(value)
        if kind is list:
            if isinstance(value, str):
                return [v for v in (x.strip() for x in value.split(",")) if v]
            if not isinstance(value, (list, tuple)):
                raise ValueError(value)
            return list(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        if kind in (int, float) and isinstance(value, bool):
            raise ValueError(value)
        if kind is str and value is None:
            return ""  # `text_pair_field:` (an empty YAML value) means none
        if kind is str and not isinstance(value, (str, int, float)):
            raise ValueError(value)  # a list or mapping where text belongs
        return kind(value)
    except (TypeError, ValueError, OverflowError):
        raise ZOError(f"{source}: setting {name!r} expects {kind.__name__}, got {value!r}") from None


@dataclass
class Options:
    """Base class of a method's own settings. Subclasses are dataclasses with a ``prefix``.

    ``validate`` checks values (called before any model loads) and raises
    :class:`~zotune.errors.ZOError` naming the setting by its flat name.
    """

    prefix: ClassVar[str] = ""

    def validate(self) -> None:
        """Check the values; the default accepts anything of the right type."""

    @classmethod
    def settings(cls) -> dict[str, dataclasses.Field]:
        """Flat setting name (``ar1_scaling``) -> field."""
        return {f"{cls.prefix}_{f.name}": f for f in dataclasses.fields(cls)}

    @classmethod
    def from_settings(cls, values: dict[str, Any], source: str = "config") -> "Options":
        """Build from flat names (missing ones take their defaults), coerce and validate."""
        known = cls.settings()
        kwargs = {f.name: coerce(f, values[flat], source, flat) for flat, f in known.items() if flat in values}
        options = cls(**kwargs)
        options.validate()
        return options

    def to_settings(self) -> dict[str, Any]:
        return {flat: getattr(self, f.name) for flat, f in self.settings().items()}

    def check(self, flat: str, ok: bool, expected: str) -> None:
        """``require`` with the setting's flat name and value in the message."""
        name = flat[len(self.prefix) + 1:]
        require(ok, f"{flat} must be {expected}, got {getattr(self, name)!r}")


class NoOptions(Options):
    """A method with no settings of its own."""
