"""Integrations of fastpref with other training libraries, each imported on its own (``fastpref.integrations.trl``).

Import direction: an integration may use ``fastpref.ops``, ``fastpref.losses``, ``fastpref.attention`` and
``fastpref.train.modeling``; nothing else in fastpref imports an integration, so importing fastpref never imports
the other library.
"""
