"""One module per provider dialect, each answering exactly what PROVIDERS.md documents.

Written from the docs independently of relay.providers (which speaks the same
dialects): a misreading in one side shows up as a failure against the other.
"""
