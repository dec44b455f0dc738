"""``[ledger]`` in weir.toml: where usage rows go and the bounds on holding them."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr


class LedgerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    # postgresql://user@host/db (every gateway writes there); unset: SQLite at ``path``
    url: SecretStr | None = None
    path: Path = Path("~/.local/share/weir/ledger.db")
    # rows the database could not take yet, in files of this directory (one per process),
    # written again when it is back and at the next start
    spill_dir: Path = Path("~/.local/share/weir/ledger-spill")
    batch_rows: int = Field(1000, ge=1, le=100_000)  # rows per INSERT batch
    flush_interval_s: float = Field(0.5, gt=0, le=60)  # a row waits at most this long
    buffer_rows: int = Field(20_000, ge=100)  # rows held in memory; beyond: spilled to disk
    retry_s: float = Field(2.0, gt=0)  # after a failed write, try the database again after
    timeout_s: float = Field(5.0, gt=0)  # connect and statement timeout

    def database_url(self) -> str:
        """The SQLAlchemy URL: PostgreSQL through psycopg 3, or the SQLite file."""
        if self.url is not None:
            url = self.url.get_secret_value()
            for scheme in ("postgresql://", "postgres://"):
                if url.startswith(scheme):
                    return "postgresql+psycopg://" + url[len(scheme) :]
            return url
        return f"sqlite:///{self.path.expanduser()}"
