"""Standard-library helpers shared by the package, the tests, the benchmarks, the experiments and the GPU check:
atomic file writes (:mod:`.files`). Nothing here imports torch at module level."""
