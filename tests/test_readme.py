"""The README's commands stay true: the CI script runs its test command, its config files exist and parse."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sparsyfed_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _first_screen_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", README, re.S)
    assert block, "the README has no bash block"
    return [line for line in block.group(1).splitlines() if line and not line.startswith("#")]


def test_first_screen_has_exactly_the_two_commands_and_ci_runs_the_second():
    install_and_run, install_and_test = _first_screen_commands()
    assert install_and_run.endswith("sparsyfed fit --config configs/demo.yaml")
    assert install_and_test.endswith("pytest")
    ci_script = (ROOT / ".ci" / "run").read_text()
    assert install_and_test in ci_script.splitlines()


def test_every_config_the_readme_names_exists_and_parses(capsys):
    commands = [line for line in README.splitlines() if "sparsyfed fit --config configs/" in line]
    assert len(commands) >= 8
    for line in commands:
        configs = [c.strip("`") for c in re.findall(r"--config (\S+)", line)]
        for config in configs:
            assert (ROOT / config).is_file(), config
        args = line.split("sparsyfed fit", 1)[1].split("`")[0].split()
        args = [str(ROOT / a) if a.startswith("configs/") else a for a in args]
        if "|" in args:
            args = args[: args.index("|")]
        assert main(["fit", *args, "--print_config"]) == 0, line
    capsys.readouterr()


@pytest.mark.parametrize("doc", ["docs/OPTIONS.md", "docs/PERFORMANCE.md", "docs/RESULTS.md", "docs/FLOWER.md",
                                 "docs/SWEEPS.md", "docs/RELIABILITY.md", "docs/LIGHTNING.md"])
def test_linked_documents_exist(doc):
    assert doc in README and (ROOT / doc).is_file()
