"""The README's examples run as written, and it shows the commands CI relies on."""

import doctest
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_run() -> None:
    result = doctest.testfile(str(README), module_relative=False, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


def test_readme_shows_the_two_commands() -> None:
    text = README.read_text()
    assert "pip install torch==2.13.0 -e . && python examples/train_sae.py" in text
    assert 'pip install torch==2.13.0 -e ".[test]" && python -m pytest -n 2' in text
