"""The repository's pytest root. The study plugin (options `--bn-*`, the study's fixtures) is bnsuite.plugin, which
pytest loads through bnsuite's `pytest11` entry point (pyproject.toml) wherever bnsuite is installed."""
