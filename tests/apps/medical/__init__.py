"""Tests of the medical app (a package, so its module names cannot clash with other apps' tests)."""
