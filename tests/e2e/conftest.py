# The `browser` and `page` fixtures live in tests/conftest.py: a second Playwright instance in the same
# thread fails, so no other conftest may define (or import) them.
from tests.browser import CHROMIUM, CHROMIUM_ARGS, login

__all__ = ["CHROMIUM", "CHROMIUM_ARGS", "login"]
