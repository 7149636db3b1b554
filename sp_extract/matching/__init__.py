"""Matching stage: matchers for stored features and the match-pairs run."""
