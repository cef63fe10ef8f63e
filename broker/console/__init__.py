"""The tenant-admin console at /console: server-rendered pages over the API's own services.

Every page reaches the same service functions as the API routes, behind the same scopes
(read off the API routes' `require(...)` aliases, see `access.py`). The browser holds a
session cookie only; the token that signed the user in never leaves the server.
"""
