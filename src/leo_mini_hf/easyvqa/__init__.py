"""easy-vqa: the dataset adapter, the seeded mosaics built from it, and exact-match evaluation."""
