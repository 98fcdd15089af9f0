"""The controller: a network service that holds the mesh, authenticates
everyone and drives every site's agent.

``db`` is its SQLite store (users, tokens, API keys, the audit log),
``auth`` the authentication and authorisation core (Argon2id passwords,
JWT access tokens with rotating refresh tokens, API keys, TOTP, RBAC, rate
limits). The REST application sits on top of them and is imported only by
whoever serves it, so importing this package needs no web framework.
"""
