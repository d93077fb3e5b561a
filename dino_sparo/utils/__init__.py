"""Standard-library helpers shared by the package, the tests, the benchmarks, the experiments and the GPU check:
atomic file writes (:mod:`.files`), process control (:mod:`.processes`: run with a deadline, kill a whole process
tree) and machine facts (:mod:`.machine`). Nothing here imports torch at module level."""
