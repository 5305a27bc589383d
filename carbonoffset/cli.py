"""The ``carbonoffset`` command line: report, offset, reconcile, fake-server, demo.

Exit codes: 0 success; 1 an offset could not be confirmed (it stays in the
ledger); 2 bad settings (missing key, unknown environment, threshold); 3 the
ledger cannot be used.

The API key is never taken on the command line (it would land in shell history
and process lists): set ``CODECARBON_OFFSET_API_KEY`` or ``offset_api_key`` in
``.codecarbon.config``.
"""

from __future__ import annotations

import json
import logging
import secrets
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from carbonoffset.core.config import OffsetConfig
from carbonoffset.core.errors import ConfigurationError, LedgerError
from carbonoffset.core.ledger import Ledger
from carbonoffset.core.units import KG_PER_LB

app = typer.Typer(
    name="carbonoffset",
    help="Measure the carbon emissions of ML training and offset them through 1ClickImpact.",
    no_args_is_help=True,
    add_completion=False,
)
# a wide console when piped, so `carbonoffset report > file` keeps every column
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True)

EXIT_UNCONFIRMED = 1
EXIT_CONFIG = 2
EXIT_LEDGER = 3

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
    typer.Option("--environment", help="'production' or 'sandbox' (default: offset_environment)."),
]


def _fail(code: int, message: str) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


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


def _open_ledger(path: Path | str) -> Ledger:
    try:
        return Ledger(path)
    except LedgerError as exc:
        raise _fail(EXIT_LEDGER, str(exc)) from None


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    handler = RichHandler(console=err_console, show_path=False, show_time=False)
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
                "offset_lb": sum(o.amount_lb for o in offsets if o.state == "confirmed"),
                "offset_kg": balance.offset_kg,
                "in_flight_lb": sum(o.amount_lb for o in offsets if o.state in ("intent", "unknown")),
                "failed_offsets": sum(1 for o in offsets if o.state == "failed"),
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
        Optional[Path], typer.Option("--plot", help="Write a PNG of cumulative emissions vs offsets.")
    ] = None,
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
    with _open_ledger(path) as book:
        try:
            rows = _report_data(book)
            groups = breakdown(book, by) if by is not None else None
            if plot is not None:
                _plot(book, plot)
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
        console.print(f"Plot written to {plot}")


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


def _plot(book: Ledger, target: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise _fail(EXIT_CONFIG, "--plot needs matplotlib: pip install carbonoffset[plot]") from None
    import datetime as dt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for account in book.accounts():
        series = book.history(account)
        if series:
            ax.step(
                [dt.datetime.fromisoformat(t.rstrip("Z")) for t, _ in series],
                [kg for _, kg in series],
                where="post",
                label=f"emissions {account}",
            )
        total = 0.0
        points = []
        for offset in book.offsets(account, states=("confirmed",)):
            total += offset.amount_kg
            points.append((dt.datetime.fromisoformat(offset.created_utc.rstrip("Z")), total))
        if points:
            ax.step(
                [p[0] for p in points],
                [p[1] for p in points],
                where="post",
                linestyle="--",
                label=f"offsets {account}",
            )
    ax.set_xlabel("time (UTC)")
    ax.set_ylabel("cumulative kg CO2eq")
    ax.set_title("Cumulative emissions vs offsets")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(target, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------ offset, reconcile
@app.command()
def offset(
    ledger: LedgerOption = None,
    environment: EnvironmentOption = None,
    round_up: Annotated[
        bool, typer.Option("--round-up", help="Buy the next whole pound; the overshoot becomes a credit.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
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
    with _open_ledger(config.ledger_path) as book:
        offsetter = Offsetter(config, book)
        for outcome in offsetter.reconcile():
            console.print(f"settled earlier offset {outcome.offset_id}: {outcome.state}")
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
        return
    console.print(
        f"Offset {outcome.offset_id}: {outcome.amount_lb} lb ({outcome.amount_lb * KG_PER_LB:.6g} kg) -> "
        f"{outcome.state}. Pending now {balance.pending_kg:.6g} kg, credit {balance.credit_kg:.6g} kg."
    )
    if outcome.state != "confirmed":
        raise typer.Exit(EXIT_UNCONFIRMED)


@app.command()
def reconcile(
    ledger: LedgerOption = None,
    environment: EnvironmentOption = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Settle offsets whose outcome is unknown (looks each id up before any retry)."""
    from carbonoffset.core.offsetter import Offsetter

    _setup_logging(verbose)
    config = _config(offset_ledger=ledger, offset_environment=environment)
    if not config.can_offset:
        raise _fail(EXIT_CONFIG, "offset_api_key is not set: set CODECARBON_OFFSET_API_KEY to reconcile")
    with _open_ledger(config.ledger_path) as book:
        outcomes = Offsetter(config, book).reconcile()
        still_open = book.offsets(config.account, states=("intent", "unknown"))
    if not outcomes and not still_open:
        console.print("No open offsets to reconcile.")
    held = [o for o in still_open if o.offset_id not in {x.offset_id for x in outcomes}]
    if held:
        console.print(
            f"{len(held)} open offset(s) are held by a running process, or a capture for them was sent less "
            "than 5 minutes ago and may still land: they are left alone for now; run reconcile again later."
        )
        raise typer.Exit(EXIT_UNCONFIRMED)
    for outcome in outcomes:
        console.print(f"{outcome.offset_id}: {outcome.amount_lb} lb -> {outcome.state}")
    if any(o.state != "confirmed" and o.state != "failed" for o in outcomes):
        raise typer.Exit(EXIT_UNCONFIRMED)


@app.command()
def adopt(
    account: Annotated[
        str, typer.Argument(help="Account to take runs from, as `carbonoffset report` shows it.")
    ],
    ledger: LedgerOption = None,
    environment: EnvironmentOption = None,
) -> None:
    """Move the runs of another account (recorded without a key, or with a refused key) to the configured one.

    Their emissions become pending there and are offset by the next run or `carbonoffset offset`.
    """
    config = _config(offset_ledger=ledger, offset_environment=environment)
    if not config.can_offset:
        raise _fail(EXIT_CONFIG, "offset_api_key is not set: set CODECARBON_OFFSET_API_KEY to adopt runs")
    with _open_ledger(config.ledger_path) as book:
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
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0 picks a free one).")] = 8765,
    environment: Annotated[
        str, typer.Option(help="'sandbox' (test_ keys) or 'production' (live_ keys).")
    ] = "sandbox",
) -> None:
    """Run the local 1ClickImpact-compatible server in the foreground (Ctrl-C stops it)."""
    from carbonoffset.testing import FakeOneClickImpact

    if environment not in ("sandbox", "production"):
        raise _fail(EXIT_CONFIG, "--environment must be 'production' or 'sandbox'")
    server = FakeOneClickImpact(environment=environment, port=port).start()
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
    framework: Annotated[str, typer.Option(help="lightning, huggingface or keras.")] = "lightning",
    epochs: Annotated[int, typer.Option(min=1, max=50, help="Epochs to train.")] = 5,
    ledger: LedgerOption = None,
    yes: Annotated[
        bool, typer.Option("--yes", help="Allow the demo to buy 1 lb in production with your configured key.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Train a small model on scikit-learn's digits with the callback, then offset (rounded up to 1 lb)."""
    from carbonoffset.demo import FRAMEWORKS, trainer_module

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
    if base.can_offset:
        console.print(
            f"Using 1ClickImpact ({base.offset_environment}) with your configured offset_api_key. The final "
            "offset rounds up, so this buys 1 lb of carbon capture."
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
            f"1ClickImpact-compatible server at {server.url} (sandbox, in memory) with a throw-away test key."
        )
    settings["offset_ledger"] = ledger_path
    console.print(
        f"Carbon intensity: CodeCarbon offline data for country {country}"
        + (" (the demo's default; set country_iso_code to change it)." if not base.country_iso_code else ".")
    )
    try:
        module = trainer_module(framework)
        console.print(f"Training a small {framework} model on scikit-learn digits for {epochs} epochs...")
        started = time.perf_counter()
        result = module.train(settings, epochs=epochs)
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
