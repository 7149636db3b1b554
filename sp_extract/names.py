"""Entry names shared by the store, pairs and matching: how a pair of images is named in a match
store (hloc's layout). Depends on nothing else in the package."""

from __future__ import annotations


def flat_name(name: str) -> str:
    """An image name as it appears in a match store's pair key (hloc: ``/`` becomes ``-``)."""
    return name.replace("/", "-")


def pair_key(name0: str, name1: str) -> str:
    """The match store's group of a pair: hloc's ``names_to_pair``."""
    return flat_name(name0) + "/" + flat_name(name1)
