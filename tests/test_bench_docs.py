"""make bench keeps docs/benchmarks.md current: each section's latest full run between its markers."""
from __future__ import annotations

from pathlib import Path

from pg_llm.bench.__main__ import update_docs


def test_sections_are_replaced_in_place_and_new_ones_appended(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nintro\n")
    update_docs(doc, "gpt2", "| a |\n")
    update_docs(doc, "loop", "| b |\n")
    update_docs(doc, "gpt2", "| c |\n")
    text = doc.read_text()
    assert text == ("# Benchmarks\n\nintro\n\n<!-- bench:gpt2 -->\n| c |\n<!-- /bench:gpt2 -->\n\n"
                    "<!-- bench:loop -->\n| b |\n<!-- /bench:loop -->\n")
