"""circus-queue-runner: pending builds become steps, steps are built, builds finish.

Sub-packages, in the order a step meets them: ``dispatch`` (builds → steps),
``routing`` (queue classes, which machine, wake-up tokens), ``steps`` (claim,
lease, finish: the protocol every consumer follows), ``builds`` (finished steps →
finished builds, then cache, GC roots, checks), and the builders ``local`` and
``ssh``. The agent gateway (``circus.gateway``) is a consumer of ``steps`` and
``routing`` too; ``main`` wires it into the ``daemon``, which never imports it.
"""
