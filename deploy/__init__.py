"""Local stack runner (`python -m deploy.stack`) and the streaming demo (`python -m deploy.demo`)."""
