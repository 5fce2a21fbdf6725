"""Image I/O: chest X-ray readers and MONAI transforms (:mod:`cxr_io.readers`), manifests,
typed settings, cached wheel fetches, and the one keyed-hash privacy scheme (:mod:`cxr_io.privacy`).

The bottom layer: it imports no other package of this project.
"""
