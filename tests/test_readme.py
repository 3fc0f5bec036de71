"""The README works as a new user meets it: its Python runs as pasted, its commands (and docs/command.md's)
compose, its links and figures point at files that exist.

The Python blocks run in order in one fresh interpreter, as a user pasting them one after another into one
session would (the export block continues the quick start). The only change the test makes is the one the
README shows: a line `NAME = value  # README-TEST: NAME = smaller` runs with the smaller value.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
MARKER = "# README-TEST:"
MARKED_LINE = re.compile(r"^(?P<indent>\s*)(?P<name>\w+) = .+?\s+# README-TEST: (?P<test>(?P=name) = .+)$")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def code_blocks(text: str, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(text) if lang == language]


def with_test_values(code: str) -> str:
    """`code` with each `# README-TEST:` line replaced by the assignment its comment gives."""
    lines = []
    for line in code.splitlines():
        if MARKER in line:
            match = MARKED_LINE.match(line)
            form = "`NAME = value  # README-TEST: NAME = other`"
            assert match, f"a README-TEST line must read {form}: {line!r}"
            line = match["indent"] + match["test"]
        lines.append(line)
    return "\n".join(lines) + "\n"


def readme() -> str:
    return README.read_text(encoding="utf-8")


def test_markers_are_well_formed_and_change_only_values() -> None:
    blocks = code_blocks(readme(), "python")
    assert len(blocks) >= 3, "the quick start, export and load blocks"
    for block in blocks:
        tested = with_test_values(block)
        assert tested.count("\n") == block.rstrip("\n").count("\n") + 1  # line for line
    assert any(MARKER in block for block in blocks), "the quick start's step count should be marked"


def test_with_test_values_rejects_a_marker_that_is_not_an_assignment() -> None:
    with pytest.raises(AssertionError, match="README-TEST line must read"):
        with_test_values("trainer.fit(model)  # README-TEST: trainer.fit(other)\n")
    with pytest.raises(AssertionError, match="README-TEST line must read"):
        with_test_values("STEPS = 30  # README-TEST: OTHER = 2\n")  # another name: a hidden edit


@pytest.mark.slow
def test_python_blocks_run_as_pasted(tmp_path: Path) -> None:
    script = "\n".join(
        f"# --- README block {i} ---\n{with_test_values(block)}"
        for i, block in enumerate(code_blocks(readme(), "python"), 1)
    )
    (tmp_path / "readme_session.py").write_text(script, encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [sys.executable, "readme_session.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, f"the README's Python failed:\n{proc.stderr[-6000:]}"
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "merged" / "config.json").is_file()


def shown_commands(page: Path) -> list[list[str]]:
    """The `lightning-qlora-train ...` lines of a page's shell blocks, comments dropped."""
    commands = []
    for block in code_blocks(page.read_text(encoding="utf-8"), "bash"):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == "lightning-qlora-train":
                commands.append(words[1:])
    return commands


@pytest.mark.parametrize("page", [README, ROOT / "docs" / "command.md"], ids=lambda p: p.name)
def test_shown_commands_compose(page: Path) -> None:
    """Each command shown composes its config (`--cfg job`): no misspelt group, option or key."""
    skip = {"-m", "--help", "--version", "--cfg"}
    commands = [args for args in shown_commands(page) if not skip & set(args)]
    assert [] in commands, "the default job"
    assert len(commands) >= 3
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    env.pop("HYDRA_FULL_ERROR", None)
    for args in commands:
        proc = subprocess.run(
            [sys.executable, "-m", "lightning_qlora.cli", "--cfg", "job", *args],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, f"lightning-qlora-train {shlex.join(args)}:\n{proc.stderr[-3000:]}"


def test_the_two_commands_exist() -> None:
    text = readme()
    for script in ("scripts/test.sh", "scripts/train.sh"):
        assert script in text
        assert os.access(ROOT / script, os.X_OK), f"{script} is not executable"
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text(), "the CI runs the README's test command"


def test_relative_links_resolve() -> None:
    links = [link for link in LINK.findall(readme()) if "://" not in link]
    assert links
    missing = [link for link in links if not (ROOT / link).exists()]
    assert missing == [], f"README links to files that do not exist: {missing}"


def test_every_measured_figure_names_its_results_file_and_machine() -> None:
    section = readme().split("## Measured", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert rows, "the Measured table"
    for row in rows:
        results = re.findall(r"\]\((benchmarks/results/[^)]+\.md)\)", row)
        assert results, f"a figure without its results file: {row}"
        assert all((ROOT / path).is_file() for path in results), row
        assert any(machine in row for machine in ("AMX VM", "AVX2 EPYC", "any machine")), row
