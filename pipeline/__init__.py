"""isnet-cxr: pipeline package."""
