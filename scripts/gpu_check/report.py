"""What the check found: parts made of steps (the commands), each with a status, figures and problems, and the
report rendered from them as JSON and Markdown, both rewritten atomically whenever something changes. A part left
out by ``--parts`` is listed as not selected and does not count towards the result."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dino_sparo.utils.files import write_text_atomic

TAIL_LINES = 30
NOT_SELECTED = "not selected"
FINISHED = ("pass", "fail", "timeout", "skipped", NOT_SELECTED)


@dataclass
class Step:
    """One command of a part. ``informational``: running over its time limit is reported, not a failure."""

    name: str
    status: str  # pass, fail, timeout or skipped
    seconds: float
    returncode: int | None
    log: str  # its path in logs.tgz; empty when the command was not started
    output: str = ""
    informational: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "pass"

    @property
    def counts(self) -> bool:
        """Whether this step's time-out or skip makes its part a time-out."""
        return self.status in ("timeout", "skipped") and not self.informational

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "seconds": round(self.seconds, 1),
                "returncode": self.returncode, "log": self.log, "informational": self.informational}


@dataclass
class Part:
    """One part of the check and what it found."""

    number: int
    key: str
    title: str
    proves: str
    limit_s: float
    reserved_s: float = 0.0  # the end of limit_s kept for its reserved (last, informational) command
    status: str = "pending"  # pending (or not selected), running, then one of FINISHED
    seconds: float = 0.0
    headline: str = ""  # key figures in one line, for the summary table
    figures: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    log_tail: str = ""

    def expect(self, condition: bool, problem: str) -> bool:
        """Records ``problem`` unless ``condition`` holds; returns ``condition``."""
        if not condition:
            self.problems.append(problem)
        return condition

    def succeeded(self, step: Step, what: str) -> bool:
        """Whether ``step`` passed; a non-zero exit is recorded as a problem (time-outs already are)."""
        return self.expect(step.status != "fail", f"{what} exited with {step.returncode}") and step.ok

    def settle(self) -> str:
        if any(step.counts for step in self.steps):
            return "timeout"
        return "fail" if self.problems else "pass"

    def to_json(self) -> dict[str, Any]:
        return {"number": self.number, "key": self.key, "title": self.title, "proves": self.proves,
                "status": self.status, "seconds": round(self.seconds, 1), "limit_s": self.limit_s,
                "headline": self.headline, "figures": self.figures, "problems": self.problems, "notes": self.notes,
                "steps": [step.to_json() for step in self.steps], "log_tail": self.log_tail}


def tail(text: str, lines: int = TAIL_LINES) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def overall_result(parts: list[Part]) -> str:
    """pass when every selected part passed, fail when one did not, in progress before they have all ended."""
    if not all(part.status in FINISHED for part in parts):
        return "in progress"
    return "pass" if all(part.status in ("pass", NOT_SELECTED) for part in parts) else "fail"


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def summary_table(payload: dict[str, Any]) -> str:
    rows = ["| part | status | time | key figures |", "|---|---|---|---|"]
    for part in payload["parts"]:
        time = "" if part["status"] == NOT_SELECTED else f"{part['seconds']:.0f} s of {part['limit_s']:.0f} s"
        rows.append(f"| {part['number']}. {part['title']} | {part['status']} | {time} | {_cell(part['headline'])} |")
    return "\n".join(rows)


def render_markdown(payload: dict[str, Any]) -> str:
    lines = ["# dino_sparo GPU check", "",
             f"- mode: {payload['mode']}; command: `{payload['command']}`",
             f"- started {payload['started']}; {payload['elapsed_s']:.0f} s elapsed of at most "
             f"{payload['time_limit_s']:.0f} s; result: **{payload['result']}**",
             *(f"- {note}" for note in payload["notes"]), "", summary_table(payload)]
    for part in payload["parts"]:
        if part["status"] == NOT_SELECTED:
            lines += ["", f"## {part['number']}. {part['title']}: {NOT_SELECTED} (--parts)"]
            continue
        lines += ["", f"## {part['number']}. {part['title']}: {part['status']} ({part['seconds']:.1f} s of "
                  f"{part['limit_s']:.0f} s)", "", f"Proves: {part['proves']}"]
        if part["problems"]:
            lines += ["", "Problems:", *(f"- {problem}" for problem in part["problems"])]
        if part["notes"]:
            lines += ["", "Notes:", *(f"- {note}" for note in part["notes"])]
        if part["figures"]:
            lines += ["", "| figure | value |", "|---|---|",
                      *(f"| {_cell(name)} | {_cell(value)} |" for name, value in part["figures"].items())]
        if part["steps"]:
            lines += ["", "| command | status | time | exit | log (in logs.tgz) |", "|---|---|---|---|---|",
                      *(f"| {s['name']}{' (information)' if s['informational'] else ''} | {s['status']} | "
                        f"{s['seconds']:.1f} s | {s['returncode']} | " + (f"`{s['log']}` |" if s["log"] else "|")
                        for s in part["steps"])]
        if part["log_tail"]:
            lines += ["", "Log tail:", "", "```text", part["log_tail"], "```"]
    return "\n".join(lines) + "\n"


def write_report(report_dir: Path, payload: dict[str, Any]) -> None:
    """``gpu_report.json`` and ``gpu_report.md``, each replaced atomically: a reader never sees half a report."""
    write_text_atomic(json.dumps(payload, indent=2) + "\n", report_dir / "gpu_report.json")
    write_text_atomic(render_markdown(payload), report_dir / "gpu_report.md")
