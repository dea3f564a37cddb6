"""cnn_dailymail-shaped summarization records (`article`, `highlights`, `id`) from local files.

Read from one file (--dataset_file) or from every .json / .jsonl / .parquet / .csv file under a
dir (--dataset_dir) that has those fields. Nothing is fetched from a hub.
"""

from __future__ import annotations

import csv
import json
import logging
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from trtbuild.errors import TrtbuildError

log = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
EXPECTED = ("expected cnn_dailymail-shaped records: string fields 'article' (the text to summarize) and "
            "'highlights' (the reference summary), plus 'id', as JSON lines (.jsonl), a JSON list (.json), "
            "parquet or CSV with a header row")


@dataclass
class Record:
    id: str
    article: str
    highlights: str


def _read_json_rows(path: Path) -> list:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TrtbuildError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); {EXPECTED}") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # datasets' to_json writes JSON lines under a .json name: try that below
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            return data["data"]
        if isinstance(data, list):
            return data
        if data is not None:
            raise TrtbuildError(f"{path} holds a JSON {type(data).__name__}, not a list of records; {EXPECTED}")
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise TrtbuildError(f"{path} line {n} is not valid JSON ({e.msg}, column {e.colno}); {EXPECTED}") from None
    return rows


def _read_parquet_rows(path: Path) -> list:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise TrtbuildError(f"reading {path} needs pyarrow: pip install 'trtbuild[eval]'") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for damaged files
        raise TrtbuildError(f"{path} is not a readable parquet file ({str(e).splitlines()[0]}); {EXPECTED}") from None


def _read_csv_rows(path: Path) -> list:
    csv.field_size_limit(sys.maxsize)  # articles are longer than csv's default 128 KiB field limit
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise TrtbuildError(f"{path} is not a readable CSV file ({e}); {EXPECTED}") from None


def read_rows(path: Path) -> list:
    if path.suffix == ".parquet":
        return _read_parquet_rows(path)
    if path.suffix == ".csv":
        return _read_csv_rows(path)
    return _read_json_rows(path)


def has_fields(rows: list) -> bool:
    return bool(rows) and isinstance(rows[0], dict) and "article" in rows[0] and "highlights" in rows[0]


def to_records(path: Path, rows: list) -> list[Record]:
    """Validate every row; rows with an empty article or reference are skipped with a warning."""
    records, empty = [], 0
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise TrtbuildError(f"{path} record {i} is a {type(row).__name__}, not an object; {EXPECTED}")
        for key in ("article", "highlights"):
            if key not in row:
                raise TrtbuildError(f"{path} record {i} has no '{key}' field (it has {sorted(row)[:8]}); {EXPECTED}")
            if not isinstance(row[key], str):
                raise TrtbuildError(f"{path} record {i}: '{key}' is a {type(row[key]).__name__}, not a string; "
                                    f"{EXPECTED}")
        if not row["article"].strip() or not row["highlights"].strip():
            empty += 1
            continue
        rid = row.get("id")
        records.append(Record(str(rid) if rid not in (None, "") else f"{path.stem}:{i}", row["article"],
                              row["highlights"]))
    if empty:
        log.warning("%s: skipped %d records with an empty article or highlights", path, empty)
    return records


def load_records(dataset_dir: str | Path | None = None, dataset_file: str | Path | None = None) -> list[Record]:
    """Every record of --dataset_file, or of the files under --dataset_dir that have the fields."""
    if (dataset_dir is None) == (dataset_file is None):
        raise TrtbuildError("pass one of --dataset_dir DIR or --dataset_file FILE (nothing is downloaded); "
                            + EXPECTED)
    if dataset_file is not None:
        path = Path(dataset_file)
        if not path.is_file():
            raise TrtbuildError(f"--dataset_file {path} not found")
        if path.suffix not in SUFFIXES:
            raise TrtbuildError(f"--dataset_file {path}: unknown format {path.suffix!r}; {EXPECTED}")
        rows = read_rows(path)
        if not rows:
            raise TrtbuildError(f"--dataset_file {path} is empty; {EXPECTED}")
        records = to_records(path, rows)
    else:
        root = Path(dataset_dir)
        if not root.is_dir():
            raise TrtbuildError(f"--dataset_dir {root} not found")
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        if not files:
            raise TrtbuildError(f"--dataset_dir {root} has no .json, .jsonl, .parquet or .csv files; {EXPECTED}")
        records = []
        for path in files:
            rows = read_rows(path)
            if not has_fields(rows):
                log.info("%s: no 'article'/'highlights' records, skipped", path)
                continue
            records.extend(to_records(path, rows))
    if not records:
        where = f"--dataset_file {dataset_file}" if dataset_file is not None else f"--dataset_dir {dataset_dir}"
        raise TrtbuildError(f"{where} has no usable records; {EXPECTED}")
    return records


def select(records: list[Record], random_seed: int, count: int | None) -> list[Record]:
    """Shuffle with --random_seed (the same seed gives the same order), then take `count`."""
    records = list(records)
    random.Random(random_seed).shuffle(records)
    return records[:count] if count is not None else records
