"""Typed payloads (SPEC §3): `@processor(schema=Model)` with a Pydantic v2 model or a
dataclass. One module for both ends: enqueue turns model instances into plain JSON and
checks data against a registered processor's schema; the worker checks it always and
hands the processor the model instance. Errors name the field: `data["email"]: …`.

References: the codec stores an ORM instance as {"$ref": "module:Class", "pk": …}; the
worker loads each one again here, in the session it is given, before the schema check.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy.orm import Session

from .codec import REF, REF_KEYS
from .errors import ConfigError, InvalidData, MissingReference


def _pydantic_model(schema: Any) -> bool:
    model = getattr(schema, "model_validate", None)
    return isinstance(schema, type) and callable(model) and hasattr(schema, "model_fields")


def check_schema(schema: Any, what: str) -> Any:
    """None, a Pydantic v2 model class or a dataclass; anything else one clear line."""
    if schema is None or _pydantic_model(schema) or (
            isinstance(schema, type) and dataclasses.is_dataclass(schema)):
        return schema
    raise ConfigError(f"{what}: must be a Pydantic model class or a dataclass, got "
                      f"{schema!r:.80}")


def plain(data: Any) -> Any:
    """A model or dataclass instance as JSON-ready data (anything else as it is)."""
    kind = type(data)
    if kind is dict or kind is list or data is None or kind is str:
        return data
    if _pydantic_model(kind):
        return data.model_dump(mode="json")
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        return dataclasses.asdict(data)
    return data


def validate(schema: Any, data: Any, what: str = "data") -> Any:
    """`data` as an instance of `schema`, or InvalidData naming the first bad field."""
    if isinstance(data, schema):
        return data
    if _pydantic_model(schema):
        from pydantic import ValidationError

        try:
            return schema.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise InvalidData(f"{_path(what, first['loc'])}: {first['msg']}") from None
    return _dataclass(schema, data, what)


def _dataclass(schema: Any, data: Any, what: str) -> Any:
    """Without a validator at hand: the fields, by name (present, none unknown)."""
    try:
        from pydantic import TypeAdapter, ValidationError
    except ImportError:
        pass
    else:
        try:
            return TypeAdapter(schema).validate_python(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise InvalidData(f"{_path(what, first['loc'])}: {first['msg']}") from None
    if not isinstance(data, dict):
        raise InvalidData(f"{what}: must be an object with the fields of "
                          f"{schema.__name__}, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(schema) if f.init}
    for name in data:
        if name not in fields:
            raise InvalidData(f"{_path(what, (name,))}: is not a field of {schema.__name__}")
    for name, f in fields.items():
        if name not in data and f.default is dataclasses.MISSING and \
                f.default_factory is dataclasses.MISSING:
            raise InvalidData(f"{_path(what, (name,))}: Field required")
    return schema(**data)


def _path(what: str, loc: Sequence[Any]) -> str:
    return what + "".join(f"[{json.dumps(part)}]" for part in loc)


def for_enqueue(schema: Any, data: Any, what: str = "data") -> Any:
    """What enqueue stores: plain data, checked against `schema` when there is one."""
    if schema is not None and data is not None:
        validate(schema, data, what)
    return plain(data)


_PLAIN = (dict, list, str, int, float, bool, type(None))


def many_for_enqueue(schema: Any, data: Sequence[Any]) -> Sequence[Any]:
    """for_enqueue of each item (a bulk enqueue of plain dicts without a schema is
    left as it is: it may hold tens of thousands)."""
    if schema is None and all(type(d) in _PLAIN for d in data):
        return data
    return [for_enqueue(schema, d, f"data[{i}]") for i, d in enumerate(data)]


def _is_ref(node: Any) -> bool:
    return type(node) is dict and len(node) == 2 and node.keys() == REF_KEYS


def has_references(data: Any) -> bool:
    """Whether `data` holds a reference (a walk of the decoded tree). Called for every
    action a worker runs: plain loops, no generators."""
    kind = type(data)
    if kind is dict:
        if _is_ref(data):
            return True
        values: Iterable[Any] = data.values()
    elif kind is list:
        values = data
    else:
        return False
    for value in values:
        if (type(value) is dict or type(value) is list) and has_references(value):
            return True
    return False


def load_references(data: Any, session: Session, what: str = "data") -> Any:
    """`data` with each reference replaced by its row, loaded in `session`; a class
    that does not import or a row that is gone is MissingReference, naming both."""
    if _is_ref(data):
        return _load(data, session, what)
    if type(data) is dict:
        return {k: load_references(v, session, f"{what}[{json.dumps(k)}]")
                for k, v in data.items()}
    if type(data) is list:
        return [load_references(v, session, f"{what}[{i}]") for i, v in enumerate(data)]
    return data


def _load(ref: dict[str, Any], session: Session, what: str) -> Any:
    target, pk = ref[REF], ref["pk"]
    cls = _class(target, what)
    row = session.get(cls, tuple(pk) if isinstance(pk, list) else pk)
    if row is None:
        raise MissingReference(f"{what}: {target} with pk {json.dumps(pk, default=str)} no "
                               "longer exists; it was deleted after the action was enqueued")
    return row


def _class(target: Any, what: str) -> type:
    module, _, name = target.partition(":") if isinstance(target, str) else ("", "", "")
    try:
        obj: Any = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
    except Exception as exc:
        raise MissingReference(f"{what}: the reference to {target!r} does not import "
                               f"({type(exc).__name__}: {exc}); deploy the module on the "
                               "worker or cancel the action") from None
    if not isinstance(obj, type):
        raise MissingReference(f"{what}: {target!r} is not a class")
    return obj
