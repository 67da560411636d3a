"""Training algorithms: one small module each, one interface (:class:`fastpref.train.algorithms.base.Algorithm`)."""
