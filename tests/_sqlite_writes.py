"""Counts a database's write transactions: what the per-layer write test and the bookkeeping
benchmark (``benchmarks/trial_overhead.py``) both measure."""

from __future__ import annotations

__all__ = ["count_write_transactions"]


def count_write_transactions(engine: object) -> list[int]:
    """A list that grows by one at each commit of ``engine`` (SQLAlchemy) that wrote something."""
    from sqlalchemy import event

    wrote: list[int] = []
    writing = [False]

    def statement(conn: object, cursor: object, text: str, *args: object) -> None:
        writing[0] |= text.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE"))

    def commit(conn: object) -> None:
        wrote.extend([1] if writing[0] else [])
        writing[0] = False

    event.listen(engine, "before_cursor_execute", statement)
    event.listen(engine, "commit", commit)
    return wrote
