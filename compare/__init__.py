"""``make compare``: the same corpus through Postfix with the real anchors and with authmilter.

``compare/run.py`` is the runner, ``compare/corpus.py`` the messages and the configuration sets
(``compare/configs/`` holds the migration-style files they are made from), ``compare/lab.py``
the daemons (NSD on port 53, Postfix, OpenDKIM, OpenDMARC, policyd-spf, authmilter) and
``compare/outcome.py`` what is read back from each side and how two sides are compared.
"""
