"""Tests of the finance app (a package, so its module names cannot clash with other apps' tests)."""
