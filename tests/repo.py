"""Where the checkout is, for tests that run its scripts or read its files
(tests/ sits on sys.path through tests/conftest.py)."""
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
