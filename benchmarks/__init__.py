"""Speed and scale measurements; run each from the checkout root as ``python -m benchmarks.NAME``
(the package form makes the test helpers in ``tests/`` importable without path edits)."""
