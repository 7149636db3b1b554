"""Hand-off to COLMAP: database import, keypoint adjustment and reconstruction; the model handed on."""

EXPORT_FORMATS = ("gaussian-splatting", "nerfstudio", "ply")  # export-model, sfm --export (``handoff``)
