"""The gallery: generated images in SQLite, searchable by prompt text (FTS5), model and date."""

from __future__ import annotations

import json
import re

from ..errors import UserError
from .db import Database

_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_ISO = re.compile(r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?Z?)?$")


def fts_query(text: str) -> str | None:
    """User text -> an FTS5 query matching every word (each quoted, so FTS5 syntax cannot be injected)."""
    words = re.findall(r"\w+", text, flags=re.UNICODE)
    return " AND ".join('"' + w.replace('"', '""') + '"' for w in words[:32]) or None


def image_record(row) -> dict:
    d = dict(row)
    d["params"] = json.loads(d["params"])
    d["url"] = f"/outputs/{d['path']}"
    d.pop("state", None)
    return d


def _check_date(value: str | None, name: str, pattern: re.Pattern) -> None:
    if value is not None and not pattern.match(value):
        raise UserError(f"{name} must be a date like 2026-01-31 (or a UTC time like 2026-01-31T12:00:00Z), "
                        f"got {value!r}", field=name)


def search(db: Database, *, q: str | None = None, model: str | None = None, date: str | None = None,
           since: str | None = None, until: str | None = None, limit: int = 50, offset: int = 0) -> dict:
    """Finished images, newest first. `date` is one UTC day (YYYY-MM-DD); since/until bound created_at."""
    _check_date(date, "date", _DATE)
    _check_date(since, "since", _ISO)
    _check_date(until, "until", _ISO)
    where, args = ["i.state = 'done'"], []
    match = fts_query(q) if q else None
    if q and match is None:
        return {"total": 0, "items": []}
    if match:
        where.append("i.id IN (SELECT rowid FROM images_fts WHERE images_fts MATCH ?)")
        args.append(match)
    if model:
        where.append("(i.model_name = ? OR i.model_hash = ? OR i.model_name LIKE ?)")
        args += [model, model.lower()[:10], f"%{model}%"]
    if date:
        where.append("substr(i.created_at, 1, 10) = ?")
        args.append(date)
    if since:
        where.append("i.created_at >= ?")
        args.append(since)
    if until:
        where.append("i.created_at <= ?" if len(until) > 10 else "substr(i.created_at, 1, 10) <= ?")
        args.append(until)
    sql = " WHERE " + " AND ".join(where)
    conn = db.conn()
    total = conn.execute("SELECT COUNT(*) FROM images i" + sql, args).fetchone()[0]
    rows = conn.execute("SELECT * FROM images i" + sql + " ORDER BY i.id DESC LIMIT ? OFFSET ?",
                        (*args, limit, offset)).fetchall()
    return {"total": total, "items": [image_record(r) for r in rows]}


def get_image(db: Database, image_id: int) -> dict | None:
    row = db.conn().execute("SELECT * FROM images WHERE id = ? AND state = 'done'", (image_id,)).fetchone()
    return image_record(row) if row else None
