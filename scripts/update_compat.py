"""Rewrite the README's compatibility matrix (between ``<!-- compat:start -->`` and
``<!-- compat:end -->``) from ``src/convattn/data/compat_matrix.json``.

``--rerun`` first runs every check again (``convattn matrix``, about two minutes on two cores)
and stores the new results in that file.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from convattn.export import MATRIX_PATH, compatibility_matrix, load_matrix, matrix_markdown

README = Path(__file__).resolve().parents[1] / "README.md"
PATTERN = re.compile(r"<!-- compat:start -->\n.*?<!-- compat:end -->", re.S)


def readme_block(data: dict) -> str:  # type: ignore[type-arg]
    """The README text between (and including) the markers for a matrix."""
    return f"<!-- compat:start -->\n{matrix_markdown(data)}\n<!-- compat:end -->"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rerun", action="store_true", help="run the checks again first")
    args = parser.parse_args()
    if args.rerun:
        data = compatibility_matrix(progress=print)
        tmp = MATRIX_PATH.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(MATRIX_PATH)
        print(f"{MATRIX_PATH.name}: regenerated")
    text = README.read_text(encoding="utf-8")
    if not PATTERN.search(text):
        raise SystemExit(f"{README}: no <!-- compat:start --> ... <!-- compat:end --> markers")
    block = readme_block(load_matrix())
    tmp = README.with_suffix(".md.tmp")
    tmp.write_text(PATTERN.sub(lambda _: block, text), encoding="utf-8")
    tmp.replace(README)
    print(f"{README.name}: compatibility matrix regenerated")


if __name__ == "__main__":
    main()
