"""Every job command line the README and docs show parses with that job's own argument parser, so
the documentation cannot drift from the flags (a typo or a removed flag fails here)."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "docs" / "operations.md"]
COMMAND = re.compile(r"(?:^|\s)(?:\.venv/bin/)?python -m jobs\.(\w+)((?:\s+\S+)*)")


def _commands(path: Path) -> list[tuple[str, str]]:
    """``(job, arguments)`` of each ``python -m jobs.X ...`` line in the fenced shell blocks of ``path``."""
    found, block, fenced = [], None, False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            block = [] if fenced and line.strip() in ("```bash", "```sh", "```") else None
            continue
        if block is not None:
            block.append(line)
            if not line.rstrip().endswith("\\"):
                text = " ".join(part.rstrip("\\ ") for part in block)
                block = []
                text = text.split("#", 1)[0] if " #" in text else text
                match = COMMAND.search(text)
                if match:
                    found.append((match[1], match[2]))
    return found


CASES = [(path.name, job, args) for path in DOCS for job, args in _commands(path)]


def test_the_docs_show_commands_of_every_job():
    jobs = {job for _, job, _ in CASES}
    assert {"prepare", "train", "infer", "evaluate", "calibrate", "render"} <= jobs, jobs


@pytest.mark.parametrize("doc, job, args", CASES, ids=[f"{d}:{j}:{i}" for i, (d, j, _) in enumerate(CASES)])
def test_documented_command_parses(doc, job, args):
    module = importlib.import_module(f"jobs.{job}")
    argv = [a for a in shlex.split(args) if a not in (">", "|")]
    try:
        module.build_parser().parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on bad arguments (and prints why)
        pytest.fail(f"{doc}: `python -m jobs.{job}{args}` does not parse (exit {e.code})")
