"""JSON with types: datetime, date, Decimal and UUID survive the round trip.

A typed value is stored as a one-key object, readable by plain SQL:
``{"$datetime": "2026-11-23T05:41:46+00:00"}``, ``{"$date": "2026-11-23"}``,
``{"$decimal": "19.90"}``, ``{"$uuid": "…"}``. Naive datetimes are written without
an offset and come back naive. One-key objects with these keys are reserved: a value
that holds one is refused, since it would be read back as something else.
Payloads are trees at most MAX_DEPTH deep, so that reading one back never runs out of
stack, wherever it is read.

A SQLAlchemy ORM instance is stored as a reference, ``{"$ref": "module:Class", "pk": …}``
(its primary key, never a copy of the row), which the worker loads again (payloads.py).
Objects of exactly these two keys are reserved likewise.
"""

from __future__ import annotations

import json
import json.encoder
import json.scanner
from collections.abc import Callable
from datetime import date, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import InstanceState, object_session

from .errors import UnserializableData

ALLOWED = "a str, number, bool, None, list, dict, datetime, date, Decimal or UUID"

# What decoding stored text can raise when the table holds something we did not write.
MALFORMED = (ValueError, ArithmeticError, TypeError, RecursionError)
MAX_DEPTH = 100
# The default limit of an encoded payload (data, and results), in bytes; the config
# file's max_data_bytes changes it for the programs that read that file.
MAX_DATA_BYTES = 131072

_DECODERS = {
    "$datetime": datetime.fromisoformat,
    "$date": date.fromisoformat,
    "$decimal": Decimal,
    "$uuid": UUID,
}


REF, REF_KEYS = "$ref", frozenset({"$ref", "pk"})


def _tag(value: Any) -> dict[str, Any]:
    # datetime before date: a datetime is a date too.
    if isinstance(value, datetime):
        return {"$datetime": value.isoformat()}
    if isinstance(value, date):
        return {"$date": value.isoformat()}
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError("non-finite Decimal")
        return {"$decimal": str(value)}
    if isinstance(value, UUID):
        return {"$uuid": str(value)}
    state = sa_inspect(value, raiseerr=False)
    if isinstance(state, InstanceState):
        return reference(value, state)
    raise TypeError(type(value).__name__)


def reference(value: Any, state: InstanceState[Any]) -> dict[str, Any]:
    """An ORM instance as {"$ref": "module:Class", "pk": …}; one added to a session but
    not yet written is flushed first, so that it has its primary key."""
    if state.key is None and state.pending:
        session = object_session(value)
        if session is not None:
            session.flush()
    if state.key is None:
        raise ValueError(f"a {type(value).__name__} that is not in the database yet has no "
                         "primary key to refer to; add it to a session and flush first")
    pk = state.key[1]
    return {REF: f"{type(value).__module__}:{type(value).__qualname__}",
            "pk": pk[0] if len(pk) == 1 else list(pk)}


def dumps(value: Any, *, what: str = "data", max_bytes: int | None = None) -> str:
    """Encode `value`, or raise UnserializableData naming the offending path."""
    try:
        text = _encode(value)
    except (TypeError, ValueError, RecursionError):
        try:
            problem = _explain(value, what)
        except RecursionError:
            problem = f"{what}: nested too deeply; at most {MAX_DEPTH} levels are allowed"
        raise UnserializableData(problem) from None
    if "\\u0000" in text or "\\ud" in text:  # rare: only then are the strings walked
        _check_strings(value, what)
    # Cheap tests on the text first: only payloads that may break a rule are walked.
    if '"$' in text or text.count("{") + text.count("[") > MAX_DEPTH:
        _check_tree(value, what)
    if max_bytes is not None and len(text) > max_bytes:
        size = len(text.encode())
        if size > max_bytes:
            raise UnserializableData(
                f"{what} is {size} bytes encoded, over the limit of {max_bytes}; store large "
                "payloads elsewhere and pass a reference, or raise max_data_bytes")
    return text


def loads(text: str | None) -> Any:
    if text is None:
        return None
    # Only a key beginning with "$" (or with an escape that could spell one) is a tag:
    # text without either decodes without the per-object hook, by the C scanner itself
    # (the decoder's Python around it cost as much as the scan of a small payload).
    if "$" not in text and "\\u" not in text:
        try:
            value, end = _scan(text, 0)
        except StopIteration:  # not a JSON value at 0: the decoder says what is wrong
            return _plain.decode(text)
        return value if end == len(text) else _plain.decode(text)
    return _decoder.decode(text)


def _untag(obj: dict[str, Any]) -> Any:
    if len(obj) == 1:
        ((key, raw),) = obj.items()
        decode = _DECODERS.get(key)
        if decode is not None and isinstance(raw, str):
            try:
                return decode(raw)
            except MALFORMED:
                raise ValueError(f'{{"{key}": {raw!r}}} is not a valid {key[1:]}') from None
    return obj


def _check_tree(value: Any, what: str) -> None:
    """Refuse reserved one-key objects and trees deeper than MAX_DEPTH (iteratively: the
    tree may be deeper than the stack)."""
    stack: list[tuple[Any, str, int]] = [(value, what, 1)]
    while stack:
        node, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise UnserializableData(f"{what}: nested more than {MAX_DEPTH} levels deep; "
                                     "store a flatter structure")
        if isinstance(node, dict):
            if len(node) == 2 and node.keys() == REF_KEYS:
                raise UnserializableData(
                    f'{path}: {{"$ref": …, "pk": …}} is reserved (SQLAlchemy ORM instances are '
                    'stored so, and it would be loaded back as a row); rename a key or add '
                    "another one")
            if len(node) == 1 and next(iter(node)) in _DECODERS:
                key = next(iter(node))
                raise UnserializableData(
                    f'{path}: {{"{key}": …}} is reserved (typed values are stored as one-key '
                    f'objects and it would be read back as a {key[1:]}); rename the key or '
                    "add another one")
            stack.extend((v, f"{path}[{json.dumps(k)}]", depth + 1) for k, v in node.items())
        elif isinstance(node, list | tuple):
            stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(node))


def check_text(text: str, what: str) -> None:
    """Text the database can store: no NUL (PostgreSQL refuses it), no lone surrogate
    (it is not UTF-8)."""
    if "\x00" in text:
        raise UnserializableData(f"{what}: contains a NUL character, which the database "
                                 "cannot store; remove it")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UnserializableData(f"{what}: {text!a} is not valid UTF-8 text") from None


def _check_strings(value: Any, what: str) -> None:
    stack: list[tuple[Any, str]] = [(value, what)]
    while stack:  # iteratively: dumps() has bounded the depth, not the stack
        node, path = stack.pop()
        if isinstance(node, str):
            check_text(node, path)
        elif isinstance(node, dict):
            for key, item in node.items():
                if isinstance(key, str):
                    check_text(key, f"{path} key {key!a}")
                stack.append((item, f"{path}[{json.dumps(key)}]"))
        elif isinstance(node, list | tuple):
            stack.extend((item, f"{path}[{i}]") for i, item in enumerate(node))


def _explain(value: Any, path: str, seen: frozenset[int] = frozenset()) -> str:
    """Slow path, only on failure: find the first value the codec refuses."""
    if isinstance(value, str | bool | int | type(None)):
        return f"{path}: unexpected encoding failure"
    if isinstance(value, float):
        return f"{path}: {value!r} is not a finite number; JSON has no NaN or infinity"
    if isinstance(value, Decimal | datetime | date | UUID):
        return f"{path}: {value!r} cannot be stored (a Decimal must be finite)"
    state = sa_inspect(value, raiseerr=False)
    if isinstance(state, InstanceState):
        try:
            reference(value, state)
        except ValueError as exc:
            return f"{path}: {exc}"
        return f"{path}: a reference to a {type(value).__name__} cannot be stored"
    if id(value) in seen:
        return f"{path}: refers to itself; data must be a tree, not a cycle"
    seen = seen | {id(value)}
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str | int | float | bool | type(None)):
                return (f"{path}: key {key!r} of type {type(key).__name__} is not allowed; "
                        "dict keys must be strings")
            if _fails(item):
                return _explain(item, f"{path}[{json.dumps(key)}]", seen)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            if _fails(item):
                return _explain(item, f"{path}[{i}]", seen)
    else:
        return (f"{path}: object of type {type(value).__name__} is not serializable; "
                f"pass {ALLOWED}")
    return f"{path}: cannot be serialized; pass {ALLOWED}"


def _fails(value: Any) -> bool:
    try:
        json.dumps(value, default=_tag, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return True
    return False


def _make_encode() -> Callable[[Any], str]:
    """json's C encoder, built once. JSONEncoder.encode builds it anew on every call,
    which costs more than encoding a small payload: a bulk enqueue of 20,000 actions
    spent 65 ms encoding, now 25. No circular-reference markers: a cycle ends in
    RecursionError, and a table shared by threads could report a false cycle."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # no C accelerator on this interpreter
        return json.JSONEncoder(default=_tag, allow_nan=False, separators=(",", ":")).encode
    encoder = make(None, _tag, json.encoder.encode_basestring_ascii, None, ":", ",", False,
                   False, False)
    return lambda value: "".join(encoder(value, 0))


# Built once: dumps() and loads() run for every action.
_encode = _make_encode()
_decoder = json.JSONDecoder(object_hook=_untag)
_plain = json.JSONDecoder()
_scan = json.scanner.make_scanner(_plain)
