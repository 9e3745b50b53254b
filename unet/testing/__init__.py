"""Support code for tests and benchmarks, not used by the jobs."""
