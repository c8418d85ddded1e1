"""Mail to users: the ``[mail]`` settings, the SMTP client, the templates and the
sender loop that ``serve`` runs over the outbox (the rules are in policy/mail.py)."""
