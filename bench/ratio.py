"""Throughput rows: Postdesk's figure next to a baseline measured in the same run, and the ratio."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Row:
    name: str
    value: float
    baseline: float
    target_ratio: float

    @property
    def ratio(self) -> float:
        return self.value / self.baseline if self.baseline else 0.0

    @property
    def passed(self) -> bool:
        return self.ratio >= self.target_ratio


def print_table(title: str, rows: list[Row]) -> bool:
    print(f"\n{title}")
    print(f"{'measurement':<52} {'Postdesk':>10} {'baseline':>10} {'ratio':>7} {'target':>8}  result")
    for row in rows:
        print(
            f"{row.name:<52} {row.value:>10.1f} {row.baseline:>10.1f} {row.ratio:>7.2f} "
            f"{'>= ' + str(row.target_ratio):>8}  {'ok' if row.passed else 'BELOW TARGET'}"
        )
    return all(row.passed for row in rows)
