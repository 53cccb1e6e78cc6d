"""Workers: the only code that touches a GPU.

A worker owns one device, its model cache and its engines; it takes contract requests
(:mod:`contract.worker`), reports contract events and returns artifacts. The same
:class:`~app.workers.runtime.WorkerRuntime` runs in a worker process (the studio's default, one per
device) or in a thread of the calling process (the headless CLI and tests).
"""
