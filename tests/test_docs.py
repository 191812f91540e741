"""The documentation's examples run: every ``>>>`` example of every page under docs/ is a doctest.

Each page runs in its own namespace, top to bottom, so a page's examples may build on each other. Markdown code
fences are blanked first: otherwise a closing fence would read as expected output.
"""

import doctest
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
FENCE = re.compile(r"^[ \t]*```.*$", flags=re.MULTILINE)
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _examples(page: Path) -> doctest.DocTest:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return doctest.DocTestParser().get_doctest(text, {}, page.stem, str(page), 0)


def test_the_docs_have_pages_with_examples():
    pages_with_examples = [page.relative_to(DOCS).as_posix() for page in PAGES if _examples(page).examples]
    for page in ["index.md", "collection.md", "metrics/l2_reconstruction.md", "guides/resampling.md"]:
        assert page in pages_with_examples


@pytest.mark.parametrize("page", PAGES, ids=[page.relative_to(DOCS).as_posix() for page in PAGES])
def test_page_examples_run(page: Path):
    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    runner.run(_examples(page), out=report.append)
    assert runner.failures == 0, "".join(report)
