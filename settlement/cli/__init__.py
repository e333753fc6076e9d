"""The operator CLI (`settlement ...`); it needs the server extra."""

try:
    import fastapi  # noqa: F401
    import sqlalchemy  # noqa: F401
    import typer  # noqa: F401
except ImportError as ex:  # the base install is the SDK only
    raise SystemExit(
        f"the `settlement` command runs the service, which needs `pip install 'channelhub-settlement[server]'` ({ex})"
    ) from ex
