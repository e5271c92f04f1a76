"""A search: the driver, the trainable, pruning, the study recorder and the trackers, which run
on Ray; and the parts that describe a search without Ray (its options, space, pruning rules and
recorded inputs), which the results and the Jobs submission read.

The only package (with ``unfreeze_hpo.cluster``) that imports Ray. Its modules are imported by
name (``unfreeze_hpo.search.driver``), so reading a search's options does not start Ray.
"""
