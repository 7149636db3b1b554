"""Image pairs to match: strategies that make them and the pairs-file format."""
