"""`settlement keys`: the operator's API keys (docs/security.md). A key is printed once, when made; the store keeps
its SHA-256 only. Revoking one stops it at the next request, in every process on the store."""

from __future__ import annotations

import os
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from settlement.chain.addresses import checksummed
from settlement.errors import ConfigError, NotFoundError
from settlement.server.api_keys import Role, make_key
from settlement.server.config import Settings
from settlement.store import Database
from settlement.store.keys import add_key, has_live_key, list_keys, revoke_key

ROLES = [Role.OPERATOR.value, Role.PAYEE.value, Role.PAYER.value]


def create(settings: Settings, console: Console, role: str, account: str | None, name: str) -> str:
    if role not in ROLES:
        raise ConfigError(f"--role must be one of {', '.join(ROLES)}, not {role!r}")
    typed = None if account is None else checksummed(account, "--account", ConfigError)
    try:
        made = make_key(Role(role), typed, name, time.time_ns() // 1000)
    except ValueError as ex:
        raise ConfigError(str(ex)) from ex
    db = _store(settings)
    try:
        with db.write() as conn:
            add_key(conn, made.row, made.digest)
    finally:
        db.dispose()
    who = f" for {typed}" if typed else ""
    # The name is the operator's text, not markup: "[/]" in it failed this line, after the key was stored, and the
    # key (shown here once) was never shown.
    shown = f"made {role} key [bold]{made.row.key_id}[/]{who} ({escape(name)}); it is shown once, keep it secret:"
    console.print(shown)
    print(made.secret)
    return made.secret


def show(settings: Settings, console: Console) -> None:
    db = _store(settings)
    try:
        with db.read() as conn:
            rows = list_keys(conn)
    finally:
        db.dispose()
    table = Table(title="API keys")
    for column in ("id", "role", "account", "name", "made", "revoked"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row.key_id,
            row.role,
            row.account or "",
            escape(row.name),
            _when(row.created_at_us),
            _when(row.revoked_at_us) if row.revoked_at_us else "",
        )
    console.print(table)
    # A line of its own, not the table's title: a title wraps at the table's width, through a long path.
    console.print(f"store: {escape(db.shown_url)}", soft_wrap=True)


def revoke(settings: Settings, console: Console, key_id: str) -> None:
    db = _store(settings)
    try:
        with db.write() as conn:
            if not revoke_key(conn, key_id, time.time_ns() // 1000):
                raise NotFoundError(f"no live key {key_id!r}: `settlement keys list` shows them")
    finally:
        db.dispose()
    console.print(f"revoked {key_id}: it is refused from the next request on")


def devnet_operator_key(settings: Settings, db: Database, console: Console) -> None:
    """On a devnet whose store has no operator key: make one, print it and leave it in a file next to the deployment
    record (readable by its owner only), so that a tester reads everything without a setup step."""
    if not settings.access_control:
        return
    with db.write() as conn:
        if has_live_key(conn, Role.OPERATOR):
            return
        made = make_key(Role.OPERATOR, None, "devnet", time.time_ns() // 1000)
        add_key(conn, made.row, made.digest)
    path = operator_key_file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write(made.secret + "\n")
    console.print(escape(f"devnet operator API key (also in {path}): {made.secret}"), soft_wrap=True)


def operator_key_file(settings: Settings) -> Path:
    return settings.deployment_file.parent.resolve() / "operator-key"


def _store(settings: Settings) -> Database:
    db = Database(settings.database_url)
    db.migrate()
    return db


def _when(us: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(us / 1_000_000))
