"""Dataset readers, phantom, preprocessing, patches and splits."""
