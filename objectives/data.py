"""Task data through ``datasets``: one loader for every shape users keep data in.

A task's ``data`` path may be
- a ``save_to_disk`` folder of a ``DatasetDict`` (splits by name),
- a folder holding ``<split>.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` files,
- a single JSONL / JSON / CSV / parquet file with a ``split`` column.
Examples come back as plain dicts: metrics never depend on the storage format.
"""

from __future__ import annotations

from pathlib import Path

from optimizer.errors import DataError

__all__ = ["SUFFIXES", "load_rows", "load_split"]

#: File suffix → ``datasets`` builder name.
SUFFIXES: dict[str, str] = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def _load_file(path: Path) -> list[dict]:
    import datasets
    from datasets import load_dataset

    datasets.disable_progress_bars()  # a progress bar per split file is noise in a study log
    builder = SUFFIXES.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"{path}: unsupported data format {path.suffix!r}; use one of {', '.join(SUFFIXES)}")
    if builder != "parquet" and path.stat().st_size < 65536 and not path.read_bytes().strip():
        return []  # an empty text file is an empty split (datasets cannot infer its schema)
    try:
        ds = load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:  # datasets raises many types for unreadable files
        raise DataError(f"{path}: cannot read as {builder} ({type(exc).__name__}: {exc})") from None
    return ds.to_list()


def load_rows(path: Path) -> list[dict]:
    """Every row of one data file, whatever its split column says (e.g. a calibration file)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist; check the path")
    rows = _load_file(path)
    if not rows:
        raise DataError(f"{path}: the file holds no rows")
    return rows


def _split_file(folder: Path, split: str) -> Path | None:
    for suffix in SUFFIXES:
        candidate = folder / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def load_split(path: Path, split: str) -> list[dict]:
    """All examples of one split, or a DataError that says what is missing and how to fix it."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data path {str(path)!r} does not exist; check the objective's 'data' entry")
    if path.is_dir() and (path / "dataset_dict.json").is_file():
        from datasets import load_from_disk

        dd = load_from_disk(str(path))
        if split not in dd:
            raise DataError(f"{path}: no split {split!r} in the saved dataset (it has: {', '.join(dd)})")
        rows = dd[split].to_list()
    elif path.is_dir():
        file = _split_file(path, split)
        if file is None:
            found = sorted(p.name for p in path.iterdir() if p.suffix.lower() in SUFFIXES)
            raise DataError(
                f"{path}: no file for split {split!r} (expected {split}.jsonl, .csv or .parquet;"
                f" found: {', '.join(found) or 'nothing'})"
            )
        rows = _load_file(file)
    else:
        rows = _load_file(path)
        if rows and "split" not in rows[0]:
            raise DataError(
                f"{path}: a single data file needs a 'split' column naming {split!r} for each row,"
                " or put each split in its own file in a folder"
            )
        rows = [r for r in rows if r.get("split") == split]
    if not rows:
        raise DataError(f"{path}: split {split!r} is empty; the objective needs at least one example")
    return rows
