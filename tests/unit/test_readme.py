"""The README documents every environment variable the settings read."""

from __future__ import annotations

import re

from tests import support


def test_every_setting_variable_is_in_the_readme_table() -> None:
    source = (support.ROOT / "spool" / "settings.py").read_text()
    read = set(re.findall(r'"(SPOOL_[A-Z0-9_]+)"', source))
    assert len(read) > 20  # the pattern still finds them
    readme = (support.ROOT / "README.md").read_text()
    first_cells = re.findall(r"^\| (`SPOOL_[^|]+)\|", readme, flags=re.MULTILINE)
    documented = {name for cell in first_cells for name in re.findall(r"`(SPOOL_\w+)`", cell)}
    assert sorted(read - documented) == []
