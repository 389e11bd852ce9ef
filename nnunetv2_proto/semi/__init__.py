"""Semi-supervised machinery (labelled subsets, bidirectional copy-paste, mean teacher, image-only data)."""
