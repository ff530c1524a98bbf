"""Constitutions for Constitutional-AI critique and revision.

A constitution is one JSON file in the repository's ``constitutions/`` folder
(schema documented in ``constitutions/README.md``). This module loads and
validates those files and draws principles from them with an explicit seeded
generator. Validation collects every problem in a file and raises a single
``ConstitutionError`` that names the file, the JSON path of each bad field and
the fix, so a broken constitution is never half-loaded.

Example::

    import numpy as np
    from ea_jax.constitutions import load_constitution, draw_principle

    c = load_constitution("deontology")
    p = draw_principle(c, np.random.default_rng(0))
    print(p.critique_request)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

# Persona dimensions that a constitution's expected_signature must cover, in
# this order. Evaluation code reads the same ids.
PERSONA_DIMENSIONS = ("consequentialist", "deontological", "virtue", "deference")

SCHEMA_VERSION = 1
MIN_PRINCIPLES = 12
MIN_DEMONSTRATIONS = 2
_SIGNATURE_VALUES = (-1, 0, 1)
_ENV_DIR = "EA_JAX_CONSTITUTIONS_DIR"

# The package is installed editable, so the repository root is one level above
# this package's folder.
CONSTITUTIONS_DIR = Path(
    os.environ.get(_ENV_DIR) or Path(__file__).resolve().parent.parent / "constitutions"
)

# Top-level fields, each with its JSON type and a hint used in error messages.
_TOP_FIELDS = {
    "schema_version": (int, "the integer 1"),
    "name": (str, "the file stem, e.g. \"deontology\""),
    "title": (str, "a short human-readable title"),
    "framework": (str, "the framework's persona dimension, e.g. \"consequentialist\""),
    "preamble": (str, "2-4 sentences introducing the framework"),
    "expected_signature": (dict, f"an object with keys {list(PERSONA_DIMENSIONS)}"),
    "principles": (list, f"a list of at least {MIN_PRINCIPLES} principle objects"),
    "demonstrations": (list, f"a list of at least {MIN_DEMONSTRATIONS} demonstration objects"),
}
_PRINCIPLE_FIELDS = ("id", "critique_request", "revision_request")
_DEMONSTRATION_FIELDS = ("prompt", "response", "principle_id", "critique", "revision")
_JSON_TYPE_NAMES = {dict: "object", list: "array", str: "string", int: "integer"}


class ConstitutionError(ValueError):
    """A constitution could not be found, parsed or validated."""


@dataclasses.dataclass(frozen=True)
class Principle:
    id: str
    critique_request: str
    revision_request: str


@dataclasses.dataclass(frozen=True)
class Demonstration:
    prompt: str
    response: str
    principle_id: str
    critique: str
    revision: str


@dataclasses.dataclass(frozen=True)
class Constitution:
    name: str
    title: str
    framework: str
    preamble: str
    expected_signature: dict[str, int]
    principles: tuple[Principle, ...]
    demonstrations: tuple[Demonstration, ...]
    path: str
    # Hash of the file's bytes, so callers can key caches of generated data on it.
    sha256: str


def _constitutions_dir() -> Path:
    """Return the folder to search. The env var is read at each call, so tests can change it."""
    env = os.environ.get(_ENV_DIR)
    return Path(env) if env else Path(CONSTITUTIONS_DIR)


def available_constitutions() -> list[str]:
    """Return the sorted file stems of the ``*.json`` files in the constitutions folder."""
    folder = _constitutions_dir()
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.json") if p.is_file())


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    for py_type, name in _JSON_TYPE_NAMES.items():
        if isinstance(value, py_type):
            return name
    if isinstance(value, float):
        return "number"
    return type(value).__name__


def _is_type(value: Any, expected: type) -> bool:
    # bool is a subclass of int in Python but not an integer in the schema.
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _check_object_fields(obj: dict, where: str, fields: tuple[str, ...], problems: list[str]) -> None:
    """Report missing, extra, non-string and empty fields of an object of strings."""
    for key in fields:
        path = f"{where}.{key}"
        if key not in obj:
            problems.append(f"{path}: missing; add a non-empty string")
        elif not isinstance(obj[key], str):
            problems.append(f"{path}: expected a string, got {_type_name(obj[key])}; write it as text")
        elif not obj[key].strip():
            problems.append(f"{path}: empty string; write the text")
    for key in sorted(set(obj) - set(fields)):
        problems.append(f"{where}.{key}: unknown field; remove it (allowed fields: {list(fields)})")


def _validate(doc: Any, stem: str) -> list[str]:
    """Return every problem in a parsed constitution document, each as 'json.path: problem; fix'."""
    if not isinstance(doc, dict):
        return [f"(top level): expected a JSON object, got {_type_name(doc)}; wrap the fields in {{...}}"]
    problems: list[str] = []

    for key, (py_type, hint) in _TOP_FIELDS.items():
        if key not in doc:
            problems.append(f"{key}: missing; add {hint}")
        elif not _is_type(doc[key], py_type):
            problems.append(
                f"{key}: expected {_JSON_TYPE_NAMES[py_type]}, got {_type_name(doc[key])}; use {hint}"
            )
        elif py_type is str and not doc[key].strip():
            problems.append(f"{key}: empty string; use {hint}")
    for key in sorted(set(doc) - set(_TOP_FIELDS)):
        problems.append(f"{key}: unknown field; remove it (allowed fields: {list(_TOP_FIELDS)})")

    if _is_type(doc.get("schema_version"), int) and doc["schema_version"] != SCHEMA_VERSION:
        problems.append(
            f"schema_version: got {doc['schema_version']}, this loader reads {SCHEMA_VERSION}; "
            f"set it to {SCHEMA_VERSION} and match the schema in constitutions/README.md"
        )

    name = doc.get("name")
    if isinstance(name, str) and name.strip() and name != stem:
        problems.append(f"name: {name!r} differs from the file stem {stem!r}; set name to {stem!r} or rename the file")
    id_prefix = name if isinstance(name, str) and name.strip() else stem

    signature = doc.get("expected_signature")
    if isinstance(signature, dict):
        for dim in PERSONA_DIMENSIONS:
            if dim not in signature:
                problems.append(f"expected_signature.{dim}: missing; add it with -1, 0 or 1")
            elif not _is_type(signature[dim], int) or signature[dim] not in _SIGNATURE_VALUES:
                problems.append(
                    f"expected_signature.{dim}: got {signature[dim]!r}; use -1 (falls), 0 (stays) or 1 (rises)"
                )
        for key in sorted(set(signature) - set(PERSONA_DIMENSIONS)):
            problems.append(
                f"expected_signature.{key}: not a persona dimension; remove it "
                f"(dimensions: {list(PERSONA_DIMENSIONS)})"
            )

    principle_ids: set[str] = set()
    principles = doc.get("principles")
    if isinstance(principles, list):
        if len(principles) < MIN_PRINCIPLES:
            problems.append(f"principles: {len(principles)} given, at least {MIN_PRINCIPLES} required; add principles")
        id_pattern = re.compile(rf"{re.escape(id_prefix)}-\d{{2}}")
        first_index: dict[str, int] = {}
        for i, principle in enumerate(principles):
            where = f"principles[{i}]"
            if not isinstance(principle, dict):
                problems.append(f"{where}: expected an object, got {_type_name(principle)}; use {{\"id\": ..., ...}}")
                continue
            _check_object_fields(principle, where, _PRINCIPLE_FIELDS, problems)
            pid = principle.get("id")
            if not isinstance(pid, str) or not pid.strip():
                continue
            if not id_pattern.fullmatch(pid):
                problems.append(
                    f"{where}.id: {pid!r} does not match '{id_prefix}-NN'; use e.g. '{id_prefix}-{i + 1:02d}'"
                )
            if pid in first_index:
                problems.append(
                    f"{where}.id: duplicate id {pid!r} (first used by principles[{first_index[pid]}]); "
                    "give it a unique id"
                )
            else:
                first_index[pid] = i
        principle_ids = set(first_index)

    demonstrations = doc.get("demonstrations")
    if isinstance(demonstrations, list):
        if len(demonstrations) < MIN_DEMONSTRATIONS:
            problems.append(
                f"demonstrations: {len(demonstrations)} given, at least {MIN_DEMONSTRATIONS} required; "
                "add demonstrations"
            )
        for i, demo in enumerate(demonstrations):
            where = f"demonstrations[{i}]"
            if not isinstance(demo, dict):
                problems.append(f"{where}: expected an object, got {_type_name(demo)}; use {{\"prompt\": ..., ...}}")
                continue
            _check_object_fields(demo, where, _DEMONSTRATION_FIELDS, problems)
            pid = demo.get("principle_id")
            # Only cross-check when the principles list itself was readable.
            if isinstance(pid, str) and pid.strip() and isinstance(principles, list) and pid not in principle_ids:
                problems.append(
                    f"{where}.principle_id: {pid!r} is not the id of any principle; "
                    f"use one of {sorted(principle_ids)}"
                )
    return problems


def _resolve_path(name_or_path: str) -> Path:
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ConstitutionError(
            f"expected a constitution name or a path to a .json file, got {type(name_or_path).__name__}"
        )
    text = os.fspath(name_or_path)
    looks_like_path = text.endswith(".json") or os.sep in text or "/" in text
    if looks_like_path:
        path = Path(text)
        if not path.is_file():
            raise ConstitutionError(f"constitution file {text!r} does not exist; pass an existing .json file or a name")
        return path
    path = _constitutions_dir() / f"{text}.json"
    if not path.is_file():
        raise ConstitutionError(
            f"unknown constitution {text!r} in {_constitutions_dir()}; "
            f"available: {available_constitutions()}"
        )
    return path


def load_constitution(name_or_path: str) -> Constitution:
    """Load and validate a constitution by name ("deontology") or by path to a .json file.

    Raises ConstitutionError for an unknown name, unreadable or invalid JSON, or a
    document that breaks the schema; the message lists every problem found.
    """
    path = _resolve_path(name_or_path)
    raw = path.read_bytes()
    try:
        doc = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConstitutionError(f"invalid constitution file {path}: not UTF-8 text ({e}); save it as UTF-8") from e
    except json.JSONDecodeError as e:
        raise ConstitutionError(
            f"invalid constitution file {path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}; "
            f"fix the syntax there"
        ) from e

    problems = _validate(doc, path.stem)
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise ConstitutionError(
            f"invalid constitution file {path} ({len(problems)} problem{'s' if len(problems) != 1 else ''}; "
            f"schema in constitutions/README.md):\n{listing}"
        )

    return Constitution(
        name=doc["name"],
        title=doc["title"],
        framework=doc["framework"],
        preamble=doc["preamble"],
        expected_signature={dim: doc["expected_signature"][dim] for dim in PERSONA_DIMENSIONS},
        principles=tuple(Principle(**p) for p in doc["principles"]),
        demonstrations=tuple(Demonstration(**d) for d in doc["demonstrations"]),
        path=str(path.resolve()),
        sha256=hashlib.sha256(raw).hexdigest(),
    )


def draw_principle(constitution: Constitution, rng: np.random.Generator) -> Principle:
    """Draw one principle uniformly with the caller's generator (``np.random.default_rng(seed)``)."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"rng must be a numpy.random.Generator, got {type(rng).__name__}; pass np.random.default_rng(seed)"
        )
    return constitution.principles[int(rng.integers(len(constitution.principles)))]


def principle_by_id(constitution: Constitution, principle_id: str) -> Principle:
    """Return the principle with this id, or raise ConstitutionError listing the valid ids."""
    for principle in constitution.principles:
        if principle.id == principle_id:
            return principle
    raise ConstitutionError(
        f"constitution {constitution.name!r} has no principle {principle_id!r}; "
        f"ids: {[p.id for p in constitution.principles]}"
    )
