"""Inspection stage: look at stores (``info``, ``show``) and measure features (``evaluate``)."""
