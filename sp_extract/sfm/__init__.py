"""Hand-off to COLMAP: database import, keypoint adjustment and reconstruction; the model handed on."""
