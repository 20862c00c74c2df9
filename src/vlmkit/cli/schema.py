"""Command-line options derived from config dataclasses: each field declared with ``vlmkit.config.setting``
becomes one option with the field's default, bounds, choices and help, so they are written once.

``derived_command`` builds a typer command whose parameters are those options plus any command-only ones;
``--config FILE`` (a JSON object of field names) fills every option not given on the command line; a
``ConfigError`` naming a field is shown with that field's flag.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from vlmkit.config import ConfigError, read_json


@dataclasses.dataclass(frozen=True)
class Derived:
    """One config field exposed as an option."""

    name: str
    hint: Any  # the field's resolved type
    field: dataclasses.Field[Any]

    @property
    def flag(self) -> str:
        return self.field.metadata.get("flag") or "--" + self.name.replace("_", "-")

    @property
    def default(self) -> Any:
        if self.field.default is not dataclasses.MISSING:
            return self.field.default
        if self.field.default_factory is not dataclasses.MISSING:
            return self.field.default_factory()
        return inspect.Parameter.empty  # required


def derived_fields(cls: type, *, skip: Sequence[str] = ()) -> list[Derived]:
    """The ``setting`` fields of dataclass ``cls`` (a field without ``doc`` metadata is not an option)."""
    hints = typing.get_type_hints(cls)
    return [
        Derived(name=f.name, hint=hints[f.name], field=f)
        for f in dataclasses.fields(cls)
        if "doc" in f.metadata and f.name not in skip
    ]


def _is_mapping(hint: Any) -> bool:
    return typing.get_origin(hint) is dict


def _option_type(derived: Derived) -> Any:
    """The type typer sees: ``X | None`` keeps its ``None``; choices become a ``Literal``; a mapping is taken
    as repeated ``KEY=VALUE``."""
    if _is_mapping(derived.hint):
        return list[str] | None
    choices = derived.field.metadata.get("choices")
    if choices:
        kind: Any = Literal[tuple(choices)]  # a type built at runtime, for typer (not a static alias)
        optional = isinstance(derived.hint, types.UnionType) and type(None) in typing.get_args(derived.hint)
        return kind | None if optional else kind
    return derived.hint


def _parameter(derived: Derived) -> inspect.Parameter:
    meta = derived.field.metadata
    decl = derived.flag + (f"/{meta['negation']}" if meta.get("negation") else "")
    kwargs: dict[str, Any] = {"help": meta["doc"], "show_default": True}
    if meta.get("low") is not None:
        kwargs["min"] = meta["low"]
    if meta.get("high") is not None:
        kwargs["max"] = meta["high"]
    default, kind = derived.default, _option_type(derived)
    if _is_mapping(derived.hint):
        default = None  # typer: an empty repeated option; mapped back to {} by ``values_of``
    elif default is inspect.Parameter.empty:  # required, but --config may give it: checked in ``values_of``
        default, kind = None, kind | None
        kwargs["help"] += " [required: here or in --config]"
    annotation = Annotated[kind, typer.Option(decl, **kwargs)]  # type: ignore[valid-type]  # built at runtime
    return inspect.Parameter(
        derived.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation
    )


def _parse_mapping(items: list[str] | None, *, flag: str) -> dict[str, float]:
    mapping = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        try:
            if not (sep and key):
                raise ValueError(item)
            mapping[key] = float(value)
        except ValueError:
            raise ConfigError(f"{flag} {item!r}: expected KEY=NUMBER") from None
    return mapping


def values_of(fields: Sequence[Derived], values: Mapping[str, Any]) -> dict[str, Any]:
    """The parsed option values of ``fields`` as field values (repeated ``KEY=VALUE`` -> dict)."""
    out = {}
    for derived in fields:
        value = values[derived.name]
        if value is None and derived.default is inspect.Parameter.empty:
            raise ConfigError(f"missing option {derived.flag} (on the command line or in --config)")
        if _is_mapping(derived.hint):
            value = value if isinstance(value, dict) else _parse_mapping(value, flag=derived.flag)
        out[derived.name] = value
    return out


def flag_message(error: ConfigError, fields: Sequence[Derived]) -> str:
    """A library error about a field, told with the option the user typed."""
    flags = {d.name: d.flag for d in fields}
    if error.field in flags:
        return f"{flags[error.field]}: {error}"
    return str(error)


# ------------------------------------------------------------------------------------------ --config FILE

ConfigFileOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help='A JSON object of options by field name (e.g. {"batch_size": 8, "stage": "lora"}); '
        "options given on the command line win. Relative paths in it are relative to the file.",
    ),
]


def _read_config_file(path: Path) -> dict[str, Any]:
    """The package's one bounded JSON reader (regular file, size, nesting), told as ``--config FILE``."""
    loaded = read_json(path.expanduser())
    if not isinstance(loaded, dict):
        raise ConfigError(f"--config {path}: expected a JSON object of option values")
    return loaded


def _from_file(value: Any, *, derived: Derived, base: Path) -> Any:
    hint = derived.hint
    allowed = set(typing.get_args(hint)) if isinstance(hint, types.UnionType) else {hint}
    if value is None and type(None) in allowed:
        return None
    if Path in allowed and isinstance(value, str):
        return base / Path(value).expanduser()
    if _is_mapping(hint) and isinstance(value, dict):
        return _parse_mapping([f"{k}={v}" for k, v in value.items()], flag=derived.flag)
    ok = {bool: isinstance(value, bool), int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, int | float) and not isinstance(value, bool), str: isinstance(value, str)}  # fmt: skip
    if not any(ok.get(kind, False) for kind in allowed):
        raise ConfigError(f"{value!r} is not a valid value", field=derived.name)
    return float(value) if float in allowed and not isinstance(value, bool) and int not in allowed else value


def _checked(value: Any, derived: Derived) -> Any:
    """The bounds and choices a flag would enforce, for a value from a file."""
    meta = derived.field.metadata
    if value is None or isinstance(value, bool | dict | Path):
        return value
    low, high, choices = meta.get("low"), meta.get("high"), meta.get("choices")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = (
            f"{'' if low is None else f'>= {low}'}{' and ' if low is not None and high is not None else ''}"
        )
        bounds += "" if high is None else f"<= {high}"
        raise ConfigError(f"{value!r} is out of range (must be {bounds})", field=derived.name)
    if choices and value not in choices:
        raise ConfigError(f"{value!r} is not one of {', '.join(choices)}", field=derived.name)
    return value


def merge_config_file(
    values: dict[str, Any], *, path: Path | None, fields: Sequence[Derived], ctx: typer.Context
) -> dict[str, Any]:
    """Fill options the user did not type from ``--config FILE``; bounds and choices are checked as for flags."""
    if path is None:
        return values
    given = _read_config_file(path)
    by_name = {d.name: d for d in fields}
    unknown = sorted(set(given) - set(by_name))
    if unknown:
        raise ConfigError(
            f"--config {path}: unknown option(s) {unknown}; known: {', '.join(sorted(by_name))}"
        )
    merged = dict(values)
    for name, raw in given.items():
        source = ctx.get_parameter_source(name)
        if source is not None and source.name != "DEFAULT":
            continue  # typed on the command line (or from its environment variable): that wins
        try:
            merged[name] = _checked(
                _from_file(raw, derived=by_name[name], base=path.expanduser().parent), by_name[name]
            )
        except ConfigError as exc:  # told by the file's own key, not the flag
            raise ConfigError(f"--config {path}: {name}: {exc}") from None
    return merged


# ------------------------------------------------------------------------------------------ the command


def derived_command(
    body: Callable[..., None], *, fields: Sequence[Derived], extra: Sequence[inspect.Parameter], doc: str
) -> Callable[..., None]:
    """A typer command with ``extra`` parameters then one option per field; calls ``body(**values)``."""

    def command(**values: Any) -> None:
        body(**values)

    parameters = [*extra, *(_parameter(d) for d in fields)]
    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in parameters} | {"return": None}
    command.__doc__ = doc
    return command


def option(name: str, annotation: Any, default: Any = inspect.Parameter.empty) -> inspect.Parameter:
    """A command-only parameter (not a config field), e.g. ``--model`` or ``--json``."""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
