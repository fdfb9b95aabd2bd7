"""Dataset preparation scripts (packing the original layouts into ArrayRecord); see README.md."""
