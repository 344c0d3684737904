"""CLI flags derived from frozen config dataclasses, so no option is written twice.

Each field becomes `--field-name` with the field's type, default and docstring (the string
literal under the field) as help. `tuple[str, ...]` fields take one or more values and may be
repeated; their singular form is an alias (`--hooks a b` == `--hook a --hook b`). Their values may also be
comma-separated (`--k 16,32`). A class may give a field extra flag names in `FLAG_ALIASES`
(`--from` for `from_activations`, `--arch` for `architectures`), shown first in usage lines. `bool`
fields get `--x/--no-x`. A field that is itself a
dataclass (TrainConfig.dictionary) gives each of its fields a flag of its own name, except those
the outer class lists in `NESTED_NOT_FLAGS`. `--config FILE.json` loads a saved config as the defaults, so
`workbench cache --config runs/x/config.json` reproduces a run and flags still override it; a class
with `upgrade_json` converts files saved by older versions first.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import typing
from functools import cache
from pathlib import Path

from workbench.errors import ConfigError


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass, read from its source."""
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if (
                isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per field of dataclass `cls` (plus `--config`), and one per field of a nested one."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} (saved with the run)")
    group.add_argument(
        "--config", type=Path, metavar="JSON", help="load these settings from a saved config.json"
    )
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        if dataclasses.is_dataclass(hints[field.name]):
            nested = hints[field.name]
            sub = parser.add_argument_group(f"{nested.__name__} (saved with the run as {field.name!r})")
            template = _default(field)
            for inner in _nested_fields(cls, field.name, nested):
                if inner.name not in skip:
                    _add_flag(sub, nested, inner, getattr(template, inner.name))
        else:
            _add_flag(group, cls, field, field.default)


def _add_flag(group, cls: type, field: dataclasses.Field, default: object) -> None:
    flag = "--" + field.name.replace("_", "-")
    aliases = tuple(getattr(cls, "FLAG_ALIASES", {}).get(field.name, ()))
    kind = typing.get_type_hints(cls)[field.name]
    help_text = (field_docs(cls).get(field.name, "") + _show_default(default)).replace("%", "%%")
    if kind is bool:
        group.add_argument(
            *aliases,
            flag,
            dest=field.name,
            action=argparse.BooleanOptionalAction,
            default=argparse.SUPPRESS,
            help=help_text,
        )
    elif typing.get_origin(kind) is tuple:
        (item, _) = typing.get_args(kind)
        singular = "--" + _singular(field.name).replace("_", "-")
        names = [*aliases, flag] + ([singular] if singular != flag else [])
        group.add_argument(
            *names,
            dest=field.name,
            type=_comma_list(item),
            nargs="+",
            action="extend",
            default=argparse.SUPPRESS,
            metavar=_singular(field.name).upper(),
            help=help_text,
        )
    else:
        group.add_argument(
            *aliases,
            flag,
            dest=field.name,
            type=kind,
            default=argparse.SUPPRESS,
            metavar=field.name.upper(),
            help=help_text,
        )


def _nested_fields(cls: type, name: str, nested: type) -> list[dataclasses.Field]:
    """The fields of nested dataclass field `name` that are flags (and saved)."""
    hidden = getattr(cls, "NESTED_NOT_FLAGS", {}).get(name, ())
    return [f for f in dataclasses.fields(nested) if f.name not in hidden]


def _default(field: dataclasses.Field) -> object:
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


def config_from_args(cls: type, args: argparse.Namespace):
    """Build `cls` from `--config` (if given) overridden by the flags that were passed."""
    values = _load_config_file(cls, args.config) if getattr(args, "config", None) else {}
    given = vars(args)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        kind = hints[field.name]
        if dataclasses.is_dataclass(kind):
            inner = {
                **values.get(field.name, {}),
                **{f.name: given[f.name] for f in _nested_fields(cls, field.name, kind) if f.name in given},
            }
            if field.name in values or inner:
                values[field.name] = dataclasses.replace(_default(field), **_tuples(kind, inner))
        elif field.name in given:
            values[field.name] = given[field.name]
    return cls(**_tuples(cls, values))


def _tuples(cls: type, values: dict) -> dict:
    """Tuple fields from JSON lists or flag values (lists of comma-split lists), flattened."""
    hints = typing.get_type_hints(cls)
    return {
        name: tuple(v for item in value for v in (item if isinstance(item, list) else [item]))
        if typing.get_origin(hints[name]) is tuple and isinstance(value, list)
        else value
        for name, value in values.items()
    }


def _singular(name: str) -> str:
    """hooks -> hook, prefixes -> prefix, batches -> batch; a count (n_latents) or a name not
    ending in "s" is kept."""
    if name.startswith("n_"):
        return name
    if name.endswith(("xes", "ches", "shes", "sses")):
        return name[:-2]
    return name[:-1] if name.endswith("s") else name


def _comma_list(item: type):
    """argparse type: 'a,b' -> [item('a'), item('b')] (flattened by config_from_args)."""

    def parse(text: str) -> list:
        try:
            return [item(part) for part in text.split(",") if part != ""]
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {item.__name__} list: {text!r}") from None

    parse.__name__ = f"{item.__name__} list"
    return parse


def _load_config_file(cls: type, path: Path) -> dict:
    from workbench.files import read_json

    obj = read_json(path, "config file", ConfigError)
    obj = obj.get("config", obj)  # a manifest or summary nests the config
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: 'config' must be a JSON object")
    if hasattr(cls, "upgrade_json"):  # a file saved in an older format_version
        try:
            obj = cls.upgrade_json(obj)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    _check_fields(cls, obj, dataclasses.fields(cls), str(path))
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in obj and dataclasses.is_dataclass(hints[field.name]):
            kind = hints[field.name]
            _check_fields(
                kind, obj[field.name], _nested_fields(cls, field.name, kind), f"{path}: {field.name!r}"
            )
    return dict(obj)


def _check_fields(cls: type, obj: dict, allowed: typing.Iterable[dataclasses.Field], where: str) -> None:
    names = {f.name for f in allowed}
    unknown = sorted(set(obj) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown {cls.__name__} field(s): {', '.join(unknown)}")
    hints = typing.get_type_hints(cls)
    for name, value in obj.items():
        if not _fits(value, hints[name]):
            raise ConfigError(f"{where}: field {name!r} must be {hints[name]}, got {json.dumps(value)}")


def _fits(value: object, kind: type) -> bool:
    if dataclasses.is_dataclass(kind):
        return isinstance(value, dict)  # its fields are checked by _check_fields
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        return isinstance(value, list) and all(isinstance(v, item) for v in value)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _show_default(default: object) -> str:
    """Empty defaults are explained by the field's docstring ("empty means ...")."""
    return "" if default in ("", ()) else f" (default: {default})"
