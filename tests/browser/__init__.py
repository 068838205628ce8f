"""Helpers for the browser tests of the web client (tests/test_web_browser.py)."""
