"""The training half of bnsuite: what turns a spec into records (bnsuite.core.layout)."""
