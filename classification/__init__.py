"""isnet-cxr: classification package."""
