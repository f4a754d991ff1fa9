"""The metrics log: one CSV row per update (RUN/metrics.csv), drawn as RUN/metrics.png."""

from __future__ import annotations

import csv
from pathlib import Path

from ldm_cli.common.files import atomic_write, no_space_is_an_error


class MetricsLog:
    """Appends one CSV row per update; on resume, drops rows after the resumed step."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        self.columns: list[str] | None = None
        if resume_step is not None and path.is_file():
            with path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
            if rows:
                self.columns = list(rows[0].keys())
            self._rewrite(rows)
        elif path.exists():
            path.unlink()

    def _rewrite(self, rows: list[dict]) -> None:
        with atomic_write(self.path) as tmp, tmp.open("w", newline="") as f:
            if self.columns:
                writer = csv.DictWriter(f, fieldnames=self.columns)
                writer.writeheader()
                writer.writerows(rows)

    def append(self, row: dict[str, float]) -> None:
        new = self.columns is None
        if new:
            self.columns = list(row.keys())
        with no_space_is_an_error(self.path), self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
