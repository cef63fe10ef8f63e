"""Background jobs on one durable, PostgreSQL-backed queue (procrastinate).

A feature adds a task by decorating a function in its own domain folder with
`broker.jobs.app.app` (and listing the module in `TASK_MODULES`); `broker
worker` runs them, `broker dev` runs one worker in-process. Job arguments are
stored and logged in clear: they carry identifiers only, never a secret.
"""
