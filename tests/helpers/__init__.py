"""Helpers the tests import as a package (tests.helpers.*), so both import modes work."""
