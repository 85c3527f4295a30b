"""The real-data benchmark.

``labels`` (every repeated name), ``tasks`` / ``persona`` (the data), ``methods``,
``runner`` (cached generation and scoring), ``search`` (the validation search), ``rows``
(what runs on test), ``analyses``, ``metrics``, ``latency``, ``report`` / ``summary``
(results), ``presets`` and ``settings`` (what a run uses), ``pipeline`` (a run from its
settings) and ``commands`` (``fints bench``).
"""
