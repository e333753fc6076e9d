"""Shared fixtures: one real anvil per session, a snapshot/revert around every test, factories for the rest."""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, cast

import pytest
from eth_account.signers.local import LocalAccount
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from web3 import Web3
from web3.contract import Contract
from web3.types import RPCEndpoint

from settlement import recursion
from settlement.api.app import create_app
from settlement.chain.contracts import load_artifact
from settlement.chain.deployment import Deployment, deploy_hub, hub_contract
from settlement.chain.node import connect
from settlement.devtools.devnet import Devnet
from settlement.eip712.vouchers import Domain
from settlement.indexer.follower import Indexer
from settlement.server.config import Settings
from settlement.server.service import Service
from settlement.settle.engine import Settler
from settlement.store import Database
from tests.hub_helpers import CHALLENGE_PERIOD, ForkedDevnet, devnet_settings, voucher_signer
from tests.proxy import TcpProxy
from tests.servers import ServiceProcess, ServiceThread


@pytest.fixture(scope="session")
def devnet() -> Iterator[Devnet]:
    with Devnet(devnet_settings(devnet_accounts=20)) as net:
        yield net


@pytest.fixture(scope="session")
def w3(devnet: Devnet) -> Web3:
    """The tests' client of the devnet, made as the service makes its own (`connect`)."""
    return connect(devnet.url)


@pytest.fixture(scope="session")
def accounts(devnet: Devnet) -> list[LocalAccount]:
    return devnet.accounts


@pytest.fixture(scope="session")
def deploy(w3: Web3, accounts: list[LocalAccount]) -> Callable[..., Contract]:
    """Factory: deploy(name, *constructor_args, sender=...) -> bound contract."""

    def make(name: str, *args: Any, sender: LocalAccount | None = None) -> Contract:
        artifact = load_artifact(name)
        factory = w3.eth.contract(abi=artifact.abi, bytecode=artifact.bytecode)
        tx = factory.constructor(*args).transact({"from": (sender or accounts[0]).address})
        receipt = w3.eth.wait_for_transaction_receipt(tx)
        return cast(Contract, w3.eth.contract(address=receipt["contractAddress"], abi=artifact.abi))

    return make


@pytest.fixture(scope="session")
def hub_deployment(w3: Web3, accounts: list[LocalAccount]) -> Deployment:
    """The session's hub, deployed the way `settlement deploy` does it, with its deployment record."""
    return deploy_hub(w3, accounts[0], CHALLENGE_PERIOD)


@pytest.fixture(scope="session")
def session_hub(w3: Web3, hub_deployment: Deployment) -> Contract:
    return hub_contract(w3, hub_deployment)


@pytest.fixture(autouse=True)
def evm_snapshot(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test that touches the chain starts from the same state and leaves nothing behind: what `evm_revert`
    does not undo is set back too (transactions left in anvil's pool; its next block's base fee, which a test may
    have raised to a spike's)."""
    if "w3" not in request.fixturenames:
        yield
        return
    chain: Web3 = request.getfixturevalue("w3")
    request.getfixturevalue("session_hub")  # deployed once, before the first snapshot
    base = chain.eth.get_block("latest")["baseFeePerGas"]
    snapshot = chain.provider.make_request(RPCEndpoint("evm_snapshot"), [])["result"]
    yield
    assert chain.provider.make_request(RPCEndpoint("evm_revert"), [snapshot])["result"] is True
    chain.provider.make_request(RPCEndpoint("anvil_dropAllTransactions"), [])
    chain.provider.make_request(RPCEndpoint("anvil_setNextBlockBaseFeePerGas"), [hex(base)])


@pytest.fixture(params=["automine", "interval"])
def mining(request: pytest.FixtureRequest, w3: Web3) -> Iterator[str]:
    """Each test that takes this runs twice: on automine (one block per transaction, which hid a critical bug) and on
    a chain that mines every second whatever is pending, many transactions per block, as a real chain does."""
    if request.param == "automine":
        yield "automine"
        return
    w3.provider.make_request(RPCEndpoint("evm_setAutomine"), [False])
    w3.provider.make_request(RPCEndpoint("evm_setIntervalMining"), [1])
    try:
        yield "interval"
    finally:  # before evm_snapshot's revert (an autouse fixture, so set up first and torn down last)
        w3.provider.make_request(RPCEndpoint("evm_setIntervalMining"), [0])
        w3.provider.make_request(RPCEndpoint("evm_setAutomine"), [True])


@pytest.fixture
def hub(session_hub: Contract) -> Contract:
    return session_hub


@pytest.fixture
def domain(hub: Contract, w3: Web3) -> Domain:
    return Domain(chain_id=w3.eth.chain_id, verifying_contract=hub.address)


@pytest.fixture
def sign(domain: Domain) -> Callable[..., bytes]:
    """Factory: sign(account, channel_id, cumulative, domain=None) -> 65-byte signature."""
    return voucher_signer(domain)


@pytest.fixture(scope="session")
def postgres_url() -> str:
    return os.environ.get("SETTLEMENT_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def postgres_server(postgres_url: str) -> str:
    """The PostgreSQL server URL, or a skip naming the reason when there is none."""
    engine = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except OperationalError as ex:
        pytest.skip(f"PostgreSQL not reachable at {postgres_url} ({str(ex.orig).strip()}); SQLite tests still run")
    finally:
        engine.dispose()
    return postgres_url


@contextmanager
def scratch_database(server: str, template: str | None = None) -> Iterator[str]:
    """A new database on the server (a copy of `template`, else empty), dropped on exit; yields its URL."""
    name = f"settlement_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else "")))
    try:
        yield make_url(server).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def postgres_template(postgres_server: str) -> Iterator[str]:
    """A database migrated to the newest schema once per session: each test's store is a copy of it (copying is
    cheaper than running every migration for each of the hundreds of PostgreSQL tests)."""
    with scratch_database(postgres_server) as url:
        template = Database(url)
        template.migrate()
        template.dispose()  # a template database must have no connections when it is copied
        yield str(make_url(url).database)


@pytest.fixture
def fresh_postgres(postgres_server: str, postgres_template: str) -> Iterator[str]:
    """A new database for one test, at the newest schema and without rows, dropped afterwards."""
    with scratch_database(postgres_server, postgres_template) as url:
        yield url


@pytest.fixture
def make_postgres(postgres_server: str, postgres_template: str) -> Iterator[Callable[[], str]]:
    """Factory: another new database at the newest schema on each call (a test of several stores), all dropped
    afterwards."""
    with ExitStack() as stack:
        yield lambda: stack.enter_context(scratch_database(postgres_server, postgres_template))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Like store_url, but without any schema yet: for the tests of the migrations themselves."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'settlement.db'}"
        return
    with scratch_database(request.getfixturevalue("postgres_server")) as url:
        yield url


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated to the newest schema once per worker, as `postgres_template` (the migrations cost
    ~0.3 s a store here, for hundreds of tests; the tests of the migrations themselves start from `empty_store_url`)."""
    path = tmp_path_factory.mktemp("sqlite-template") / "settlement.db"
    template = Database(f"sqlite:///{path}")
    template.migrate()
    template.dispose()  # the last connection's close folds the write-ahead log into the file
    assert not path.with_name(path.name + "-wal").exists(), "the template's log was not folded into its file"
    return path


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each test that takes this runs twice: on a fresh SQLite file and on a fresh PostgreSQL database, each a copy of
    the session's migrated template."""
    with template_copy(request, tmp_path) as url:
        yield url


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def module_store_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """As store_url, but one store for a whole module's tests on each backend: for a module of many small cases that
    share one service (each on its own channel), where a store and a service per case would cost most of its time."""
    with template_copy(request, tmp_path_factory.mktemp("module-store")) as url:
        yield url


@contextmanager
def template_copy(request: pytest.FixtureRequest, directory: Path) -> Iterator[str]:
    """A new store at the newest schema on `request.param`'s backend: a copy of the worker's migrated template (a
    SQLite file in `directory`, or a PostgreSQL database dropped on exit); yields its URL."""
    if request.param == "sqlite":
        path = directory / "settlement.db"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite:///{path}"
        return
    server, template = request.getfixturevalue("postgres_server"), request.getfixturevalue("postgres_template")
    with scratch_database(server, template) as url:
        yield url


@pytest.fixture
def db(store_url: str) -> Iterator[Database]:
    """A migrated store on this test's backend."""
    database = Database(store_url)
    database.migrate()
    yield database
    database.dispose()


@pytest.fixture
def make_indexer(w3: Web3, hub: Contract, hub_deployment: Deployment, db: Database) -> Callable[..., Indexer]:
    """Factory: make_indexer(confirmations=0, chain=None) -> an indexer of the session hub on this test's store,
    reading the chain through `chain` (another node, a proxy's Web3) or the devnet's own (`w3`)."""

    def make(confirmations: int = 0, chain: Web3 | None = None) -> Indexer:
        node = w3 if chain is None else chain
        there = node.eth.contract(address=hub.address, abi=hub.abi)
        return Indexer(db, node, there, start_block=hub_deployment.block_number, confirmations=confirmations)

    return make


@pytest.fixture
def failover_behind(devnet: Devnet) -> Iterator[Callable[[int], tuple[TcpProxy, Web3]]]:
    """Factory: failover_behind(fork_block) -> (primary, w3): a Web3 whose primary RPC, a TCP proxy in front of the
    devnet, fails over to an anvil forked from it at `fork_block`, blocks behind it (as a fallback RPC or a node behind
    a provider's balancer may be): after `primary.cut()` the node behind answers. All stopped after the test."""
    with ExitStack() as stack:

        def make(fork_block: int) -> tuple[TcpProxy, Web3]:
            primary = stack.enter_context(TcpProxy(devnet.port))
            settings = devnet_settings(devnet_accounts=1)
            behind = stack.enter_context(ForkedDevnet(settings, fork_url=devnet.url, fork_block=fork_block))
            return primary, connect(primary.url, fallbacks=[behind.url], primary_retry=0.5)

        yield make


@pytest.fixture
def service_settings(
    devnet: Devnet, hub_deployment: Deployment, store_url: str, tmp_path: Path
) -> Callable[..., Settings]:
    """Factory: settings for a service on the session hub and this test's store; keyword overrides win."""
    record = tmp_path / "deployment.json"
    hub_deployment.save(record)
    return lambda **overrides: settings_for_tests(devnet, record, store_url, **overrides)


@pytest.fixture(scope="module")
def module_service_settings(
    devnet: Devnet, hub_deployment: Deployment, module_store_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., Settings]:
    """As service_settings, on the module's store (module_store_url)."""
    record = tmp_path_factory.mktemp("module-service") / "deployment.json"
    hub_deployment.save(record)
    return lambda **overrides: settings_for_tests(devnet, record, module_store_url, **overrides)


def settings_for_tests(devnet: Devnet, deployment_file: Path, store_url: str, **overrides: Any) -> Settings:
    """Settings for a service on the session's devnet and hub and the given store, as the tests want them."""
    values: dict[str, Any] = {
        "rpc_url": devnet.url,
        "deployment_file": deployment_file,
        "database_url": store_url,
        "confirmations": 0,
        "indexer_interval": 0.05,
        "engine_enabled": False,  # tests that want the engine turn it on
        # Test payments are a few wei: the economic check would keep them out of every regular batch. The tests
        # of that check (test_settle_economics.py) turn it on.
        "settle_fee_share_percent": 0,
        # Reads open to any caller (allowed on a devnet only): the tests of access control
        # (test_access.py) turn it on.
        "access_control": False,
        # No per-client rate limit (every test request comes from one address): test_rate_limits.py turns it on.
        "client_requests_per_second": 0,
        # Store reads of channel ids the process does not hold, unbounded in effect: a test pays on channels it has
        # just opened, which the indexer (every 0.05 s) may not have reached yet, and the budget's burst of 2 made
        # the third such channel a 503 `unknown_channels_busy` whenever a poll was late (CI failed so, once, in
        # test_rate_limits.py). The tests of that budget (test_flood.py, test_client.py) set it.
        "unknown_channel_reads_per_second": 10_000,
        # No signature recovery process per service (hundreds of services start here, and a worker costs ~1.7 s of
        # CPU to start on a slow machine): the tests of the workers (test_ingest_api.py, test_engine.py,
        # test_faults.py) ask for one, in process or in a `settlement serve` they spawn.
        "recovery_processes": 0,
        **overrides,
    }
    return devnet_settings(**values)


@pytest.fixture
def make_service(w3: Web3, service_settings: Callable[..., Settings]) -> Iterator[Callable[..., Service]]:
    """Factory: a started Service (store, indexer, ingest writer); every one is stopped after the test."""
    started: list[Service] = []

    def make(**overrides: Any) -> Service:
        service = Service.build(service_settings(**overrides))
        service.start()
        started.append(service)
        return service

    yield make
    for service in started:
        service.stop()


@pytest.fixture
def api(w3: Web3, service_settings: Callable[..., Settings]) -> Iterator[Callable[..., TestClient]]:
    """Factory: a TestClient on a fresh app (its lifespan running); all are closed after the test."""
    clients: list[TestClient] = []

    def make(**overrides: Any) -> TestClient:
        client = TestClient(create_app(service_settings(**overrides)), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def settler_account(accounts: list[LocalAccount]) -> LocalAccount:
    return accounts[19]


@pytest.fixture
def engine(
    make_service: Callable[..., Service], settler_account: LocalAccount
) -> Iterator[Callable[..., tuple[Service, Settler]]]:
    """Factory: engine(clock=None, chain=None, **settings) -> (service, settler) sharing this test's store; call
    again to 'restart'. `clock` replaces the settler's wall clock; `chain` (another node, a proxy's Web3) is what the
    settler reads and sends through instead of the devnet."""

    def make(
        clock: Callable[[], float] | None = None, chain: Web3 | None = None, **overrides: Any
    ) -> tuple[Service, Settler]:
        service = make_service(**{"settle_interval": 3600.0, **overrides})
        settler = Settler(
            service.db,
            service.w3 if chain is None else chain,
            service.hub if chain is None else chain.eth.contract(address=service.hub.address, abi=service.hub.abi),
            settler_account,
            service.settings,
            service.metrics,
            **({"clock": clock} if clock else {}),
        )
        return service, settler

    yield make


@pytest.fixture
def token(deploy: Callable[..., Contract]) -> Contract:
    """A fresh mintable ERC-20 (18 decimals), reverted with the test."""
    return deploy("DevToken", "Dev Token", "DEV", 18)


@pytest.fixture
def open_channel(w3: Web3, hub: Contract) -> Callable[..., Any]:
    """Factory: open_channel(payer, payee, token=None, amount=10**18, salt=None) -> Channel.

    For a token channel the payer is minted and approves `amount` first (DevToken-like tokens only).
    """
    from tests.hub_helpers import Channel, channel_id, open_eth_channel, salt_of, send

    counter = iter(range(1, 1_000_000))

    def make(
        payer: LocalAccount, payee: str, token: Contract | None = None, amount: int = 10**18, salt: bytes | None = None
    ) -> Channel:
        salt = salt if salt is not None else salt_of(next(counter))
        if token is None:
            return open_eth_channel(w3, hub, payer, payee, amount, salt)
        send(w3, token.functions.mint(payer.address, amount), payer.address)
        send(w3, token.functions.approve(hub.address, amount), payer.address)
        send(w3, hub.functions.open(payee, token.address, salt, amount), payer.address)
        cid = channel_id(payer.address, payee, token.address, salt)
        return Channel(id=cid, payer=payer, payee=payee, token=token.address, salt=salt, deposit=amount)

    return make


@pytest.fixture
def spawn(
    w3: Web3, devnet: Devnet, hub_deployment: Deployment, tmp_path: Path
) -> Iterator[Callable[..., ServiceProcess]]:
    """Factory: spawn(database_url, **settings) -> a started service process; all are killed after the test. With
    `wait=False` it is only launched: the test starts what else it needs, then calls its `ready()`; with `script`,
    that Python file serves the settings instead of `serve` (tests.servers.ServiceProcess.launch)."""
    record = tmp_path / "deployment.json"
    hub_deployment.save(record)
    running: list[ServiceProcess] = []

    def make(
        database_url: str, name: str = "service", *, wait: bool = True, script: Path | None = None, **settings: str
    ) -> ServiceProcess:
        values = {
            "rpc_url": devnet.url,
            "deployment_file": str(record),
            "database_url": database_url,
            "confirmations": "0",
            "indexer_interval": "0.05",
            "engine_enabled": "false",
            "settle_fee_share_percent": "0",  # as in service_settings
            "access_control": "false",  # as in service_settings
            "client_requests_per_second": "0",  # as in service_settings
            # As in service_settings (the tests of the worker ask for one).
            "recovery_processes": "0",
            **settings,
        }
        service = ServiceProcess(values, tmp_path, name).launch(script)
        running.append(service)
        return service.ready() if wait else service

    yield make
    for service in running:
        service.kill()


@pytest.fixture
def serve_here(
    w3: Web3, devnet: Devnet, hub_deployment: Deployment, tmp_path: Path
) -> Iterator[Callable[..., ServiceThread]]:
    """Factory: serve_here(database_url, **settings) -> the service's app served by uvicorn on a thread of this
    process, as `serve` configures it (tests.servers.ServiceThread); all are stopped after the test."""
    record = tmp_path / "deployment-here.json"
    hub_deployment.save(record)
    running: list[ServiceThread] = []

    def make(database_url: str, **overrides: Any) -> ServiceThread:
        service = ServiceThread(settings_for_tests(devnet, record, database_url, **overrides))
        running.append(service)
        return service.start()

    yield make
    for service in running:
        service.stop()


@pytest.fixture
def limit_of_py_ecc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process's limit as py_ecc leaves it (100,000), and no section running (an app of an earlier test in this
    process may still run one), for the test; both as they were after."""
    saved = sys.getrecursionlimit()
    monkeypatch.setattr(recursion, "_sections", recursion._Sections())
    sys.setrecursionlimit(100_000)
    yield
    sys.setrecursionlimit(saved)
