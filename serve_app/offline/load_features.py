"""``serve-app load-features``: copy entity features into Redis, checked against the schema.

::

    serve-app load-features --to redis://HOST:6379/0 --from var/features.db   # or .parquet / .csv

* **Validated** against the model's feature schema (``serve_app/scoring/features.py``):
  the input must have ``entity_id`` and every entity feature column; numeric features
  must be finite numbers (or empty), categorical ones one of the known values (or
  empty). A row that breaks a rule is refused, and the command says which row and why;
  the other rows are loaded. Unknown extra columns are ignored, and named.
* **Idempotent**: each row is one ``SET`` of its key (the layout is in
  ``serve_app/stores/redis.py``), so loading the same file twice gives the same store, and
  a re-run after an interruption finishes the job. Rows go in pipelined batches.
* A progress bar (tqdm) on stderr; exit status 0 when every row loaded, 1 when some rows
  were refused, 2 when the input cannot be used at all.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from serve_app.config import expand_env
from serve_app.errors import ConfigError
from serve_app.scoring.features import CATEGORIES, ENTITY_CATEGORICAL, ENTITY_FEATURES
from serve_app.scoring.items import ENTITY_ID_MAX_LENGTH, ENTITY_ID_PATTERN
from serve_app.stores.redis import META_KEY, RESERVED_ID, feature_key

REQUIRED = ("entity_id", *ENTITY_FEATURES)
_ENTITY_ID = re.compile(ENTITY_ID_PATTERN.strip("^$"))  # used with fullmatch


@dataclass
class Refusal:
    row: int  # 1-based position in the input (header not counted)
    entity_id: str | None
    reason: str


@dataclass
class LoadReport:
    loaded: int = 0
    refused: list[Refusal] = field(default_factory=list)
    ignored_columns: list[str] = field(default_factory=list)
    seconds: float = 0.0


def read_input(source: Path, kind: str = "auto") -> pd.DataFrame:
    """The input as a frame of raw values: a SQLite store, a Parquet file or a CSV file."""
    if not source.is_file():
        raise ConfigError(f"input not found: {source}")
    kind = _kind(source) if kind == "auto" else kind
    if kind not in ("sqlite", "parquet", "csv"):
        raise ConfigError(f"unknown input kind {kind!r}: sqlite, parquet or csv")
    try:
        return _read(source, kind)
    except Exception as exc:  # pandas, pyarrow and sqlite3 each raise their own kinds
        raise ConfigError(
            f"cannot read {source} as {kind}: {type(exc).__name__}: {str(exc)[:300]}"
        ) from exc


def _read(source: Path, kind: str) -> pd.DataFrame:
    if kind == "sqlite":
        with sqlite3.connect(f"file:{source}?mode=ro", uri=True) as db:
            return pd.read_sql_query("SELECT * FROM entities", db)
    if kind == "parquet":
        return pd.read_parquet(source)
    # CSV: everything as text, the validator decides what is a number; UTF-8 only
    return pd.read_csv(source, dtype=str, keep_default_na=False, encoding="utf-8")


def _kind(source: Path) -> str:
    suffix = source.suffix.lower()
    if suffix in (".db", ".sqlite", ".sqlite3"):
        return "sqlite"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix == ".csv":
        return "csv"
    raise ConfigError(f"cannot tell the format of {source.name}; pass --format")


def check_columns(frame: pd.DataFrame) -> list[str]:
    """The extra columns (ignored); ConfigError when a required column is missing."""
    missing = [name for name in REQUIRED if name not in frame.columns]
    if missing:
        raise ConfigError(
            f"input lacks the columns {missing}; the model's feature schema needs {list(REQUIRED)}"
        )
    return [str(name) for name in frame.columns if name not in REQUIRED]


def _missing(value: Any) -> bool:
    if value is None or value is pd.NA:
        return True
    return (isinstance(value, str) and value == "") or (
        isinstance(value, float) and math.isnan(value)
    )


def _number(name: str, value: Any) -> float | None:
    if _missing(value):
        return None
    if isinstance(value, bool):
        raise ValueError(f"{name}: {value!r} is a boolean, not a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: {value!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{name}: {value!r} is not finite")
    return number


def _category(name: str, value: Any) -> str | None:
    if _missing(value):
        return None
    if value not in CATEGORIES[name]:
        raise ValueError(f"{name}: {value!r} is not one of {', '.join(CATEGORIES[name])}")
    return str(value)


def validate_row(raw: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(entity_id, the stored row) or ValueError saying what is wrong with the row."""
    entity = raw.get("entity_id")
    if _missing(entity) or not isinstance(entity, str) or not entity.strip():
        raise ValueError(f"entity_id: {entity!r} is not a non-empty string")
    if len(entity) > ENTITY_ID_MAX_LENGTH:
        raise ValueError(f"entity_id: longer than {ENTITY_ID_MAX_LENGTH} characters")
    if not _ENTITY_ID.fullmatch(entity):
        raise ValueError(
            f"entity_id: {entity!r} has characters the API refuses (letters, digits, "
            "'_', '.', ':' and '-' only): it could never be looked up"
        )
    if entity == RESERVED_ID:
        raise ValueError(f"entity_id: {RESERVED_ID!r} is reserved (the store's metadata key)")
    row = {
        name: _category(name, raw[name]) if name in ENTITY_CATEGORICAL else _number(name, raw[name])
        for name in ENTITY_FEATURES
    }
    return entity, row


def valid_rows(frame: pd.DataFrame, report: LoadReport) -> Iterator[tuple[str, dict[str, Any]]]:
    """Rows that pass :func:`validate_row`; the others are recorded in ``report``."""
    seen: dict[str, int] = {}
    columns = list(REQUIRED)
    for position, values in enumerate(frame[columns].itertuples(index=False, name=None), 1):
        raw = dict(zip(columns, values, strict=True))
        try:
            entity, row = validate_row(raw)
        except ValueError as exc:
            entity_id = raw["entity_id"] if isinstance(raw["entity_id"], str) else None
            report.refused.append(Refusal(position, entity_id, str(exc)))
            continue
        if entity in seen:
            report.refused.append(
                Refusal(position, entity, f"duplicate entity_id (first at row {seen[entity]})")
            )
            continue
        seen[entity] = position
        yield entity, row


def load_into_redis(
    frame: pd.DataFrame, url: str, batch_size: int = 5_000, progress: bool = True
) -> LoadReport:
    """Validate ``frame`` and ``SET`` every valid row under its key, in pipelined batches."""
    import redis
    from tqdm import tqdm

    report = LoadReport(ignored_columns=check_columns(frame))
    started = time.perf_counter()
    try:
        client = redis.Redis.from_url(expand_env(url), socket_connect_timeout=5)
    except ValueError as exc:  # an unset ${VAR}, a URL redis-py cannot read
        raise ConfigError(f"--to {_redact(url)}: {exc}") from None
    try:
        client.ping()
        batch: dict[str, str] = {}
        with tqdm(
            total=len(frame), unit="row", disable=not progress, file=sys.stderr, desc="load"
        ) as bar:
            for entity, row in valid_rows(frame, report):
                batch[feature_key(entity)] = json.dumps(row, separators=(",", ":"))
                if len(batch) >= batch_size:
                    client.mset(batch)
                    report.loaded += len(batch)
                    bar.update(len(batch))
                    batch = {}
            if batch:
                client.mset(batch)
                report.loaded += len(batch)
            bar.update(len(frame) - bar.n)
        meta = {"columns": list(ENTITY_FEATURES), "rows": report.loaded, "loaded_at": time.time()}
        client.set(META_KEY, json.dumps(meta))
    except redis.RedisError as exc:  # unreachable, refused our password, went away mid-way
        raise ConfigError(
            f"redis at {_redact(url)}: {type(exc).__name__}: {exc} ({report.loaded} rows "
            "loaded before it; loading again sets the same keys)"
        ) from None
    finally:
        client.close()
    report.seconds = time.perf_counter() - started
    return report


def describe(report: LoadReport, destination: str, show: int = 20) -> str:
    """A human summary: how many rows loaded, and which rows were refused and why."""
    lines = [
        f"loaded {report.loaded} rows into {_redact(destination)} in {report.seconds:.1f}s; "
        f"refused {len(report.refused)}"
    ]
    if report.ignored_columns:
        lines.append(f"ignored columns not in the feature schema: {report.ignored_columns}")
    for refusal in report.refused[:show]:
        lines.append(f"  row {refusal.row} ({refusal.entity_id!r}): {refusal.reason}")
    if len(report.refused) > show:
        lines.append(f"  ... and {len(report.refused) - show} more (see --rejects)")
    return "\n".join(lines)


def write_rejects(report: LoadReport, path: Path) -> None:
    """Every refused row as CSV: row, entity_id, reason."""
    pd.DataFrame(
        [(r.row, r.entity_id, r.reason) for r in report.refused],
        columns=["row", "entity_id", "reason"],
    ).to_csv(path, index=False)


def _redact(url: str) -> str:
    """The URL without a password, for printing."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return scheme + sep + rest
