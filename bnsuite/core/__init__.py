"""The torch-free half of bnsuite: what a reader of records needs (bnsuite.core.layout)."""
