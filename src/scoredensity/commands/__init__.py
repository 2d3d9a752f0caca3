"""Sub-commands of the ``scoredensity`` CLI, one module each (discovered by :mod:`scoredensity.cli`)."""
