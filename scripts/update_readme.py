"""Regenerate the README's module table from the registry (``make readme``)."""

from __future__ import annotations

import re
from pathlib import Path

from convattn.registry import markdown_table

README = Path(__file__).resolve().parents[1] / "README.md"
PATTERN = re.compile(r"<!-- modules:start -->\n.*?<!-- modules:end -->", re.S)


def main() -> None:
    text = README.read_text()
    if not PATTERN.search(text):
        raise SystemExit(f"{README}: no <!-- modules:start --> ... <!-- modules:end --> markers")
    table = f"<!-- modules:start -->\n{markdown_table()}\n<!-- modules:end -->"
    README.write_text(PATTERN.sub(lambda _: table, text))
    print(f"{README.name}: module table regenerated")


if __name__ == "__main__":
    main()
