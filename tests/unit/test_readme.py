"""The README's settings table is generated from the settings schema: they must not disagree."""

from pathlib import Path

from collab_core.settings import settings_table_markdown

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_settings_table_matches_schema():
    text = README.read_text()
    start, end = "<!-- settings-table:start -->\n", "\n<!-- settings-table:end -->"
    table = text[text.index(start) + len(start) : text.index(end)]
    assert table == settings_table_markdown(), (
        "README settings table is out of date: paste the output of "
        "`python -c 'from collab_core.settings import settings_table_markdown as t; print(t())'`"
    )
