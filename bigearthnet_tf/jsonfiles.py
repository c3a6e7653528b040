"""Strict reading of the small JSON files users hand us or we wrote (configs, statistics, thresholds,
checkpoint metadata, manifests): one way, one set of errors.

Strict means: UTF-8, exactly one JSON object, no NaN or Infinity (not JSON, and they would slip into a
number), no key twice, no nesting deep enough to exhaust the stack, no number of thousands of digits.
Every refusal is one line naming the file, raised as the caller's error type (a `UserError` subclass).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from bigearthnet_tf.errors import UserError


def json_type(value: Any) -> str:
    """The JSON name of a value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def read_json_object(
    path: Path,
    description: str = "JSON file",
    error: type[UserError] = UserError,
    max_bytes: int | None = None,
    *,
    non_finite: bool = False,
) -> dict[str, Any]:
    """The JSON object in `path` (a `description`, e.g. "config file"); anything else raises `error`.

    `max_bytes` bounds what is read, so a huge file is refused without being loaded. With
    `non_finite`, NaN and Infinity are read as floats, for a reader that refuses them naming the key.
    """
    try:
        if max_bytes is not None and path.stat().st_size > max_bytes:
            raise error(f"{description} {path} is larger than {max_bytes:,} bytes; is it the right file?")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{description} {path} does not exist") from None
    except IsADirectoryError:
        raise error(f"{description} {path} is a folder, not a JSON file") from None
    except UnicodeDecodeError:
        raise error(f"{description} {path} is not a UTF-8 text (JSON) file") from None
    except OSError as problem:
        raise error(f"{description} {path} cannot be read: {problem.strerror or problem}") from None

    def no_constants(name: str) -> float:
        if non_finite:
            return float(name)
        raise error(f"{path}: {name} is not a JSON number")

    def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                raise error(f"{path}: key {key!r} appears twice")
            seen[key] = value
        return seen

    try:
        document = json.loads(text, parse_constant=no_constants, object_pairs_hook=unique_keys)
    except json.JSONDecodeError as problem:
        raise error(
            f"{path}: not valid JSON: {problem.msg} (line {problem.lineno}, column {problem.colno})"
        ) from None
    except RecursionError:
        raise error(f"{path}: not valid JSON: nested too deeply") from None
    except ValueError:  # int() refuses numbers of more than 4,300 digits (a guard against slow parsing)
        raise error(f"{path}: not valid JSON: a number has too many digits") from None
    if not isinstance(document, dict):
        raise error(f"{path}: expected a JSON object {{...}}, got {json_type(document)}")
    return document


def json_digest(document: Any) -> str:
    """The SHA-256 of a JSON document in one canonical form (keys sorted): a fingerprint of a job."""
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode("utf-8")).hexdigest()
