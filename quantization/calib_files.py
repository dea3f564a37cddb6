"""Calibration text files (--calib_dataset): which formats are read and how (torch-free)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from trtbuild.errors import TrtbuildError

CALIB_SUFFIXES = (".txt", ".json", ".jsonl", ".parquet")


def _pick_field(record: dict, path: Path) -> str:
    if isinstance(record.get("text"), str):
        return "text"
    strings = [(len(v), k) for k, v in record.items() if isinstance(v, str)]
    if not strings:
        raise TrtbuildError(f"--calib_dataset {path}: records have no string field (expected a 'text' field)")
    return max(strings, key=lambda t: t[0])[1]


def _texts_from_records(records: Sequence, path: Path) -> list[str]:
    if not records:
        return []
    if all(isinstance(r, str) for r in records):
        return list(records)
    if not all(isinstance(r, dict) for r in records):
        raise TrtbuildError(f"--calib_dataset {path}: expected a list of strings or of JSON objects")
    key = _pick_field(records[0], path)
    return [r[key] for r in records if isinstance(r.get(key), str)]


def check_calib_path(path: str | os.PathLike) -> Path:
    """The calibration file exists and has a known format (cheap; reading it may find it empty)."""
    p = Path(path)
    if not p.is_file():
        raise TrtbuildError(f"--calib_dataset {p}: no such file (give a local .txt, .json, .jsonl or .parquet file)")
    if p.suffix.lower() not in CALIB_SUFFIXES:
        raise TrtbuildError(f"--calib_dataset {p}: unknown format {p.suffix.lower()!r} (use {', '.join(CALIB_SUFFIXES)})")
    return p


def read_calib_texts(path: str | os.PathLike) -> list[str]:
    """The documents of a local calibration file; TrtbuildError naming the file if missing or empty."""
    p = check_calib_path(path)
    suffix = p.suffix.lower()
    try:
        if suffix == ".txt":
            texts = [p.read_text(encoding="utf-8", errors="replace")]
        elif suffix == ".jsonl":
            records = []
            with open(p, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            records.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise TrtbuildError(f"--calib_dataset {p}: line {n} is not JSON ({e})") from None
            texts = _texts_from_records(records, p)
        elif suffix == ".json":
            try:
                data = json.loads(p.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise TrtbuildError(f"--calib_dataset {p}: not valid JSON ({e})") from None
            if isinstance(data, dict):
                lists = {k: v for k, v in data.items() if isinstance(v, list)}
                if "text" in lists:
                    data = lists["text"]
                elif len(lists) == 1:
                    data = next(iter(lists.values()))
                elif lists and len({len(v) for v in lists.values()}) == 1:  # columns
                    n = len(next(iter(lists.values())))
                    data = [{k: v[i] for k, v in lists.items()} for i in range(n)]
                else:
                    raise TrtbuildError(f"--calib_dataset {p}: expected a list of records or a 'text' list")
            if not isinstance(data, list):
                raise TrtbuildError(f"--calib_dataset {p}: expected a list of records or a 'text' list")
            texts = _texts_from_records(data, p)
        else:
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise TrtbuildError(f"--calib_dataset {p}: reading parquet needs pyarrow "
                                    "(pip install 'trtbuild[eval]')") from None
            try:
                table = pq.read_table(p)
            except Exception as e:  # pyarrow raises several types for corrupt files
                raise TrtbuildError(f"--calib_dataset {p}: cannot read parquet ({e})") from None
            texts = _texts_from_records(table.to_pylist(), p)
    except UnicodeDecodeError as e:
        raise TrtbuildError(f"--calib_dataset {p}: not UTF-8 text ({e})") from None
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise TrtbuildError(f"--calib_dataset {p}: holds no text to calibrate on")
    return texts
