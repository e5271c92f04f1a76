"""A search on a Ray cluster: Ray Jobs submission of the ``search`` command (``jobs``)."""
