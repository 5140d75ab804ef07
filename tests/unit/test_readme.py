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


def test_readme_metrics_table_lists_every_metric():
    from collab_core.metrics import METRIC_DESCRIPTIONS

    text = README.read_text()
    for name, description in METRIC_DESCRIPTIONS.items():
        assert f"| `{name}` | {description}" in text, f"README metrics table lacks {name}"
