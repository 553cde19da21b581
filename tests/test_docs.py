"""The docs that restate the code: the run-wide data keys, the console scripts, and the one install command CI runs."""

from __future__ import annotations

import re
from importlib.metadata import entry_points
from pathlib import Path

from vlm_train.train.curriculum import RUN_WIDE_DATA_KEYS

ROOT = Path(__file__).resolve().parent.parent


def test_training_md_lists_the_run_wide_data_keys_of_the_code():
    text = " ".join((ROOT / "docs" / "training.md").read_text().split())
    listed = re.search(r"setting them is an error \(`RUN_WIDE_DATA_KEYS` in [^)]*\): ([^.]*)\.", text)
    assert listed, "docs/training.md no longer lists the run-wide data keys where this test looks"
    assert re.findall(r"`(\w+)`", listed[1]) == list(RUN_WIDE_DATA_KEYS)


def test_tools_md_lists_every_console_script():
    installed = sorted(e.name for e in entry_points(group="console_scripts") if e.value.startswith("vlm_train."))
    text = (ROOT / "docs" / "tools.md").read_text()
    table = sorted(re.findall(r"^\| `(vlm-[a-z0-9-]+)` \|", text, re.MULTILINE))
    assert table == installed and len(installed) == 10
    count = re.search(r"The package installs (\w+) console scripts", text)
    assert count and count[1] == "ten"
    readme = (ROOT / "README.md").read_text()
    (row,) = [line for line in readme.splitlines() if line.startswith("| [docs/tools.md]")]
    assert sorted(re.findall(r"`(vlm-[a-z0-9-]+)`", row)) == installed


def test_the_readme_install_command_is_the_one_ci_runs():
    readme = (ROOT / "README.md").read_text()
    first = re.search(r"Install \(one command, the one CI runs\):\s*```bash\n(.*?)\n```", readme, re.DOTALL)
    assert first, "README.md's install command is no longer where this test looks"
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if "pip install" in line]
    assert ci == [f"python -m {first[1]}"]
