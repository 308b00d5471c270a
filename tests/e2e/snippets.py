"""The code blocks of README.md and docs/*.md, and what a test does with each.

Every fenced block tagged `bash`/`sh`, `python`, `toml` or `json` is checked. A shell command is
either run against a real fleet (curl, the `cortex` operator commands, `export`), or named here as
covered by another test (the set-up and test commands by `.ci/run`, `cortex up` by its e2e tests,
`serve --config` by the examples test, …). A command that matches no rule fails the docs test, so a
new snippet is either runnable or says which test stands for it. Untagged blocks are output and
diagrams: not code. A Python block is run when it imports what it uses (a program); without imports
it is an excerpt of the repository's code and is only compiled.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    lang: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks() -> list[Block]:
    found = []
    for path in DOCS:
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            match = FENCE.match(lines[i])
            if match is None:
                i += 1
                continue
            start, lang = i, match.group(1).lower()
            i += 1
            body = []
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            i += 1
            found.append(Block(path, start + 1, {"sh": "bash", "shell": "bash"}.get(lang, lang), "\n".join(body)))
    return found


def commands(block: Block) -> list[str]:
    """Logical shell commands: continuation lines joined, comments dropped, quoted newlines kept."""
    out: list[str] = []
    pending = ""
    joiner = "\n"
    for raw in block.text.splitlines():
        pending = f"{pending}{joiner}{raw}" if pending else raw
        joiner = "\n"
        if pending.rstrip().endswith("\\"):
            pending, joiner = pending.rstrip()[:-1].rstrip(), " "
            continue
        try:
            words = shlex.split(pending, comments=True)
        except ValueError:  # an open quote: the command goes on
            continue
        if words:
            out.append(pending.strip())
        pending = ""
    return out


# Commands another test stands for: (pattern, the test or the reason).
COVERED: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^bash scripts/setup\.sh && \.venv/bin/(cortex up|python -m pytest -q)$"), ".ci/run, tests/e2e"),
    (re.compile(r"^(\.venv/bin/)?cortex up\b"), "tests/e2e/test_cortex_up.py, test_cortex_up_fleet.py"),
    (re.compile(r"^(\. \.venv/bin/activate|(\.venv/bin/)?python -m pytest\b)"), "the test suite itself"),
    (re.compile(r"^(neuron|cortex) serve --config\b"), "tests/e2e/test_examples.py starts every example"),
    (re.compile(r"^(sudo |systemctl |journalctl |podman |docker )"), "tests/dashboard/test_deploy.py (needs root)"),
    (re.compile(r"^(\.venv/bin/)?python3? benchmarks/"), "benchmarks print figures, not pass/fail"),
    (re.compile(r"^hf download\b"), "needs the Hugging Face hub (no network here)"),
    (re.compile(r"^(claude|codex)\b"), "the client is not installed here"),
]
RUNNABLE = re.compile(
    r"^(curl |export [A-Z_]+=|(\.venv/bin/)?(cortex|neuron) (status|models|load|unload|pin|bench|--version))"
)


def is_program(block: Block) -> bool:
    """A Python block that imports what it uses is a program and is run; one without imports is an
    excerpt of the repository's code (a dataclass, a signature) and is only compiled."""
    return re.search(r"^(import|from) \w", block.text, re.MULTILINE) is not None


def covered_by(command: str) -> str | None:
    for pattern, reason in COVERED:
        if pattern.search(command):
            return reason
    return None
