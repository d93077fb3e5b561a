"""Part 2, CUDA tests: ``pytest -m cuda`` over the test modules that mark tests ``cuda`` (collecting only those
spares importing every other module), read from pytest's own summary. ``-rfEs`` lists each failure, error and skip
by name in that summary, at the end of the log, where the report's log tail shows it."""
from __future__ import annotations

import re

from .report import Part
from .supervisor import ROOT, Check

PYTEST_NO_TESTS_COLLECTED = 5


def pytest_counts(output: str) -> dict[str, int]:
    """Outcome counts from pytest's final summary line ("2 passed, 1 skipped, 150 deselected in 3.2s")."""
    summary = next((line for line in reversed(output.splitlines()) if re.search(r" in [\d.]+s", line)), "")
    return {word.rstrip("s") if word.startswith("error") else word: int(count)
            for count, word in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)",
                                          summary)}


def collection_errors(output: str) -> list[str]:
    """``module: first error line`` for every test module pytest could not import."""
    found = re.findall(r"_ ERROR collecting (\S+) _+\n(?:(?!_ ERROR collecting).*\n)*?E +(.+)", output)
    return [f"{module}: {error.strip()}" for module, error in found]


def cuda_test_modules() -> list[str]:
    """The test modules (relative to the repository) whose text marks tests ``cuda``."""
    return sorted(str(path.relative_to(ROOT)) for path in (ROOT / "tests").glob("test_*.py")
                  if "mark.cuda" in path.read_text())


def check_cuda_tests(check: Check, part: Part) -> None:
    # A module that cannot be imported here (say, one needing a package this machine lacks) must not keep the
    # CUDA tests of the other modules from running: they run, and the import errors are reported.
    step = check.step(part, "pytest", [check.python, "-m", "pytest", "-m", "cuda", "-q", "-rfEs", "--tb=short",
                                       "-p", "no:cacheprovider", "--continue-on-collection-errors",
                                       *cuda_test_modules()],
                      check.limit(part, "pytest"),
                      # In the dry run, where no test can use CUDA, finding none is not the command's failure.
                      ok_returncodes=(0, PYTEST_NO_TESTS_COLLECTED) if check.dry_run else (0,))
    counts = pytest_counts(step.output)
    part.figures.update({name: counts.get(name, 0) for name in ("passed", "failed", "skipped", "error")})
    part.headline = ", ".join(f"{counts.get(name, 0)} {name}" for name in ("passed", "failed", "skipped"))
    if counts.get("error"):
        part.headline += f", {counts['error']} errors"
    if step.status in ("timeout", "skipped"):
        return
    broken = collection_errors(step.output)
    part.expect(not broken, f"{len(broken)} test module(s) could not be imported, so any CUDA tests in them did "
                            f"not run: {'; '.join(broken)}")
    if step.returncode == PYTEST_NO_TESTS_COLLECTED:
        part.headline = "no CUDA tests collected"
        if check.dry_run:
            part.notes.append("no test is marked cuda yet: on a GPU this part fails")
        else:
            part.problems.append("no CUDA tests collected")
    elif part.expect(step.returncode in (0, 1), f"pytest exited with {step.returncode} (see the log)"):
        part.expect(counts.get("failed", 0) == 0, f"{counts.get('failed', 0)} CUDA test(s) failed")
        if not check.dry_run:
            part.expect(counts.get("passed", 0) > 0, "no CUDA test passed on the GPU: every one was skipped "
                                                     "(reasons in the log)")
