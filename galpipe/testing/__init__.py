"""Test doubles for galpipe: stand-ins for external services, used by tests, benchmarks and offline demos.

:mod:`galpipe.testing.fakeserver` is a stand-in SDSS SkyServer + SAS on 127.0.0.1
(``galpipe fake-skyserver``, or ``python -m galpipe.testing.fakeserver``).

Production modules never import this package (the pipeline stages, the sources,
the network code, ...): only the ``galpipe fake-skyserver`` command imports it,
lazily, when it runs.  ``tests/test_architecture.py`` enforces this.
"""
