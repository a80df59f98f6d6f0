"""The built-in studies, one module each; importing this package registers them, in the order they run and are
reported.

A study module holds everything that is that study's (bnsuite.registry.register_study): its matrix per profile,
its known exceptions, its claims, its report section and figure, its title and the options that reach it. Adding
a built-in study is one new module here and its name in `BUILTIN`; a user's study registers the same way from a
plugin, after these.
"""

import importlib

# The order they run and are reported in.
BUILTIN = ("batch", "lr", "init", "dropout", "ghost", "precise", "landscape", "placement", "noise", "renorm", "ioffe",
           "signal")

for _name in BUILTIN:
    importlib.import_module(f"{__name__}.{_name}")
