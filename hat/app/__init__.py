"""The ``hat-cl`` command line application: ``cli`` (argument parsing, ``hat-cl run``), ``experiment``
(benchmarks, models, metrics), ``plots`` and run ``checkpoint``s. Not imported by ``import hat``."""
