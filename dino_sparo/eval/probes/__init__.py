"""The probes of ``eval_linear.py`` beyond DINO's single linear classifier: a grid of classifiers trained at once on
the same frozen inputs (:mod:`.grid`), linear, attentive (Efficient Probing) and cross-attention heads
(:mod:`.heads`), their inputs (:mod:`.inputs`), the held-out part of the training images that chooses one
(:mod:`.holdout`), the recipes (:mod:`.recipes`), cached features (:mod:`.cache`), batches (:mod:`.batches`) and
the run (:mod:`.train`)."""
