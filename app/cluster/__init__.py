"""The LAN studio cluster on Ray: the same worker runtime as a local worker process, hosted in a Ray
actor on any PC of the cluster (the head's own GPUs included).

Nothing here is imported, and no Ray process starts, unless the studio is started with
``--cluster-head``, ``--cluster-join`` or ``--cluster-address``. See docs/architecture.md.
"""
