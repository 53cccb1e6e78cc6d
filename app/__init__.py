"""SD Studio's application layer: settings, services, CLI, UI, API and jobs.

It composes the ``pipelines`` and ``sadtalker`` libraries; they never import from here.
"""
