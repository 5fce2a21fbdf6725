"""isnet-cxr: segmentation package."""
