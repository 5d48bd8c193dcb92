"""Onion services v3 (rend-spec-v3): pure, sans-IO building blocks. See specs/onion-services.md."""
