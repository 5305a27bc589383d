"""The ``carbonoffset`` command line: report, offset, reconcile, fake-server, demo.

Exit codes: 0 success; 1 an offset could not be confirmed (it stays in the
ledger); 2 bad settings (missing key, unknown environment, threshold); 3 the
ledger cannot be used.

The API key is never taken on the command line (it would land in shell history
and process lists): set ``CODECARBON_OFFSET_API_KEY`` or ``offset_api_key`` in
``.codecarbon.config``.
"""

from __future__ import annotations

import errno
import json
import logging
import secrets
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from carbonoffset.core.config import OffsetConfig
from carbonoffset.core.errors import ConfigurationError, LedgerError, LedgerUnavailableError
from carbonoffset.core.ledger import OPEN_STATES, Ledger, OffsetState
from carbonoffset.core.units import KG_PER_LB

app = typer.Typer(
    name="carbonoffset",
    help="Measure the carbon emissions of ML training and offset them through 1ClickImpact.",
    no_args_is_help=True,
    add_completion=False,
    # click's plain help: options as `--ledger PATH` and flags without a type (typer's rich panels
    # print `<bool>` after every flag, --help included)
    rich_markup_mode=None,
)
# a wide console when piped, so `carbonoffset report > file` keeps every column
console = Console(width=None if sys.stdout.isatty() else 160)
# messages on stderr are never wrapped (a piped stderr would otherwise be cut at 80 columns)
err_console = Console(stderr=True, soft_wrap=True)

EXIT_UNCONFIRMED = 1
EXIT_CONFIG = 2
EXIT_LEDGER = 3

RunOption = Annotated[
    Optional[str],
    typer.Option(
        "--run",
        metavar="RUN_ID",
        help="Run id (or a unique prefix of it, or 'latest'), as the ledger holds it. With --plot: draw this run only.",
    ),
]
LedgerOption = Annotated[
    Optional[str],
    typer.Option(
        "--ledger",
        metavar="PATH|URL",
        help="Ledger file or PostgreSQL URL (default: offset_ledger setting or the user data dir).",
    ),
]
EnvironmentOption = Annotated[
    Optional[str],
    typer.Option(
        "--environment", metavar="ENV", help="'production' or 'sandbox' (default: offset_environment)."
    ),
]
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="Log what carbonoffset does (INFO).")]


def _fail(code: int, message: str) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {escape(message)}")
    return typer.Exit(code)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        console.print(f"carbonoffset {version('carbonoffset')}")
        raise typer.Exit()


@app.callback()
def _main(
    show_version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Measure the carbon emissions of ML training and offset them through 1ClickImpact."""


def _config(**explicit: Any) -> OffsetConfig:
    try:
        return OffsetConfig.resolve(**explicit)
    except ConfigurationError as exc:
        raise _fail(EXIT_CONFIG, str(exc)) from None


def _ledger_setting() -> Path | str:
    """The ledger path or URL alone (``report`` needs no other setting, so others may be invalid)."""
    from carbonoffset.core.config import default_ledger_path, read_external_settings
    from carbonoffset.core.ledger.urls import normalize_location

    try:
        value = read_external_settings().get("offset_ledger")
    except ConfigurationError as exc:
        raise _fail(EXIT_CONFIG, str(exc)) from None
    return normalize_location(value) if value else default_ledger_path()


def _mention_other_accounts(*, book_path: Path | str, config: OffsetConfig) -> None:
    """Point at runs stranded in another account of the same environment (no key, refused key)."""
    with _open_ledger(book_path) as book:
        others = [
            (account, book.balance(account).pending_kg)
            for account in book.accounts()
            if account != config.account and account.startswith(f"{config.offset_environment}:")
        ]
    for account, pending_kg in others:
        if pending_kg > 0:
            console.print(
                f"Account {account} has {pending_kg:.6g} kg pending (recorded without a key or with a refused "
                f"key): `carbonoffset adopt {account}` hands it to this key's account."
            )


def _open_ledger(path: Path | str, *, must_exist: bool = False) -> Ledger:
    if must_exist and isinstance(path, Path) and not path.exists():  # a typo must not create a ledger
        raise _fail(
            EXIT_LEDGER,
            f"no ledger at {path}; nothing was changed. Pass the ledger your trainings use with --ledger, or "
            "set offset_ledger (CODECARBON_OFFSET_LEDGER)",
        )
    try:
        return Ledger(path)
    except LedgerUnavailableError as exc:  # a server down, unreachable, or a file locked past the wait
        what = (
            "another process holds the file locked: try again"
            if isinstance(path, Path)
            else "check that the database server is running and reachable from here (host, port, database "
            "and user in the URL)"
        )
        raise _fail(
            EXIT_LEDGER,
            f"{exc}. Nothing was changed; {what}, or point --ledger / offset_ledger (CODECARBON_OFFSET_LEDGER) "
            "at another ledger",
        ) from None
    except LedgerError as exc:
        raise _fail(EXIT_LEDGER, str(exc)) from None


def _setup_logging(verbose: bool) -> None:
    handler: logging.Handler
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler = RichHandler(console=err_console, show_path=False, show_time=False)
    else:  # piped: one plain line per message, never wrapped
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("carbonoffset")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if verbose else logging.WARNING)


# ----------------------------------------------------------------------- report
def _report_data(ledger: Ledger) -> list[dict[str, Any]]:
    rows = []
    for account in ledger.accounts():
        balance = ledger.balance(account)
        runs = ledger.runs(account)
        offsets = ledger.offsets(account)
        rows.append(
            {
                "account": account,
                "environment": account.split(":", 1)[0],
                "runs": len(runs),
                "energy_kwh": sum(r.energy_kwh for r in runs),
                "emissions_kg": balance.recorded_kg,
                "offset_lb": sum(o.amount_lb for o in offsets if o.state == OffsetState.CONFIRMED),
                "offset_kg": balance.offset_kg,
                "in_flight_lb": sum(o.amount_lb for o in offsets if o.state in OPEN_STATES),
                "failed_offsets": sum(1 for o in offsets if o.state == OffsetState.FAILED),
                "pending_kg": balance.pending_kg,
                "credit_kg": balance.credit_kg,
            }
        )
    return rows


@app.command()
def report(
    ledger: LedgerOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    plot: Annotated[
        Optional[Path],
        typer.Option(
            "--plot", metavar="FILE.png", help="Write a PNG of cumulative emissions vs offsets, per account."
        ),
    ] = None,
    run: RunOption = None,
    statement: Annotated[
        bool, typer.Option("--statement", help="With --run: print one paragraph for a paper.")
    ] = False,
    by: Annotated[
        Optional[str],
        typer.Option(
            "--by",
            metavar="account|project|label|host|run",
            help="Break the figures down by account, project, label, host or run.",
        ),
    ] = None,
) -> None:
    """Show, per account (environment + key fingerprint): runs, emissions, offsets, pending and credit."""
    from carbonoffset.core.ledger.reports import GROUPINGS, breakdown
    from carbonoffset.core.ledger.urls import normalize_location

    if by is not None and by not in GROUPINGS:
        raise _fail(EXIT_CONFIG, f"--by must be one of {', '.join(GROUPINGS)} (got {by!r})")
    path = normalize_location(ledger) if ledger else _ledger_setting()
    if isinstance(path, Path) and not path.exists():
        raise _fail(
            EXIT_LEDGER, f"no ledger at {path}; run a training with carbonoffset first or pass --ledger"
        )
    if plot is None and (run is not None or statement):
        _report_run(path, run, statement=statement, as_json=as_json)
        return
    with _open_ledger(path) as book:
        try:
            rows = _report_data(book)
            groups = breakdown(book, by) if by is not None else None
            panels = _plot(book, plot, run) if plot is not None else 0
        except LedgerError as exc:
            raise _fail(EXIT_LEDGER, str(exc)) from None
        path = book.location  # the URL's password never shown
    if as_json:
        document: dict[str, Any] = {"ledger": str(path), "accounts": rows}
        if by is not None:
            document["by"] = by
            document["groups"] = groups
        print(json.dumps(document, indent=2))
        return
    if groups is not None:
        _print_breakdown(by or "", groups, path)
        return
    table = Table(title=f"carbonoffset ledger: {path}")
    for column in (
        "account",
        "runs",
        "energy kWh",
        "emissions kg",
        "offset lb",
        "in flight lb",
        "pending kg",
        "credit kg",
    ):
        if column == "account":
            table.add_column(column, overflow="fold", min_width=12)
        else:
            table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            row["account"],
            str(row["runs"]),
            f"{row['energy_kwh']:.6g}",
            f"{row['emissions_kg']:.6g}",
            str(row["offset_lb"]),
            str(row["in_flight_lb"]),
            f"{row['pending_kg']:.6g}",
            f"{row['credit_kg']:.6g}",
        )
    console.print(table if rows else f"The ledger {path} has no runs yet.")
    if plot is not None:
        console.print(f"Plot written to {plot}" if panels else f"No plot written: {path} has nothing recorded yet.")


def _print_breakdown(by: str, groups: list[dict[str, Any]], where: Path | str) -> None:
    table = Table(title=f"carbonoffset ledger: {where}, by {by}")
    if by == "run":
        columns = ["run", "started (UTC)", "duration s", "status", "energy kWh", "emissions kg", "bought lb",
                   "receipts"]
        for column in columns:
            table.add_column(column, overflow="fold", justify="left" if column in ("run", "receipts") else "right")
        for row in groups:
            table.add_row(
                row["run_id"],
                row["started_utc"][:19],
                f"{row['duration_s']:.0f}" if row["duration_s"] is not None else "-",
                row["status"],
                f"{row['energy_kwh']:.6g}",
                f"{row['emissions_kg']:.6g}",
                str(row["offset_lb"]),
                " ".join(r["offset_id"] for r in row["receipts"]) or "-",
            )
    else:
        extra = ["pending kg", "credit kg"] if by == "account" else []
        for column in [by, "runs", "energy kWh", "emissions kg", "offset lb", "in flight lb", *extra]:
            table.add_column(column, overflow="fold", justify="left" if column == by else "right")
        for row in groups:
            cells = [row["group"], str(row["runs"]), f"{row['energy_kwh']:.6g}", f"{row['emissions_kg']:.6g}",
                     str(row["offset_lb"]), str(row["in_flight_lb"])]
            if by == "account":
                cells += [f"{row['pending_kg']:.6g}", f"{row['credit_kg']:.6g}"]
            table.add_row(*cells)
    console.print(table if groups else f"The ledger {where} has no runs yet.")


# ------------------------------------------------------------ one run: card, statement
def _run_carbon(path: Path | str, run: str | None) -> Any:
    from carbonoffset.core import card

    if run is None:
        raise _fail(EXIT_CONFIG, "--run RUN_ID is needed (a run id, a unique prefix of one, or 'latest')")
    with _open_ledger(path) as book:
        try:
            return card.run_carbon(book, card.resolve_run_id(book, run))
        except KeyError as exc:
            raise _fail(EXIT_CONFIG, str(exc.args[0])) from None


def _report_run(path: Path | str, run: str | None, *, statement: bool, as_json: bool) -> None:
    """``report --run RUN_ID [--statement] [--json]``."""
    from carbonoffset.core import card

    carbon = _run_carbon(path, run)
    if as_json:
        print(json.dumps(card.as_json(carbon), indent=2))
    elif statement:
        print(card.statement(carbon))
    else:
        print(card.card_section(carbon), end="")


@app.command("card")
def card_command(
    run: RunOption = None,
    ledger: LedgerOption = None,
    output_format: Annotated[
        str, typer.Option("--format", help="markdown (a card: front matter + section), yaml or json.")
    ] = "markdown",
    update: Annotated[
        Optional[Path],
        typer.Option(
            "--update", help="Merge into this model card (README.md): front matter kept, section replaced."
        ),
    ] = None,
    training_type: Annotated[
        Optional[str],
        typer.Option("--training-type", help="e.g. pre-training or fine-tuning (left out if unset)."),
    ] = None,
) -> None:
    """A run's co2_eq_emissions model-card metadata (grams) and its "Carbon emissions and offsets" section."""
    from carbonoffset.core import card

    if output_format not in ("markdown", "yaml", "json"):
        raise _fail(EXIT_CONFIG, "--format must be markdown, yaml or json")
    from carbonoffset.core.ledger.urls import normalize_location

    path = normalize_location(ledger) if ledger else _ledger_setting()
    if isinstance(path, Path) and not path.exists():
        raise _fail(
            EXIT_LEDGER, f"no ledger at {path}; pass --ledger with the ledger the run was recorded in"
        )
    carbon = _run_carbon(path, run)
    try:
        if update is not None:
            card.write_card(update, carbon, training_type=training_type)
            err_console.print(f"Updated {update} (co2_eq_emissions and the section for run {carbon.run_id})")
            return
        if output_format == "json":
            print(json.dumps(card.as_json(carbon, training_type=training_type), indent=2))
        elif output_format == "yaml":
            print(card.metadata_yaml(carbon, training_type=training_type), end="")
        else:
            print(card.new_card(carbon, training_type=training_type), end="")
    except ModuleNotFoundError as exc:
        raise _fail(EXIT_CONFIG, str(exc)) from None
    except ValueError as exc:  # a card whose front matter is not a mapping, an unmeasured run
        raise _fail(EXIT_CONFIG, f"cannot update {update}: {exc}" if update is not None else str(exc)) from None


def _plot(book: Ledger, target: Path, run_id: str | None) -> int:
    try:
        from carbonoffset.plot import plot_ledger

        return plot_ledger(book, target, run_id=run_id)
    except ImportError:
        raise _fail(EXIT_CONFIG, '--plot needs matplotlib: pip install "carbonoffset[plot]"') from None
    except KeyError as exc:
        raise _fail(EXIT_CONFIG, f"--run: {exc.args[0]}") from None


# ------------------------------------------------------------ offset, reconcile
@app.command()
def offset(
    ledger: LedgerOption = None,
    environment: EnvironmentOption = None,
    round_up: Annotated[
        bool, typer.Option("--round-up", help="Buy the next whole pound; the overshoot becomes a credit.")
    ] = False,
    verbose: VerboseOption = False,
) -> None:
    """Offset what the account has pending now (whole pounds, rounded down unless --round-up)."""
    from carbonoffset.core.offsetter import Offsetter

    _setup_logging(verbose)
    config = _config(offset_ledger=ledger, offset_environment=environment)
    if not config.can_offset:
        raise _fail(
            EXIT_CONFIG,
            "offset_api_key is not set: set CODECARBON_OFFSET_API_KEY or offset_api_key in .codecarbon.config",
        )
    with _open_ledger(config.ledger_path, must_exist=True) as book:
        offsetter = Offsetter(config, book)
        settled = offsetter.reconcile()
        for earlier in settled:
            console.print(f"settled earlier offset {earlier.offset_id}: {earlier.state}")
        held = _held(book, config, settled)
        _explain_held(held)
        outcome = offsetter.offset_pending(round_up=round_up, respect_threshold=False)
        balance = book.balance(config.account)
    if offsetter.auth_failed:
        raise _fail(
            EXIT_CONFIG,
            "1ClickImpact refused offset_api_key (value not shown); nothing was bought. Fix the key "
            f"(environment {config.offset_environment}) and run again.",
        )
    if outcome is None:
        if balance.pending_kg <= 0:
            console.print(
                f"Nothing to offset in {config.offset_environment} ({config.account}): nothing is pending"
                + (f"; credit {balance.credit_kg:.6g} kg." if balance.credit_kg else ".")
            )
        else:
            console.print(
                f"Nothing to offset in {config.offset_environment}: pending {balance.pending_kg:.6g} kg is under "
                f"one pound ({KG_PER_LB} kg); use --round-up to buy one pound anyway."
            )
        _mention_other_accounts(book_path=config.ledger_path, config=config)
        if held:
            raise typer.Exit(EXIT_UNCONFIRMED)
        return
    console.print(
        f"Offset {outcome.offset_id}: {outcome.amount_lb} lb ({outcome.amount_lb * KG_PER_LB:.6g} kg) -> "
        f"{outcome.state}. Pending now {balance.pending_kg:.6g} kg, credit {balance.credit_kg:.6g} kg."
    )
    if outcome.state != OffsetState.CONFIRMED or held:
        raise typer.Exit(EXIT_UNCONFIRMED)


def _held(book: Ledger, config: OffsetConfig, settled: list[Any]) -> list[Any]:
    """Open offsets of the account that reconcile could not claim (another process, resend grace)."""
    done = {o.offset_id for o in settled}
    return [o for o in book.offsets(config.account, states=OPEN_STATES) if o.offset_id not in done]


def _explain_held(held: list[Any]) -> None:
    """Say which open offsets are left alone, why, and from when a retry can settle them."""
    import datetime as dt

    from carbonoffset.core.ledger import DEFAULT_RESEND_GRACE_S

    now = time.time()
    latest = now
    for record in held:
        reasons, until = [], now
        if record.last_sent is not None and now - record.last_sent < DEFAULT_RESEND_GRACE_S:
            until = max(until, record.last_sent + DEFAULT_RESEND_GRACE_S)
            reasons.append(
                f"a capture for it was sent {now - record.last_sent:.0f} s ago and may still land "
                f"(resend grace {DEFAULT_RESEND_GRACE_S / 60:g} min)"
            )
        if record.lease_until is not None and record.lease_until > now:
            until = max(until, record.lease_until)
            reasons.append("a running process holds it (it settles it, or its lease ends)")
        latest = max(latest, until)
        console.print(
            f"Left alone: offset {record.offset_id} of {record.amount_lb} lb ({record.state}): "
            + ("; ".join(reasons) or "another process is settling it")
            + "."
        )
    if held:
        when = dt.datetime.fromtimestamp(latest + 1, dt.timezone.utc).strftime("%H:%M:%S UTC")
        console.print(
            f"{len(held)} open offset(s) left alone: nothing was sent for them. Their amount is neither "
            f"pending nor lost; run `carbonoffset reconcile` after {when} to settle them."
        )


@app.command()
def reconcile(
    ledger: LedgerOption = None,
    environment: EnvironmentOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Settle offsets whose outcome is unknown (looks each id up before any retry)."""
    from carbonoffset.core.offsetter import Offsetter

    _setup_logging(verbose)
    config = _config(offset_ledger=ledger, offset_environment=environment)
    if not config.can_offset:
        raise _fail(EXIT_CONFIG, "offset_api_key is not set: set CODECARBON_OFFSET_API_KEY to reconcile")
    with _open_ledger(config.ledger_path, must_exist=True) as book:
        outcomes = Offsetter(config, book).reconcile()
        still_open = book.offsets(config.account, states=OPEN_STATES)
    if not outcomes and not still_open:
        console.print("No open offsets to reconcile.")
    held = [o for o in still_open if o.offset_id not in {x.offset_id for x in outcomes}]
    for outcome in outcomes:
        console.print(f"{outcome.offset_id}: {outcome.amount_lb} lb -> {outcome.state}")
    _explain_held(held)
    if held or any(o.state not in (OffsetState.CONFIRMED, OffsetState.FAILED) for o in outcomes):
        raise typer.Exit(EXIT_UNCONFIRMED)


@app.command()
def adopt(
    # (described in the docstring: typer's own listing of an argument prints its type as `<str>`)
    account: Annotated[str, typer.Argument(metavar="ACCOUNT", hidden=True)],
    ledger: LedgerOption = None,
    environment: EnvironmentOption = None,
) -> None:
    """Move the runs of ACCOUNT (recorded without a key, or with a refused key) to the configured one.

    ACCOUNT is shown by `carbonoffset report`, e.g. sandbox:no-key. Its emissions become pending in
    the configured account and are offset by the next run or `carbonoffset offset`.
    """
    config = _config(offset_ledger=ledger, offset_environment=environment)
    if not config.can_offset:
        raise _fail(EXIT_CONFIG, "offset_api_key is not set: set CODECARBON_OFFSET_API_KEY to adopt runs")
    with _open_ledger(config.ledger_path, must_exist=True) as book:
        if account not in book.accounts():
            raise _fail(
                EXIT_CONFIG, f"no account {account!r} in {config.ledger_display}; see `carbonoffset report`"
            )
        try:
            moved = book.move_runs(from_account=account, to_account=config.account)
        except ValueError as exc:
            raise _fail(EXIT_CONFIG, str(exc)) from None
        balance = book.balance(config.account)
    console.print(
        f"Moved {moved} run(s) from {account} to {config.account}; pending there now {balance.pending_kg:.6g} kg."
    )


# ------------------------------------------------------------------ fake-server
@app.command("fake-server")
def fake_server(
    port: Annotated[
        int, typer.Option(metavar="PORT", min=0, max=65535, help="Port on 127.0.0.1 (0 picks a free one).")
    ] = 8765,
    environment: Annotated[
        str, typer.Option(metavar="ENV", help="'sandbox' (test_ keys) or 'production' (live_ keys).")
    ] = "sandbox",
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log each request (method, path, status; never the key).")
    ] = False,
) -> None:
    """Run the local 1ClickImpact-compatible server in the foreground (Ctrl-C stops it)."""
    from carbonoffset.testing import FakeOneClickImpact

    _setup_logging(verbose)
    if environment not in ("sandbox", "production"):
        raise _fail(EXIT_CONFIG, "--environment must be 'production' or 'sandbox'")
    try:
        server = FakeOneClickImpact(environment=environment, port=port).start()
    except OSError as exc:
        reason = "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be used ({exc.strerror})"
        raise _fail(
            EXIT_CONFIG, f"port {port} on 127.0.0.1 {reason}: pass another --port, or --port 0 for a free one"
        ) from None
    console.print(f"Fake 1ClickImpact ({environment}) listening on {server.url}")
    console.print(
        f"Use it with: CODECARBON_OFFSET_API_URL={server.url} CODECARBON_OFFSET_ENVIRONMENT={environment}"
    )
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        console.print(f"Stopped; it had captured {server.total_lb()} lb.")


# ------------------------------------------------------------------------ demo
DEMO_COUNTRY = "FRA"


@app.command()
def demo(
    framework: Annotated[
        str, typer.Option(metavar="NAME", help="lightning, huggingface or keras.")
    ] = "lightning",
    epochs: Annotated[int, typer.Option(metavar="N", min=1, max=50, help="Epochs to train.")] = 5,
    ledger: LedgerOption = None,
    yes: Annotated[
        bool, typer.Option("--yes", help="Allow the demo to buy 1 lb in production with your configured key.")
    ] = False,
    verbose: VerboseOption = False,
) -> None:
    """Train a small model on scikit-learn's digits with the callback, then offset (rounded up to 1 lb)."""
    from carbonoffset.demo import FRAMEWORKS, account_credit_kg, offset_outcome, offset_plan, trainer_module

    _setup_logging(verbose)
    if framework not in FRAMEWORKS:
        raise _fail(EXIT_CONFIG, f"--framework must be one of {', '.join(FRAMEWORKS)}")
    base = _config(offset_ledger=ledger)
    country = base.country_iso_code or DEMO_COUNTRY
    server = None
    settings: dict[str, Any] = {
        "country_iso_code": country,
        "offset_round_up": True,
        "offset_threshold": base.offset_threshold,
    }
    if base.can_offset and base.offset_environment == "production" and not yes:
        raise _fail(
            EXIT_CONFIG,
            "a production offset_api_key is configured: the demo would buy 1 lb of carbon capture for real. "
            "Pass --yes to do that, or set CODECARBON_OFFSET_ENVIRONMENT=sandbox with a test_ key.",
        )
    credit_before_kg = 0.0
    if base.can_offset:
        credit_before_kg = account_credit_kg(base)
        console.print(
            f"Using 1ClickImpact ({base.offset_environment}) with your configured offset_api_key. "
            + offset_plan(credit_before_kg, auto_offset=base.auto_offset)
        )
        ledger_path = base.ledger_path
    else:
        from carbonoffset.testing import FakeOneClickImpact

        server = FakeOneClickImpact(environment="sandbox").start()
        from carbonoffset.core.config import default_ledger_path

        ledger_path = base.offset_ledger or default_ledger_path().with_name("demo-ledger.sqlite3")
        settings.update(
            offset_api_key=f"test_demo_{secrets.token_hex(8)}",
            offset_environment="sandbox",
            offset_api_url=server.url,
        )
        console.print(
            "No offset_api_key is configured, so nothing real is bought: the demo runs a local "
            f"1ClickImpact-compatible server at {server.url} (sandbox, in memory) with a throw-away test key. "
            + offset_plan(0.0, auto_offset=base.auto_offset)  # a new key: a new account, no credit
        )
    settings["offset_ledger"] = ledger_path
    console.print(
        f"Carbon intensity: CodeCarbon offline data for country {country}"
        + (" (the demo's default; set country_iso_code to change it)." if not base.country_iso_code else ".")
    )
    try:
        module = trainer_module(framework)
        what = f"Training a small {framework} model on scikit-learn digits for {epochs} epochs"
        console.print(f"{what}...")
        started = time.perf_counter()
        with console.status(f"{what}: epoch 0/{epochs}") as status:

            def progress(done: int, total: int) -> None:
                status.update(f"{what}: epoch {done}/{total}, {time.perf_counter() - started:.0f} s")

            result = module.train(settings, epochs=epochs, progress=progress)
        elapsed = time.perf_counter() - started
    except ModuleNotFoundError as exc:
        raise _fail(EXIT_CONFIG, str(exc)) from None
    finally:
        if server is not None:
            server.stop()
    rep = result.report
    table = Table(title=f"carbonoffset demo ({framework})", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("epochs", str(result.epochs))
    table.add_row("validation accuracy", f"{result.accuracy:.3f}")
    table.add_row("training time", f"{elapsed:.1f} s")
    table.add_row("energy", f"{rep.energy_kwh:.3e} kWh")
    table.add_row("emissions", f"{rep.emissions_kg:.3e} kg CO2eq")
    table.add_row("offset bought", f"{rep.confirmed_lb} lb = {rep.confirmed_lb * KG_PER_LB:.6f} kg")
    if rep.in_flight_lb:
        table.add_row("offset unconfirmed", f"{rep.in_flight_lb} lb (settled by `carbonoffset reconcile`)")
    table.add_row("pending", f"{rep.pending_kg:.3e} kg")
    table.add_row("credit", f"{rep.credit_kg:.6f} kg")
    if server is not None:
        table.add_row("local sandbox captures", f"{len(server.captures)} ({server.total_lb()} lb)")
    from carbonoffset.core.ledger.urls import mask_password

    shown = mask_password(str(ledger_path))  # a database URL's password is never printed
    table.add_row("ledger", shown)
    console.print(table)
    console.print(offset_outcome(rep, credit_before_kg))
    console.print(f"See the ledger any time with: carbonoffset report --ledger {shown}")


# ---------------------------------------------------------------------- ledger
ledger_app = typer.Typer(help="Move a ledger's data: copy a SQLite ledger into PostgreSQL, replay spools.")
app.add_typer(ledger_app, name="ledger")


@ledger_app.command("copy")
def ledger_copy(
    source: Annotated[str, typer.Argument(metavar="SRC", help="Ledger to copy from (file or URL).")],
    target: Annotated[str, typer.Argument(metavar="DST", help="Ledger to copy into (e.g. a PostgreSQL URL).")],
) -> None:
    """Copy every run, record and offset of SRC into DST, ids kept (twice changes nothing; conflicting
    rows are refused and nothing is copied)."""
    from carbonoffset.core.ledger.copy import LedgerConflictError, copy_ledger
    from carbonoffset.core.ledger.urls import normalize_location

    where = normalize_location(source)
    if isinstance(where, Path) and not where.exists():
        raise _fail(EXIT_LEDGER, f"no ledger at {where}")
    with _open_ledger(where) as src, _open_ledger(normalize_location(target)) as dst:
        try:
            result = copy_ledger(src, dst)
        except LedgerConflictError as exc:
            raise _fail(EXIT_LEDGER, str(exc)) from None
        except LedgerError as exc:
            raise _fail(EXIT_LEDGER, str(exc)) from None
        shown = dst.location
    console.print(
        f"Copied into {shown}: "
        + ", ".join(f"{n} {t} ({result.identical[t]} already there)" for t, n in result.copied.items())
    )


@ledger_app.command("replay")
def ledger_replay(ledger: LedgerOption = None) -> None:
    """Write figures kept on local disk (spool) while the ledger could not be reached."""
    from carbonoffset.core.ledger.spool import replay_left_over
    from carbonoffset.core.ledger.urls import normalize_location

    where = normalize_location(ledger) if ledger else _ledger_setting()
    if isinstance(where, Path) and not where.exists():  # a typo must not create an empty ledger
        raise _fail(EXIT_LEDGER, f"no ledger at {where}; pass --ledger with the ledger the figures were kept for")
    with _open_ledger(where) as book:
        try:
            made = replay_left_over(book, book.path or book.location)
        except LedgerError as exc:
            raise _fail(EXIT_LEDGER, str(exc)) from None
        shown = book.location
    console.print(f"Wrote {made} spooled figure(s) to {shown}." if made else f"Nothing spooled for {shown}.")


def main() -> None:
    """Entry point of the ``carbonoffset`` script."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
