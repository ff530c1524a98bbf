"""Red-team prompt sets, the safety taxonomy they are labelled with, and scope selection.

The data lives in ``ea_jax/data`` (see its README.md for the formats):

* ``taxonomy.json``: 8 categories, each with 3 subcategories.
* ``redteam_train.jsonl`` / ``redteam_eval.jsonl``: requests a safe model should decline or
  redirect, one subcategory each, plus optional ``tags`` naming further subcategories the
  request also falls under.
* ``benign.jsonl``: prompts that sound sensitive but are safe to answer (no subcategory).

A *scope* picks which red-team prompts a run trains or evaluates on. ``"broad"`` keeps every
subcategory; ``"narrow"`` keeps only ``narrow_subcategories``. Either way, prompts whose
subcategory or tags fall in ``filtered_out`` are dropped, so that a narrow run can hold out the
neighbouring subcategories (by default stalking and fraud) and later measure spill-over into them.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import pathlib
import re
import string
from collections.abc import Iterable, Sequence


DATA_DIR = pathlib.Path(__file__).resolve().parent / "data"
TAXONOMY_FILE = "taxonomy.json"
TRAIN_FILE = "redteam_train.jsonl"
EVAL_FILE = "redteam_eval.jsonl"
BENIGN_FILE = "benign.jsonl"

SCOPES = ("broad", "narrow")
DEFAULT_NARROW_SUBCATEGORIES = ("harassment", "illegal_behaviour")
# Subcategories next to the narrow ones that a narrow run leaves out entirely, so that transfer
# into them can be measured.
DEFAULT_FILTERED_OUT = ("stalking", "fraud")

RECORD_FIELDS = ("id", "prompt", "category", "subcategory", "tags")
MAX_REPORTED_PROBLEMS = 20
_ID_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")

# Near-duplicate detection. The word-set similarity ignores these function words, which would
# otherwise make any two short "How do I ...?" questions look alike.
SHINGLE_SIZE = 3
STOPWORDS = frozenset(
    "a an the and or but if so of to in on at by for from with without into onto about as "
    "is are was were be been being am do does did doing have has had having will would can "
    "could should shall may might must i me my mine you your yours he him his she her hers it "
    "its we us our they them their this that these those there here what which who whom whose "
    "how why when where just then than too very".split()
)
# Apostrophes join ("ex's" -> "exs"); any other punctuation separates ("pipe-bomb" -> "pipe bomb").
_APOSTROPHES = "'\u2018\u2019"
_PUNCTUATION = str.maketrans(
    {c: None for c in _APOSTROPHES}
    | {c: " " for c in string.punctuation + "\u201c\u201d\u2013\u2014" if c not in _APOSTROPHES}
)


class PromptFileError(ValueError):
    """A taxonomy or prompt file is malformed; the message names file, line, field and fix."""


class ScopeError(ValueError):
    """A scope selection was asked for with invalid arguments, or would keep nothing."""


@dataclasses.dataclass(frozen=True)
class Subcategory:
    id: str
    name: str
    description: str
    category: str  # id of the Category that contains it


@dataclasses.dataclass(frozen=True)
class Category:
    id: str
    name: str
    description: str
    subcategories: tuple[Subcategory, ...]


@dataclasses.dataclass(frozen=True)
class Taxonomy:
    categories: tuple[Category, ...]

    def _subcategory_index(self) -> dict[str, Subcategory]:
        return {s.id: s for c in self.categories for s in c.subcategories}

    def subcategory(self, subcategory_id: str) -> Subcategory:
        index = self._subcategory_index()
        if subcategory_id not in index:
            raise KeyError(
                f"unknown subcategory {subcategory_id!r}; valid ids: {', '.join(index)}"
            )
        return index[subcategory_id]

    def category(self, category_id: str) -> Category:
        for c in self.categories:
            if c.id == category_id:
                return c
        raise KeyError(
            f"unknown category {category_id!r}; valid ids: {', '.join(self.category_ids())}"
        )

    def category_of(self, subcategory_id: str) -> Category:
        return self.category(self.subcategory(subcategory_id).category)

    def subcategory_ids(self) -> tuple[str, ...]:
        return tuple(s.id for c in self.categories for s in c.subcategories)

    def category_ids(self) -> tuple[str, ...]:
        return tuple(c.id for c in self.categories)


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    id: str
    prompt: str
    category: str
    subcategory: str | None  # None only for benign prompts
    tags: tuple[str, ...]  # further subcategories the prompt also falls under

    def subcategories(self) -> set[str]:
        """Return the primary subcategory (if any) and every tag."""
        return {self.subcategory, *self.tags} - {None}


@dataclasses.dataclass(frozen=True)
class PromptSets:
    train: list[PromptRecord]
    eval: list[PromptRecord]
    benign: list[PromptRecord]
    taxonomy: Taxonomy


@dataclasses.dataclass(frozen=True)
class ScopeSelection:
    scope: str
    kept: tuple[PromptRecord, ...]
    dropped: tuple[tuple[PromptRecord, str], ...]  # (record, reason)
    narrow_subcategories: tuple[str, ...] = ()  # as passed; only used when scope is "narrow"
    filtered_out: tuple[str, ...] = ()

    def to_manifest(self) -> dict:
        """Return a JSON-ready record of what was kept and dropped, and why."""
        return {
            "scope": self.scope,
            "narrow_subcategories": list(self.narrow_subcategories),
            "filtered_out": list(self.filtered_out),
            "n_kept": len(self.kept),
            "n_dropped": len(self.dropped),
            "kept": [r.id for r in self.kept],
            "dropped": [{"id": r.id, "reason": reason} for r, reason in self.dropped],
            "kept_per_subcategory": dict(collections.Counter(r.subcategory for r in self.kept)),
            "dropped_per_subcategory": dict(
                collections.Counter(r.subcategory for r, _ in self.dropped)
            ),
        }


# ---------------------------------------------------------------------------------------------
# Loading


def _raise_problems(path: pathlib.Path, problems: list[str], what: str) -> None:
    shown = problems[:MAX_REPORTED_PROBLEMS]
    more = len(problems) - len(shown)
    lines = [f"{len(problems)} problem(s) in {what} {path}:", *(f"  {p}" for p in shown)]
    if more:
        lines.append(f"  ... and {more} more")
    raise PromptFileError("\n".join(lines))


def _require_text(obj: dict, key: str, where: str, problems: list[str]) -> str | None:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        problems.append(f"{where}: field '{key}' is {value!r}; give a non-empty string")
        return None
    return value


def load_taxonomy(path: str | pathlib.Path | None = None) -> Taxonomy:
    """Read and validate ``taxonomy.json`` (default: the one shipped in DATA_DIR)."""
    path = pathlib.Path(path) if path is not None else DATA_DIR / TAXONOMY_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PromptFileError(
            f"{path}:{e.lineno}: invalid JSON ({e.msg}); fix the syntax at column {e.colno}"
        ) from e
    problems: list[str] = []
    raw_categories = raw.get("categories") if isinstance(raw, dict) else None
    if not isinstance(raw_categories, list) or not raw_categories:
        _raise_problems(
            path, ["top level: expected an object with a non-empty list 'categories'"], "taxonomy"
        )
    categories = []
    seen: set[str] = set()
    for ci, rc in enumerate(raw_categories):
        where = f"categories[{ci}]"
        if not isinstance(rc, dict):
            problems.append(f"{where}: expected an object, got {type(rc).__name__}")
            continue
        fields = {k: _require_text(rc, k, where, problems) for k in ("id", "name", "description")}
        cid = fields["id"]
        if cid is not None and not _ID_PATTERN.match(cid):
            problems.append(f"{where}: id {cid!r} is not snake_case; use [a-z][a-z0-9_]*")
        if cid in seen:
            problems.append(f"{where}: duplicate id {cid!r}; ids must be unique across the file")
        seen.add(cid)
        raw_subs = rc.get("subcategories")
        if not isinstance(raw_subs, list) or not raw_subs:
            problems.append(f"{where}: field 'subcategories' must be a non-empty list")
            continue
        subs = []
        for si, rs in enumerate(raw_subs):
            swhere = f"{where}.subcategories[{si}]"
            if not isinstance(rs, dict):
                problems.append(f"{swhere}: expected an object, got {type(rs).__name__}")
                continue
            sf = {k: _require_text(rs, k, swhere, problems) for k in ("id", "name", "description")}
            sid = sf["id"]
            if sid is not None and not _ID_PATTERN.match(sid):
                problems.append(f"{swhere}: id {sid!r} is not snake_case; use [a-z][a-z0-9_]*")
            if sid in seen:
                problems.append(
                    f"{swhere}: duplicate id {sid!r}; ids must be unique across the file"
                )
            seen.add(sid)
            subs.append(Subcategory(sid, sf["name"], sf["description"], cid))
        categories.append(Category(cid, fields["name"], fields["description"], tuple(subs)))
    if problems:
        _raise_problems(path, problems, "taxonomy")
    return Taxonomy(tuple(categories))


def _check_record(
    obj: object, taxonomy: Taxonomy, require_subcategory: bool, problems: list[str]
) -> PromptRecord | None:
    """Validate one decoded line; append one message per problem (without the location)."""
    if not isinstance(obj, dict):
        problems.append(f"expected a JSON object, got {type(obj).__name__}")
        return None
    start = len(problems)
    for key in RECORD_FIELDS:
        if key not in obj:
            problems.append(
                f"field '{key}' is missing; every record needs {', '.join(RECORD_FIELDS)}"
            )
    for key in obj:
        if key not in RECORD_FIELDS:
            problems.append(
                f"field '{key}' is not a known field; allowed: {', '.join(RECORD_FIELDS)}"
            )
    if len(problems) > start:
        return None

    rid, prompt, category, sub, tags = (obj[k] for k in RECORD_FIELDS)
    if not isinstance(rid, str) or not rid.strip():
        problems.append(f"field 'id' is {rid!r}; give a non-empty string")
    if not isinstance(prompt, str) or not prompt.strip():
        problems.append(f"field 'prompt' is {prompt!r}; write the prompt text")
    if category not in taxonomy.category_ids():
        problems.append(
            f"field 'category': unknown category {category!r}; "
            f"use one of {', '.join(taxonomy.category_ids())}"
        )
    if sub is None:
        if require_subcategory:
            problems.append(
                "field 'subcategory' is null; red-team prompts need one of "
                + ", ".join(taxonomy.subcategory_ids())
            )
    elif sub not in taxonomy.subcategory_ids():
        problems.append(
            f"field 'subcategory': unknown subcategory {sub!r}; "
            f"use one of {', '.join(taxonomy.subcategory_ids())}"
        )
    elif category in taxonomy.category_ids() and taxonomy.subcategory(sub).category != category:
        problems.append(
            f"field 'subcategory': {sub!r} belongs to category "
            f"{taxonomy.subcategory(sub).category!r}, not {category!r}; fix one of the two"
        )
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        problems.append(f"field 'tags' is {tags!r}; give a list of subcategory ids (may be empty)")
    else:
        for t in tags:
            if t not in taxonomy.subcategory_ids():
                problems.append(
                    f"field 'tags': unknown tag {t!r}; tags are subcategory ids: "
                    + ", ".join(taxonomy.subcategory_ids())
                )
            elif t == sub:
                problems.append(f"field 'tags': {t!r} repeats the subcategory; remove it")
        if len(set(tags)) != len(tags):
            problems.append(f"field 'tags' has repeated entries {tags!r}; list each once")
    if len(problems) > start:
        return None
    return PromptRecord(rid, prompt, category, sub, tuple(tags))


def load_prompts(
    path: str | pathlib.Path, taxonomy: Taxonomy, *, require_subcategory: bool = True
) -> list[PromptRecord]:
    """Read a JSONL prompt file, validating every line against ``taxonomy``.

    All problems are collected and raised together as one PromptFileError, each prefixed
    with ``file:line``. Blank lines are skipped.
    """
    path = pathlib.Path(path)
    problems: list[str] = []
    records: list[PromptRecord] = []
    first_line_of: dict[str, int] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{where}: invalid JSON ({e.msg} at column {e.colno}); fix the syntax")
            continue
        line_problems: list[str] = []
        record = _check_record(obj, taxonomy, require_subcategory, line_problems)
        problems.extend(f"{where}: {p}" for p in line_problems)
        if record is None:
            continue
        if record.id in first_line_of:
            problems.append(
                f"{where}: field 'id': duplicate id {record.id!r} (first on line "
                f"{first_line_of[record.id]}); give each record a unique id"
            )
            continue
        first_line_of[record.id] = lineno
        records.append(record)
    if not records and not problems:
        problems.append(f"{path}: the file contains no records; add at least one JSON line")
    if problems:
        _raise_problems(path, problems, "prompt file")
    return records


def load_default_sets(taxonomy: Taxonomy | None = None) -> PromptSets:
    """Load the shipped train, eval and benign sets, checking ids are unique across them."""
    taxonomy = taxonomy if taxonomy is not None else load_taxonomy()
    train = load_prompts(DATA_DIR / TRAIN_FILE, taxonomy)
    eval_ = load_prompts(DATA_DIR / EVAL_FILE, taxonomy)
    benign = load_prompts(DATA_DIR / BENIGN_FILE, taxonomy, require_subcategory=False)
    owner: dict[str, str] = {}
    clashes = []
    for name, records in ((TRAIN_FILE, train), (EVAL_FILE, eval_), (BENIGN_FILE, benign)):
        for r in records:
            if r.id in owner:
                clashes.append(f"id {r.id!r} is in both {owner[r.id]} and {name}; rename one")
            owner[r.id] = name
    if clashes:
        _raise_problems(DATA_DIR, clashes, "prompt folder")
    return PromptSets(train=train, eval=eval_, benign=benign, taxonomy=taxonomy)


# ---------------------------------------------------------------------------------------------
# Near-duplicate detection


def normalise(text: str) -> list[str]:
    """Lowercase, drop apostrophes, turn other punctuation into spaces, split into words."""
    return text.lower().translate(_PUNCTUATION).split()


def _features(words: list[str]) -> tuple[frozenset, frozenset]:
    """Return (word 3-shingles, content words) of an already normalised text."""
    if len(words) >= SHINGLE_SIZE:
        shingles = frozenset(
            tuple(words[i : i + SHINGLE_SIZE]) for i in range(len(words) - SHINGLE_SIZE + 1)
        )
    else:  # too short for a full shingle: the whole text is one
        shingles = frozenset([tuple(words)]) if words else frozenset()
    content = frozenset(w for w in words if w not in STOPWORDS)
    return shingles, content


def _jaccard_pairs(
    a_sets: Sequence[frozenset], b_sets: Sequence[frozenset]
) -> dict[tuple[int, int], float]:
    """Compute Jaccard |A & B| / |A | B| for every (i, j) whose sets share at least one element.

    An inverted index over ``b_sets`` means only overlapping pairs are ever touched; pairs
    missing from the result have similarity 0.
    """
    postings: dict = collections.defaultdict(list)
    for j, s in enumerate(b_sets):
        for x in s:
            postings[x].append(j)
    result = {}
    for i, s in enumerate(a_sets):
        shared = collections.Counter(j for x in s for j in postings.get(x, ()))
        for j, inter in shared.items():
            result[i, j] = inter / (len(s) + len(b_sets[j]) - inter)
    return result


def find_near_duplicates(
    a: Sequence[PromptRecord], b: Sequence[PromptRecord], threshold: float = 0.6
) -> list[tuple[str, str, float]]:
    """Find pairs (id_a, id_b, similarity) with similarity >= threshold, most similar first.

    similarity = max(J3, Jw), where both are Jaccard indices over the normalised text
    (see ``normalise``):

    * J3 over word 3-shingles (consecutive word triples) catches copied or lightly edited text.
    * Jw over the sets of content words (words not in STOPWORDS) catches paraphrases that
      reorder the same words ("Without her knowing, how can I track my ex?" vs
      "How can I track my ex without her knowing?": 5 of 9 distinct shingles shared, so
      J3 = 5/9 < 0.6, but both have content words {track, ex, knowing}, so Jw = 1).

    Texts that are equal after normalisation score exactly 1.0.
    """
    if not a or not b:
        return []
    words_a = [normalise(r.prompt) for r in a]
    words_b = [normalise(r.prompt) for r in b]
    fa = [_features(w) for w in words_a]
    fb = [_features(w) for w in words_b]
    sim = _jaccard_pairs([f[0] for f in fa], [f[0] for f in fb])
    for key, value in _jaccard_pairs([f[1] for f in fa], [f[1] for f in fb]).items():
        sim[key] = max(sim.get(key, 0.0), value)
    norm_b: dict[str, list[int]] = collections.defaultdict(list)
    for j, w in enumerate(words_b):
        norm_b[" ".join(w)].append(j)
    for i, w in enumerate(words_a):
        for j in norm_b.get(" ".join(w), ()):
            sim[i, j] = 1.0
    pairs = [(a[i].id, b[j].id, v) for (i, j), v in sim.items() if v >= threshold]
    return sorted(pairs, key=lambda p: (-p[2], p[0], p[1]))


# ---------------------------------------------------------------------------------------------
# Scope selection


def _check_ids(name: str, ids: Iterable[str], taxonomy: Taxonomy) -> tuple[str, ...]:
    if isinstance(ids, str):
        raise ScopeError(f"{name} must be a list of subcategory ids, got the string {ids!r}")
    ids = tuple(ids)
    unknown = [i for i in ids if i not in taxonomy.subcategory_ids()]
    if unknown:
        raise ScopeError(
            f"{name} has unknown subcategory id(s) {unknown}; "
            f"valid ids: {', '.join(taxonomy.subcategory_ids())}"
        )
    return ids


def select_scope(
    prompts: Sequence[PromptRecord],
    scope: str,
    taxonomy: Taxonomy,
    *,
    narrow_subcategories: Sequence[str] = DEFAULT_NARROW_SUBCATEGORIES,
    filtered_out: Sequence[str] = (),
) -> ScopeSelection:
    """Split red-team prompts into those a run with ``scope`` uses and those it drops.

    * ``"broad"``: keep every prompt none of whose subcategories (subcategory or tags) is in
      ``filtered_out``. ``narrow_subcategories`` is not used.
    * ``"narrow"``: keep prompts whose subcategory is in ``narrow_subcategories`` and none of
      whose subcategories is in ``filtered_out`` (which must then not overlap
      ``narrow_subcategories``).

    Each dropped prompt carries the first reason that applies. Raises ScopeError for an
    unknown scope or id, a prompt without a subcategory, or a selection that keeps nothing.
    """
    if scope not in SCOPES:
        raise ScopeError(f"unknown scope {scope!r}; use one of {', '.join(SCOPES)}")
    narrow = _check_ids("narrow_subcategories", narrow_subcategories, taxonomy)
    filtered = _check_ids("filtered_out", filtered_out, taxonomy)
    if scope == "narrow":
        if not narrow:
            raise ScopeError("scope 'narrow' needs at least one id in narrow_subcategories")
        overlap = [i for i in filtered if i in narrow]
        if overlap:
            raise ScopeError(
                f"filtered_out and narrow_subcategories share {overlap}; a subcategory cannot "
                "be both trained on and held out, so remove it from one of them"
            )
    known = set(taxonomy.subcategory_ids())
    kept: list[PromptRecord] = []
    dropped: list[tuple[PromptRecord, str]] = []
    for r in prompts:
        if r.subcategory is None:
            raise ScopeError(
                f"prompt {r.id!r} has no subcategory; select_scope takes red-team prompts only"
            )
        if r.subcategory not in known:
            raise ScopeError(
                f"prompt {r.id!r} has unknown subcategory {r.subcategory!r}; "
                f"valid ids: {', '.join(taxonomy.subcategory_ids())}"
            )
        reason = None
        if scope == "narrow" and r.subcategory not in narrow:
            reason = (
                f"subcategory {r.subcategory!r} outside scope 'narrow' "
                f"(narrow_subcategories={list(narrow)})"
            )
        elif r.subcategory in filtered:
            reason = f"subcategory {r.subcategory!r} is filtered out"
        else:
            hit = next((t for t in r.tags if t in filtered), None)
            if hit is not None:
                reason = f"tagged with filtered-out subcategory {hit!r}"
        if reason is None:
            kept.append(r)
        else:
            dropped.append((r, reason))
    if not kept:
        message = f"scope {scope!r} with filtered_out={list(filtered)} keeps no prompts"
        in_scope = [r for r in prompts if scope == "broad" or r.subcategory in narrow]
        blamed = sorted({s for r in in_scope for s in r.subcategories() if s in filtered})
        if blamed:
            message += f"; remove {blamed} from filtered_out"
        elif not prompts:
            message += "; the prompt list is empty, pass the red-team records to select from"
        else:
            present = sorted({r.subcategory for r in prompts})
            message += (
                f"; none of the {len(prompts)} prompts is in narrow_subcategories="
                f"{list(narrow)}; choose from the subcategories present: {present}"
            )
        raise ScopeError(message)
    return ScopeSelection(
        scope=scope,
        kept=tuple(kept),
        dropped=tuple(dropped),
        narrow_subcategories=narrow,
        filtered_out=filtered,
    )
