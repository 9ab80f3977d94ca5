"""cmb: two-stage cerebral microbleed detection in susceptibility-weighted MRI."""

__version__ = "0.1.0"

WINDOW: tuple[int, int, int] = (20, 20, 16)
"""Network window in voxels along (i, j, k); k is the slice axis of an axial SWI."""
