"""Helpers shared by the test modules: plain readers, references and process drivers (not tests)."""
