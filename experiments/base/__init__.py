"""What every study shares, one job per module: the data sets (:mod:`.data`), the training runs and their cache
(:mod:`.runs`), the evaluations of a checkpoint (:mod:`.evaluation`) and the report (:mod:`.report`)."""
