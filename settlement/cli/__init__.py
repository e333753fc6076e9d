"""The operator CLI (`settlement ...`); it needs the server extra."""

from importlib.util import find_spec

# Looked up, not imported: importing them costs every command a second on a slow machine, even `--help`.
_missing = [name for name in ("fastapi", "sqlalchemy", "typer") if find_spec(name) is None]
if _missing:  # the base install is the SDK only
    raise SystemExit(
        "the `settlement` command runs the service, which needs `pip install 'channelhub-settlement[server]'` "
        f"(no module named {', '.join(_missing)})"
    )
