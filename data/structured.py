"""Settings files (JSON or YAML) and plain messages for what is wrong in them.

The column mapping and the pipeline config are both pydantic models read from
such files; :func:`explain` turns pydantic's errors into one line per problem
that names where the value came from, the field, what is wrong with it and
the fix, using the field's own declaration (its bounds, description and
default) so the wording never drifts from the model.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

# Where a value came from (a file, a flag), by dotted field name.
Origin = Callable[[str], str]

# What pydantic's type errors expected, in words.
_EXPECTED = {
    "int": "an integer",
    "float": "a number",
    "string": "a string",
    "list": "a list",
    "bool": "true or false",
    "dict": "keys and values",
    "model": "keys and values",
    "path": "a path",
}
_BOUNDS = ("greater_than", "less_than")  # pydantic error types of a bound


def read_structured(path: Path, option: str):
    """The content of a JSON or YAML file, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{option} points at {path}, which does not exist")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text)
        return json.loads(text)
    except Exception as error:  # yaml and json raise their own error types
        raise ValueError(f"{option} {path} does not parse: {error}") from None


def explain(
    error: ValidationError, model: type[BaseModel], origin: Origin | str
) -> str:
    """Every problem of ``error``, one per line.

    Args:
        error: what ``model.model_validate`` raised.
        model: the model validated, whose fields give bounds and defaults.
        origin: where the values came from, e.g. the file's path; or a
            function of the dotted field name (a value set by a flag).

    Returns:
        Lines such as ``cfg.yaml: field 'train.epochs' is 0; it must be at
        least 1 (teacher epochs). Set it to a value at least 1, e.g. the
        default 3``.
    """
    where = origin if callable(origin) else (lambda name: str(origin))
    lines = []
    for item in error.errors():
        name = ".".join(str(part) for part in item["loc"])
        lines.append(f"{where(name)}: {_problem(item, model, name)}")
    return "\n".join(lines)


def _problem(item: dict, model: type[BaseModel], name: str) -> str:
    """What is wrong with one value, and the fix."""
    kind, value, loc = item["type"], item.get("input"), item["loc"]
    if kind == "extra_forbidden":
        return _unknown_key(model, loc)
    if kind == "value_error":
        message = str(item["ctx"]["error"])
        return f"field {name!r}: {message}" if loc else message
    if not loc:
        return f"the file must hold keys and values ({_keys(model)}), not {value!r}"
    field = _field(model, loc)
    expected = _EXPECTED.get(kind.split("_")[0])
    problem = f"field {name!r} is {value!r}"
    if expected and not kind.startswith(_BOUNDS):
        problem += f", not {expected}"
    allowed = _allowed(field)
    if allowed:
        problem += f"; it must be {allowed}"
    if field is not None and field.description:
        problem += f" ({field.description})"
    return f"{problem}. {_fix(field, expected, allowed)}"


def _unknown_key(model: type[BaseModel], loc: tuple) -> str:
    parent, key = _model_at(model, loc[:-1]), str(loc[-1])
    inside = f" of {'.'.join(map(str, loc[:-1]))!r}" if len(loc) > 1 else ""
    close = difflib.get_close_matches(key, list(parent.model_fields), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    dotted = ".".join(map(str, loc))
    return f"unknown key {dotted!r}; the keys{inside} are {_keys(parent)}{hint}"


def _keys(model: type[BaseModel]) -> str:
    return ", ".join(model.model_fields)


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel]:
    """The model nested at ``loc`` (a field whose type is itself a model)."""
    for part in loc:
        if isinstance(part, int):
            continue
        annotation = model.model_fields[part].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
    return model


def _field(model: type[BaseModel], loc: tuple) -> FieldInfo | None:
    names = [part for part in loc if isinstance(part, str)]
    if not names:
        return None
    return _model_at(model, tuple(names[:-1])).model_fields.get(names[-1])


def _allowed(field: FieldInfo | None) -> str:
    """The field's bounds in words: ``in [0.9, 1)``, ``at least 1``, or ``""``."""
    bounds = {}
    for bound in field.metadata if field is not None else ():
        for op in ("ge", "gt", "le", "lt"):
            if hasattr(bound, op):
                bounds[op] = getattr(bound, op)
    low = ("[", bounds["ge"]) if "ge" in bounds else ("(", bounds.get("gt"))
    high = ("]", bounds["le"]) if "le" in bounds else (")", bounds.get("lt"))
    if low[1] is not None and high[1] is not None:
        return f"in {low[0]}{low[1]}, {high[1]}{high[0]}"
    if low[1] is not None:
        return f"{'at least' if low[0] == '[' else 'more than'} {low[1]}"
    if high[1] is not None:
        return f"{'at most' if high[0] == ']' else 'less than'} {high[1]}"
    return ""


def _fix(field: FieldInfo | None, expected: str | None, allowed: str) -> str:
    if allowed:
        fix = f"Set it to a value {allowed}"
    elif expected:
        fix = f"Set it to {expected}"
    else:
        return "Fix that value"
    plain_default = (
        field is not None and not field.is_required() and field.default_factory is None
    )
    if plain_default and field.default is None:
        # A value the bounds refuse; None is the setting's absence, no example.
        return f"{fix}, or leave it out (the default: not set)"
    return f"{fix}, e.g. the default {field.default!r}" if plain_default else fix
