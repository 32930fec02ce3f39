"""What ``cldlr validate`` found: one :class:`Problem` per issue, gathered in a :class:`ValidationReport`.

Kept apart from the checks (:mod:`cldlr.common.data.validation`) so that whoever only reads or
prints a report (the CLI, the ClientApp's handshake, ``read_site``'s error) needs none of them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Severity = Literal["error", "warning"]
#: What a labelled, valid folder serves; an unlabelled one serves only the first.
LABELLED_COMMANDS = ("predict", "study", "evaluate", "reader-study")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a site: where it is, what it is and how to fix it."""

    code: str
    severity: Severity
    message: str
    fix: str
    file: str | None = None
    row: int | None = None  # 1-based CSV line: header is line 1, first data row line 2
    column: str | None = None

    @property
    def where(self) -> str:
        """``clinical.csv, line 5, column 'age'`` — the place a person has to look at."""
        parts = (self.file, self.row and f"line {self.row}", self.column and f"column {self.column!r}")
        return ", ".join(p for p in parts if p) or "site"

    def format(self) -> str:
        """One line for the console: severity, place, message, code and the fix."""
        return f"{self.severity.upper():<7} {self.where}: {self.message} [{self.code}] -> fix: {self.fix}"


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


@dataclass
class ValidationReport:
    """Every problem found in one site, plus its size; ``ok`` when there is no error."""

    site: str
    problems: list[Problem] = field(default_factory=list)
    n_rows: int = 0
    n_patients: int = 0
    n_unlabelled: int = 0  # rows without a label: the folder serves predict only
    predict_only: list[str] = field(default_factory=list)  # why studies cannot use it (purpose any/predict)

    @property
    def errors(self) -> list[Problem]:
        """The problems that keep the site out of a study."""
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        """The problems worth a look that do not block the site."""
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        """Whether the site may take part: no error (warnings allowed)."""
        return not self.errors

    @property
    def serves(self) -> list[str]:
        """The commands this folder can feed: none when invalid, ``predict`` only when unlabelled."""
        if not self.ok:
            return []
        return list(LABELLED_COMMANDS[:1] if self.predict_only else LABELLED_COMMANDS)

    def serves_text(self) -> str:
        """``unlabelled: serves predict only; study, evaluate, reader-study need label`` (or the full list)."""
        if not self.ok:
            return "serves no command until the errors are fixed"
        if self.predict_only:
            return (f"{'; '.join(self.predict_only)}: serves predict only; "
                    f"{', '.join(LABELLED_COMMANDS[1:])} need a label (and a split, if any) in every row")
        return "serves " + ", ".join(LABELLED_COMMANDS)

    def summary(self) -> str:
        """``3 errors, 1 warning in 40 rows``."""
        errors, warnings = _count(len(self.errors), "error"), _count(len(self.warnings), "warning")
        return f"{errors}, {warnings} in {_count(self.n_rows, 'row')}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form for ``cldlr validate --json``."""
        return {
            "site": self.site, "ok": self.ok, "n_rows": self.n_rows, "n_patients": self.n_patients,
            "n_errors": len(self.errors), "n_warnings": len(self.warnings), "summary": self.summary(),
            "n_unlabelled": self.n_unlabelled, "serves": self.serves, "serves_text": self.serves_text(),
            "problems": [asdict(p) for p in self.problems],
        }

    def format_text(self) -> str:
        """One line per problem (errors first), then the summary; ``site OK`` when valid."""
        lines = [p.format() for p in self.errors + self.warnings]
        if self.ok:
            lines.append(f"site OK: {self.site} ({_count(self.n_rows, 'row')}, {_count(self.n_patients, 'patient')}, "
                         f"{_count(len(self.warnings), 'warning')})")
            lines.append(self.serves_text())
        else:
            lines.append(f"site {self.site} is NOT valid: {self.summary()}")
        return "\n".join(lines)


__all__ = ["LABELLED_COMMANDS", "Problem", "Severity", "ValidationReport"]
