"""Hand-off to COLMAP: database import and reconstruction."""
