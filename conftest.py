"""pytest's entry to bnsuite: the study plugin (options `--bn-*`, the study's fixtures) lives in bnsuite.plugin."""

pytest_plugins = ("bnsuite.plugin",)
