"""The job contract: what a job asks for, what happens while it runs and what it produces.

Pydantic models only (no torch, diffusers or gradio), so the UI, the REST API, the CLI, the job
queue and a worker in another process (or, later, on another PC) validate and exchange jobs with
nothing but this package and JSON. See ``docs/architecture.md``.
"""
