"""The study's benchmarks: the matrix (test_study), its claims (test_claims) and the speed of its training paths
(test_speed). Run here with `pytest benchmarks/`, or from another project with `pytest --pyargs bnsuite.benchmarks`."""
