"""Tests of the education vertical."""
