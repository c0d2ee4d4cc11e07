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


def test_the_readme_registry_example_loads(tmp_path) -> None:
    from spool import registry

    readme = (support.ROOT / "README.md").read_text()
    section = readme.split("## Adding a model", 1)[1]
    example = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "models.yaml"
    path.write_text(example)
    specs = registry.load(path)
    assert [(s.name, s.kind) for s in specs.values()] == [
        ("sd15", "image.generate"),
        ("chat-1b", "text.generate"),
    ]
    sd, chat = specs["sd15"], specs["chat-1b"]
    assert sd.limit("max_width") == 768 and sd.defaults["steps"] == 20 and sd.max_batch_size == 8
    assert chat.options["allow_download"] is True and chat.limit("max_tokens") == 1024
