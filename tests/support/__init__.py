"""One support package for tests and benchmarks: settings, processes, waiting, data."""
