"""Test files of cases (`rules test`, `adapters test`): a case's result, and running files to a
PASS/FAIL report with the exit code both commands share (0 all passed, 1 a case failed)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class CaseResult:
    name: str
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def run_files(files: Sequence[str], run_file: Callable[[str | Path], list[CaseResult]],
              unusable: tuple[type[Exception], ...], *, says: str, code: int) -> int:
    """Run each file, print a line a case and a total; a file ``run_file`` refuses with one of
    ``unusable`` stops the run: printed with ``says`` and answered with exit ``code``."""
    failed = total = 0
    for f in files:
        try:
            results = run_file(f)
        except unusable as e:
            print(f"{f}: {says}:\n{e}")
            return code
        for r in results:
            total += 1
            if r.ok:
                print(f"PASS {f}: {r.name}")
            else:
                failed += 1
                print(f"FAIL {f}: {r.name}")
                print("\n".join(r.failures))
    print(f"{total - failed} passed, {failed} failed")
    return 1 if failed else 0
