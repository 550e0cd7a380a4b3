"""Every test that docs/threat-model.md names exists, once (claims need evidence)."""

from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = re.compile(r"`((?:test_|Test)\w+)`")


def defined_names() -> Counter[str]:
    """Test functions and classes defined anywhere under tests/, with counts."""
    names: Counter[str] = Counter()
    for path in (ROOT / "tests").rglob("*.py"):
        tree = ast.parse(path.read_text())
        names.update(node.name for node in ast.walk(tree)
                     if isinstance(node, ast.FunctionDef | ast.ClassDef))
        names.update(target.id for node in ast.walk(tree) if isinstance(node, ast.Assign)
                     for target in node.targets if isinstance(target, ast.Name))
    return names


@pytest.mark.parametrize(("doc", "at_least"), [("docs/threat-model.md", 60),
                                               ("docs/phones.md", 8),
                                               ("docs/operations.md", 4),
                                               ("docs/benchmarks.md", 3)])
def test_threat_model_names_only_real_tests(doc: str, at_least: int) -> None:
    text = (ROOT / doc).read_text()
    references = set(REFERENCE.findall(text))
    assert len(references) >= at_least
    defined = defined_names()
    assert sorted(n for n in references if defined[n] == 0) == [], "named but not defined"
    assert sorted(n for n in references if defined[n] > 1) == [], "named but ambiguous"


def test_the_reference_check_can_fail() -> None:
    defined = defined_names()
    assert defined["test_threat_model_names_only_real_tests"] == 1
    assert defined["test_that_does_not_exist"] == 0
    assert REFERENCE.findall("see `test_x` and `TestY`, not `spa-server`") == ["test_x", "TestY"]
