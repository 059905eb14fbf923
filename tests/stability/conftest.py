"""Stability tests: each file sets ``pytestmark = pytest.mark.stability``; helpers.py builds the models.

The one-thread setting these tests rely on lives in tests/conftest.py.
"""
