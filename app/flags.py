"""CLI flags derived from frozen config dataclasses, so no option is written twice.

Each field becomes `--field-name` with the field's type, default and docstring (the string
literal under the field) as help. `tuple[str, ...]` fields take one or more values and may be
repeated; their singular form is an alias (`--hooks a b` == `--hook a --hook b`). Their values may also be
comma-separated (`--k 16,32`). A class may give a field extra flag names in `FLAG_ALIASES`
(`--from` for `from_activations`). `bool` fields get `--x/--no-x`. `--config FILE.json` loads a saved config as the defaults, so
`workbench cache --config runs/x/config.json` reproduces a run and flags still override it.
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
            if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per field of dataclass `cls` (plus `--config`)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    group = parser.add_argument_group(f"{cls.__name__} (saved with the run)")
    group.add_argument("--config", type=Path, metavar="JSON", help="load these settings from a saved config.json")
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        flag = "--" + field.name.replace("_", "-")
        aliases = tuple(getattr(cls, "FLAG_ALIASES", {}).get(field.name, ()))
        kind = hints[field.name]
        help_text = (docs.get(field.name, "") + _show_default(field.default)).replace("%", "%%")
        if kind is bool:
            group.add_argument(flag, *aliases, dest=field.name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
        elif typing.get_origin(kind) is tuple:
            (item, _) = typing.get_args(kind)
            names = [flag, *aliases] + ([flag[:-1]] if flag.endswith("s") else [])
            group.add_argument(*names, dest=field.name, type=_comma_list(item), nargs="+", action="extend",
                               default=argparse.SUPPRESS, metavar=_singular(field.name).upper(), help=help_text)
        else:
            group.add_argument(flag, *aliases, dest=field.name, type=kind, default=argparse.SUPPRESS,
                               metavar=field.name.upper(), help=help_text)


def config_from_args(cls: type, args: argparse.Namespace):
    """Build `cls` from `--config` (if given) overridden by the flags that were passed."""
    values = _load_config_file(cls, args.config) if getattr(args, "config", None) else {}
    names = {f.name for f in dataclasses.fields(cls)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        if typing.get_origin(hints[name]) is tuple and isinstance(value, list):
            values[name] = tuple(v for item in value for v in (item if isinstance(item, list) else [item]))
    return cls(**values)


def _singular(name: str) -> str:
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
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(obj) - names)
    if unknown:
        raise ConfigError(f"{path}: unknown {cls.__name__} field(s): {', '.join(unknown)}")
    hints = typing.get_type_hints(cls)
    for name, value in obj.items():
        if not _fits(value, hints[name]):
            raise ConfigError(f"{path}: field {name!r} must be {hints[name]}, got {json.dumps(value)}")
    return dict(obj)


def _fits(value: object, kind: type) -> bool:
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
