"""Onion services v3 (rend-spec-v3): the pure parts (cells, keys, descriptors)."""
