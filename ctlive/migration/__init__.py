"""The product: a migration from the source's side (``source``: ``migrate()``) and the
destination's (``destination``: ``serve()``), one pre-copy iteration (``iteration``),
when to stop iterating (``convergence``) and what is reported (``report``)."""
