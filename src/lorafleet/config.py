"""Typed settings, read from the environment once at start-up and passed down as arguments.

Nothing below this module reads environment variables.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Paths:
    """Where lorafleet keeps its files.

    Args:
        home: the lorafleet home folder (`LORAFLEET_HOME`, default `~/.lorafleet`); holds the
            converted base models, the SQLite catalog and the local blob store.
        database_url: SQLAlchemy URL of the catalog (`LORAFLEET_DATABASE_URL`); default SQLite
            in `home/catalog.db`. PostgreSQL: `postgresql+psycopg://user@host/db`.
        store_url: blob store location (`LORAFLEET_STORE_URL`): a local folder (default
            `home/store`) or an fsspec URL such as `s3://bucket/prefix`.
    """

    home: Path
    database_url: str
    store_url: str

    @property
    def models_dir(self) -> Path:
        """Converted base models (safetensors + tokenizer), one folder per source digest."""
        return self.home / "models"


def paths_from_env(env: dict[str, str] | None = None) -> Paths:
    env = dict(os.environ) if env is None else env
    home = Path(env.get("LORAFLEET_HOME") or Path.home() / ".lorafleet").expanduser()
    return Paths(
        home=home,
        database_url=env.get("LORAFLEET_DATABASE_URL") or f"sqlite:///{home / 'catalog.db'}",
        store_url=env.get("LORAFLEET_STORE_URL") or str(home / "store"),
    )
