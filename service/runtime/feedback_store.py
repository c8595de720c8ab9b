"""Operator feedback rows in a database: SQLite by default, any SQLAlchemy URL for a server DB.

SQLAlchemy Core, one table. `DAPO_FEEDBACK_DB` is either a URL (`postgresql+psycopg://...`,
`sqlite:////var/lib/dapo/feedback.db`) or a plain file path, read as SQLite. The pair
(answer_id, image_index) is unique (an index the database enforces), so a second verdict on the
same image is refused by the database itself, whichever process or replica wrote the first:
SQLite for one node, PostgreSQL for a fleet. `answer_id` is the server's id of the answer
(never reused); `request_id` is the caller's correlation id, kept for reference.

A table made before answer ids existed is upgraded in place at start (the column and the
unique index are added; its old (request_id, image_index) constraint stays).

No FastAPI here: `dapo calibrate --feedback DB` reads the same table through this module.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import (Boolean, Column, DateTime, Float, Index, Integer, MetaData, String, Table, create_engine,
                        inspect, insert, select, text, update)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

metadata = MetaData()
feedback_table = Table(
    "feedback", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("request_id", String(128), nullable=False),
    Column("answer_id", String(64)),  # NULL only in rows from before answer ids
    Column("image_index", Integer, nullable=False),
    Column("verdict", String(32), nullable=False),  # correct | false_positive | false_negative | wrong_type
    Column("label", String(64), nullable=False),  # the truth it implies: "good" or a defect type
    Column("defect_type", String(64)),
    Column("note", String(1000)),
    Column("product", String(256)),
    Column("part_id", String(256)),
    Column("station_id", String(256)),
    Column("recipe_id", String(256)),
    Column("filename", String(255)),
    Column("model_name", String(256)),
    Column("model_version", String(64)),
    Column("anomaly_score", Float),
    Column("threshold", Float),
    Column("is_anomalous", Boolean),
    Column("predicted_type", String(64)),
    Column("sample_path", String(1024)),  # the labelled image on disk (absolute), when written
    Column("principal", String(32)),  # who said so: the API key's tag (service.server.security)
)
one_verdict_per_image = Index("uq_feedback_answer_image", feedback_table.c.answer_id, feedback_table.c.image_index,
                              unique=True)


class DuplicateFeedback(ValueError):
    """This image of this request already has feedback."""


@dataclass
class FeedbackRecord:
    request_id: str
    image_index: int
    verdict: str
    label: str
    answer_id: str | None = None
    defect_type: str | None = None
    note: str | None = None
    product: str | None = None
    part_id: str | None = None
    station_id: str | None = None
    recipe_id: str | None = None
    filename: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    anomaly_score: float | None = None
    threshold: float | None = None
    is_anomalous: bool | None = None
    predicted_type: str | None = None
    sample_path: str | None = None
    principal: str | None = None
    created_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    id: int | None = None


def database_url(value: str) -> str:
    """A URL as given; a file path becomes an absolute SQLite URL (its folder is created)."""
    if "://" in value:
        return value
    path = Path(value).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def upgrade(engine: Engine) -> None:
    """Bring a table from before answer ids up to date (idempotent; a no-op on a new table)."""
    columns = {c["name"] for c in inspect(engine).get_columns("feedback")}
    if "answer_id" not in columns:
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE feedback ADD COLUMN answer_id VARCHAR(64)"))
    one_verdict_per_image.create(engine, checkfirst=True)


class FeedbackStore:
    def __init__(self, url_or_path: str):
        self.url = database_url(url_or_path)
        self.engine: Engine = create_engine(self.url, pool_pre_ping=True)
        metadata.create_all(self.engine)
        upgrade(self.engine)

    def add(self, record: FeedbackRecord) -> int:
        """Insert; the new row's id. DuplicateFeedback when the image already has feedback."""
        values = {k: v for k, v in asdict(record).items() if k != "id"}
        try:
            with self.engine.begin() as conn:
                return int(conn.execute(insert(feedback_table).values(**values)).inserted_primary_key[0])
        except IntegrityError as e:
            raise DuplicateFeedback(f"{record.request_id}:{record.image_index}") from e

    def set_sample(self, row_id: int, path: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(feedback_table).where(feedback_table.c.id == row_id).values(sample_path=path))

    def records(self) -> list[FeedbackRecord]:
        """Every row, oldest first."""
        names = [f.name for f in fields(FeedbackRecord)]
        with self.engine.connect() as conn:
            rows = conn.execute(select(feedback_table).order_by(feedback_table.c.id)).mappings().all()
        return [FeedbackRecord(**{n: row[n] for n in names}) for row in rows]

    def close(self) -> None:
        self.engine.dispose()
